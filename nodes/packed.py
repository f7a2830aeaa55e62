"""The packed sampler: several prompts, each with its own size and length, sampled as packed sequences.

Videos of different sizes cannot share one IMAGE batch, so the node returns a list of LATENTs
(``OUTPUT_IS_LIST``): ComfyUI then runs each downstream node (VAE Decode, Create Video, Save Video) once
per video, and so does the headless runner.
"""
from __future__ import annotations

from ..model_defs.bundles import SPATIAL_PATCH, SpacetimeConditioning
from ..model_defs.packed_sampling import PackedItem, generate_packed
from ..model_defs.pipeline import empty_latent
from ..model_defs.video_list import LINE_FORMAT, parse_video_list
from . import comfy_glue
from .sampling import MAX_SEED, SOLVER_WIDGETS

# A 832x480 video of 81 frames is 21 x 30 x 52 = 32760 tokens, twice with cfg: the default fits one,
# or many small ones; larger budgets need memory in proportion (attention itself stays linear).
DEFAULT_MAX_TOKENS = 65536

VIDEOS_TOOLTIP = (
    f"One video per line: '{LINE_FORMAT}', e.g. 'a red circle drifts to the left | 64 | 64 | 17'. "
    "Width and height are multiples of 16 (VAE factor x patch size), frames are 1 + 4k. "
    "The prompt is everything before the last three '|'; blank lines and lines starting with # are skipped."
)


def _seed_of(seed: int, index: int) -> int:
    return (seed + index) % (MAX_SEED + 1)


def _encode_each(text_encoder, prompts: list[str]) -> list[SpacetimeConditioning]:
    """Each prompt encoded alone (as Spacetime Text Encode does), the encoder moved to its device once."""
    model = text_encoder.encoder.model
    comfy_glue.prepare_on_device(model, comfy_glue.torch_device("text_encoder"))
    try:
        return [SpacetimeConditioning(text_encoder.encoder.encode([p], text_encoder.text_len), text_encoder.name) for p in prompts]
    finally:
        comfy_glue.release(model)


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
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": "The video on the i-th line of the list (counting from 0, skipped lines not counted) uses seed + i."}),
                **SOLVER_WIDGETS,
                "max_tokens_per_pack": ("INT", {"default": DEFAULT_MAX_TOKENS, "min": 1, "max": 1 << 24, "tooltip": "Memory budget: at most this many tokens in one packed pass. A video is (1 + (frames-1)/4) x height/16 x width/16 tokens, twice with cfg != 1. Lists over it are split into several packs (logged); a single video over it is an error."}),
            }
        }

    def sample(self, model, vae, text_encoder, videos, negative, seed, steps, cfg, shift, scheduler, max_tokens_per_pack):
        requests = parse_video_list(videos, vae.spatial_factor * SPATIAL_PATCH, vae.temporal_factor)
        negative_cond, *positives = _encode_each(text_encoder, [negative] + [r.prompt for r in requests])
        items = [
            PackedItem(
                positive, negative_cond,
                tuple(empty_latent(vae, request.width, request.height, request.frames, 1).shape),
                _seed_of(seed, index), request.name,
            )
            for index, (request, positive) in enumerate(zip(requests, positives))
        ]
        device = comfy_glue.torch_device("diffusion")
        progress = None

        def on_progress(done: int, total: int) -> None:
            nonlocal progress
            progress = progress or comfy_glue.Progress(total, "packed sampling")
            progress.update(done)

        comfy_glue.prepare_on_device(model.dit, device)
        try:
            latents = generate_packed(model, items, steps, cfg, shift, scheduler, device, max_tokens_per_pack, on_progress)
        finally:
            comfy_glue.release(model.dit)
        return ([{"samples": latent} for latent in latents],)
