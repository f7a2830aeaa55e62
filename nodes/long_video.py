"""Long video: text to video beyond the model's trained length (context windows, latent chain or pixel chain),
told by one prompt or a prompt schedule."""
from __future__ import annotations

from ..jobs.long_video import MODES, generate_long_video, plan_long_video
from ..model_defs.long_sampling import LOOK_ANCHOR
from ..jobs.prompt_schedule import EncodedSchedule, parse_schedule, single_prompt
from ..jobs.text_to_video import encode_prompts, step_preview
from ..model_defs.bundles import any_vae_rules
from . import comfy_glue
from .widgets import HEIGHT, SEED, SOLVER_WIDGETS, STRENGTH, WIDTH, literal_values, solver_rule, solver_settings, validate_inputs

PROMPT_SCHEDULE = "SPACETIME_PROMPT_SCHEDULE"


def _plan_rule(values: dict) -> None:
    width, height, frames, chunk_frames, overlap = literal_values(values, "width", "height", "frames", "chunk_frames", "overlap")
    mode = values.get("mode", MODES[0])
    plan_long_video(any_vae_rules(), width, height, frames, chunk_frames, overlap, MODES[0] if mode is None else mode)


def _schedule_rule(values: dict) -> None:
    schedule, fps, transition = literal_values(values, "schedule", "fps", "transition")
    parse_schedule(schedule, fps, transition)


class SpacetimePromptSchedule:
    DESCRIPTION = (
        "A story for Spacetime Long Video: one segment per line, '<start>: <prompt>', start in seconds ('2.5s') or "
        "frames ('40'); the first at 0, in time order. Each chunk or window follows the prompt of its time; at a "
        "change the prompts are mixed over `transition` frames. Each distinct prompt is encoded once."
    )
    CATEGORY = "spacetime/conditioning"
    RETURN_TYPES = (PROMPT_SCHEDULE,)
    RETURN_NAMES = ("schedule",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("SPACETIME_TEXT_ENCODER",),
                "schedule": ("STRING", {
                    "multiline": True, "default": "0s: a red square moving right\n2s: a red square moving left",
                    "tooltip": "One segment per line: '<start>: <prompt>', start in seconds ('1.5s') or frames ('24'). "
                               "Blank lines and lines starting with # are skipped.",
                }),
                "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 240.0, "step": 1.0, "tooltip": "Frames per second of the video (for starts in seconds)."}),
                "transition": ("INT", {"default": 8, "min": 0, "max": 10_000, "tooltip": "Frames over which one prompt hands over to the next, centred on the change (0: a hard cut)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, _schedule_rule)

    def encode(self, text_encoder, schedule: str, fps: float, transition: int):
        parsed = parse_schedule(schedule, fps, transition)
        with comfy_glue.on_device(text_encoder.encoder.model, "text_encoder"):
            conditionings = tuple(encode_prompts(text_encoder, list(parsed.prompts)))
        return (EncodedSchedule(parsed, conditionings),)


class SpacetimeLongVideo:
    DESCRIPTION = (
        "Generates a video of any length from chunks of chunk_frames that share `overlap` frames. mode: 'context "
        "windows' (default) denoises overlapping windows together at every step from correlated (FreeNoise) noise: one "
        "look for the whole video, joins that do not show, calmer motion; 'latent chain' continues each chunk from the "
        "last one's path through the sampler (its shared frames replayed step by step) and decodes once at the end (more "
        "motion per chunk, for stories whose segments must each move); look_anchor holds each chunk's or window's "
        "background colour to the one its prompt first had (0: off); 'pixel chain' "
        "re-encodes each chunk's decoded tail (the old way, kept as a baseline). Memory is that of one chunk whatever "
        "the length; only the output frames grow. frames may be any count (961 = 1 minute at 16 fps). Connect a "
        "Spacetime Prompt Schedule to tell a story; `positive` is used where none is connected."
    )
    CATEGORY = "spacetime/sampling"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SPACETIME_MODEL",),
                "vae": ("SPACETIME_VAE",),
                "positive": ("SPACETIME_CONDITIONING",),
                "negative": ("SPACETIME_CONDITIONING",),
                "width": WIDTH,
                "height": HEIGHT,
                "frames": ("INT", {"default": 961, "min": 1, "max": 1_000_000, "tooltip": "Frames of the whole video (any count)."}),
                "chunk_frames": ("INT", {"default": 17, "min": 5, "max": 4097, "step": 4, "tooltip": "Frames per chunk or window, 1 + 4k: the model's trained length is best."}),
                "overlap": ("INT", {"default": 5, "min": 1, "max": 4093, "step": 4, "tooltip": "Frames each chunk or window shares with the previous one: 1, 5, 9, ... (< chunk_frames)."}),
                "seed": SEED,
                **SOLVER_WIDGETS,
                "strength": STRENGTH,
                "mode": (list(MODES), {"default": MODES[0], "tooltip": "context windows: one look, hidden joins, calmer motion; latent chain: chunk after chunk, more motion per segment, decoded once; pixel chain: the old re-encoding chain (drifts)."}),
            },
            "optional": {
                "schedule": (PROMPT_SCHEDULE, {"tooltip": "Prompts with start times (Spacetime Prompt Schedule); replaces `positive`."}),
                "look_anchor": ("FLOAT", {
                    "default": LOOK_ANCHOR, "min": 0.0, "max": 1.0, "step": 0.05,
                    "tooltip": "How firmly every chunk or window keeps the look (background colour) its prompt had where it "
                               "first ran, at each step (latent modes): 0 lets it wander, 1 holds it hard. A new prompt in a "
                               "schedule gets its own look.",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, _plan_rule, solver_rule)

    def generate(self, model, vae, positive, negative, width, height, frames, chunk_frames, overlap, seed, steps, cfg,
                 shift, scheduler, strength, mode=MODES[0], schedule=None, look_anchor=LOOK_ANCHOR):
        settings = solver_settings(steps, cfg, shift, scheduler)
        plan = plan_long_video(vae.video_rules, width, height, frames, chunk_frames, overlap, mode)
        prompts = single_prompt(positive) if schedule is None else schedule
        prompts.schedule.check_length(frames)
        progress = comfy_glue.Progress(plan.runs * steps, f"long video ({plan.mode}, {plan.chunks} chunks)")
        finished = 0  # steps of the chunks already done

        def on_chunk(done: int, _total: int) -> None:
            nonlocal finished
            finished = done * steps

        with comfy_glue.device_slot() as slot, comfy_glue.on_device(vae.vae, "vae") as vae_device:
            video = generate_long_video(
                model, vae, prompts, negative, plan, seed, settings, strength, slot.device, vae_device,
                on_chunk=on_chunk, on_step=lambda done, _total, x0: progress.update(finished + done, step_preview(model, x0)), use=slot.use,
                look_anchor=look_anchor,
            )
        return (video,)
