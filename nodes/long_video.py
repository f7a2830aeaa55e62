"""Long video: text to video beyond the model's trained length, by chained forward extension."""
from __future__ import annotations

from ..model_defs.long_video import generate_long_video, plan_long_video
from . import comfy_glue
from .sampling import MAX_SEED, SOLVER_WIDGETS
from .video_prompts import STRENGTH


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
                "width": ("INT", {"default": 64, "min": 16, "max": 8192, "step": 16}),
                "height": ("INT", {"default": 64, "min": 16, "max": 8192, "step": 16}),
                "frames": ("INT", {"default": 961, "min": 1, "max": 1_000_000, "tooltip": "Frames of the whole video (any count)."}),
                "chunk_frames": ("INT", {"default": 17, "min": 5, "max": 4097, "step": 4, "tooltip": "Frames per chunk, 1 + 4k: the model's trained length is best."}),
                "overlap": ("INT", {"default": 5, "min": 1, "max": 4093, "step": 4, "tooltip": "Frames each chunk shares with the previous one: 1, 5, 9, ... (< chunk_frames)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
                **SOLVER_WIDGETS,
                "strength": STRENGTH,
            }
        }

    def generate(self, model, vae, positive, negative, width, height, frames, chunk_frames, overlap, seed, steps, cfg,
                 shift, scheduler, strength):
        plan = plan_long_video(frames, chunk_frames, overlap, vae.temporal_factor)
        device, vae_device = comfy_glue.torch_device("diffusion"), comfy_glue.torch_device("vae")
        progress = comfy_glue.Progress(plan.chunks * steps, f"long video ({plan.chunks} chunks)")
        finished = 0  # steps of the chunks already done

        def on_chunk(done: int, _total: int) -> None:
            nonlocal finished
            finished = done * steps

        comfy_glue.prepare_on_device(model.dit, device)
        comfy_glue.prepare_on_device(vae.vae, vae_device)
        try:
            video = generate_long_video(
                model, vae, positive, negative, width, height, plan, seed, steps, cfg, shift, scheduler, strength,
                device, vae_device, on_chunk=on_chunk, on_step=lambda done, _total: progress.update(finished + done),
            )
        finally:
            comfy_glue.release(model.dit)
            comfy_glue.release(vae.vae)
        return (video,)
