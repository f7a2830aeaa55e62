"""The packed sampler: several prompts, each with its own size and length, sampled as packed sequences.

Videos of different sizes cannot share one IMAGE batch, so the node returns a list of LATENTs
(``OUTPUT_IS_LIST``): ComfyUI then runs each downstream node (VAE Decode, Create Video, Save Video) once
per video, and so does the headless runner.
"""
from __future__ import annotations

from ..jobs.packed import PackedItem, generate_packed
from ..jobs.text_to_video import empty_latent, encode_prompts
from ..jobs.video_list import LINE_FORMAT, parse_video_list
from ..model_defs.bundles import any_vae_rules
from . import comfy_glue
from .widgets import SEED, SOLVER_WIDGETS, literal_values, seed_of, solver_rule, solver_settings, validate_inputs

# A 832x480 video of 81 frames is 21 x 30 x 52 = 32760 tokens, twice with cfg: the default fits one,
# or many small ones; larger budgets need memory in proportion (attention itself stays linear).
DEFAULT_MAX_TOKENS = 65536

VIDEOS_TOOLTIP = (
    f"One video per line: '{LINE_FORMAT}', e.g. 'a red circle drifts to the left | 64 | 64 | 17'. "
    "Width and height are multiples of the VAE factor x patch size (16 for Wan 2.1 and the built-in model), "
    "frames are 1 + 4k. "
    "The prompt is everything before the last three '|'; blank lines and lines starting with # are skipped."
)


def _videos_rule(values: dict) -> None:
    (videos,) = literal_values(values, "videos")
    parse_video_list(videos, any_vae_rules())


class SpacetimePackedSampler:
    DESCRIPTION = (
        "Samples several prompts, each with its own width, height and frame count, in one packed sequence "
        "(NaViT patch n' pack): each video comes out as it would from the Spacetime Sampler alone with the "
        "same seed. Returns one latent per video, so downstream nodes run once per video."
    )
    CATEGORY = "spacetime/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latents",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = ("One latent per line of the list, in order (a list: downstream nodes run once per video).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SPACETIME_MODEL",),
                "vae": ("SPACETIME_VAE", {"tooltip": "Sets the latent channels and compression factors of each video."}),
                "text_encoder": ("SPACETIME_TEXT_ENCODER", {"tooltip": "Encodes each line's prompt and the negative prompt."}),
                "videos": ("STRING", {"multiline": True, "default": "a red circle drifts to the left over a grey background | 64 | 64 | 17", "tooltip": VIDEOS_TOOLTIP}),
                "negative": ("STRING", {"multiline": True, "default": "", "tooltip": "Negative prompt, shared by every video."}),
                "seed": (SEED[0], {**SEED[1], "tooltip": "The video on the i-th line of the list (counting from 0, skipped lines not counted) uses seed + i."}),
                **SOLVER_WIDGETS,
                "max_tokens_per_pack": ("INT", {"default": DEFAULT_MAX_TOKENS, "min": 1, "max": 1 << 24, "tooltip": "Memory budget: at most this many tokens in one packed pass. A video is (1 + (frames-1)/4) x height/16 x width/16 tokens, twice with cfg != 1. Lists over it are split into several packs (logged); a single video over it is an error."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, _videos_rule, solver_rule)

    def sample(self, model, vae, text_encoder, videos, negative, seed, steps, cfg, shift, scheduler, max_tokens_per_pack):
        settings = solver_settings(steps, cfg, shift, scheduler)
        requests = parse_video_list(videos, vae.video_rules)
        with comfy_glue.on_device(text_encoder.encoder.model, "text_encoder"):  # moved once for every prompt
            negative_cond, *positives = encode_prompts(text_encoder, [negative] + [r.prompt for r in requests])
        items = [
            PackedItem(
                positive, negative_cond,
                tuple(empty_latent(vae, request.width, request.height, request.frames, 1).shape),
                seed_of(seed, index), request.name,
            )
            for index, (request, positive) in enumerate(zip(requests, positives))
        ]
        with comfy_glue.device_slot() as slot:
            latents = generate_packed(
                model, items, settings, slot.device, max_tokens_per_pack, comfy_glue.progress_callback("packed sampling"),
                use=slot.use,
            )
        return ([{"samples": latent} for latent in latents],)
