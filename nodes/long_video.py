"""Long video: text to video beyond the model's trained length, by chained forward extension."""
from __future__ import annotations

from ..jobs.long_video import generate_long_video, plan_long_video
from ..jobs.text_to_video import step_preview
from ..model_defs.bundles import any_vae_rules
from . import comfy_glue
from .widgets import HEIGHT, SEED, SOLVER_WIDGETS, STRENGTH, WIDTH, literal_values, solver_rule, solver_settings, validate_inputs


def _plan_rule(values: dict) -> None:
    width, height, frames, chunk_frames, overlap = literal_values(values, "width", "height", "frames", "chunk_frames", "overlap")
    plan_long_video(any_vae_rules(), width, height, frames, chunk_frames, overlap)


class SpacetimeLongVideo:
    DESCRIPTION = (
        "Generates a video of any length: a first chunk of chunk_frames from the prompt, then chunk after chunk "
        "that continues the last `overlap` frames (chained forward extension, seed + 1 for each chunk). Memory is "
        "that of one chunk whatever the length; only the output frames grow. frames may be any count (e.g. 961 = "
        "1 minute at 16 fps): the last chunk is cut to it."
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
                "chunk_frames": ("INT", {"default": 17, "min": 5, "max": 4097, "step": 4, "tooltip": "Frames per chunk, 1 + 4k: the model's trained length is best."}),
                "overlap": ("INT", {"default": 5, "min": 1, "max": 4093, "step": 4, "tooltip": "Frames each chunk shares with the previous one: 1, 5, 9, ... (< chunk_frames)."}),
                "seed": SEED,
                **SOLVER_WIDGETS,
                "strength": STRENGTH,
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, _plan_rule, solver_rule)

    def generate(self, model, vae, positive, negative, width, height, frames, chunk_frames, overlap, seed, steps, cfg,
                 shift, scheduler, strength):
        settings = solver_settings(steps, cfg, shift, scheduler)
        plan = plan_long_video(vae.video_rules, width, height, frames, chunk_frames, overlap)
        progress = comfy_glue.Progress(plan.chunks * steps, f"long video ({plan.chunks} chunks)")
        finished = 0  # steps of the chunks already done

        def on_chunk(done: int, _total: int) -> None:
            nonlocal finished
            finished = done * steps

        with comfy_glue.device_slot() as slot, comfy_glue.on_device(vae.vae, "vae") as vae_device:
            video = generate_long_video(
                model, vae, positive, negative, plan, seed, settings, strength, slot.device, vae_device,
                on_chunk=on_chunk, on_step=lambda done, _total, x0: progress.update(finished + done, step_preview(model, x0)), use=slot.use,
            )
        return (video,)
