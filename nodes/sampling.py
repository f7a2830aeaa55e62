"""Text encode, empty video latent and the sampler."""
from __future__ import annotations

from ..model_defs.bundles import SpacetimeConditioning
from ..model_defs.flow_matching import SOLVERS
from ..model_defs.pipeline import empty_latent, generate
from . import comfy_glue

MAX_SEED = 0xFFFFFFFFFFFFFFFF
# The solver settings every sampler node offers, in this order (a workflow's widgets_values follow it).
SOLVER_WIDGETS = {
    "steps": ("INT", {"default": 20, "min": 1, "max": 1000}),
    "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
    "shift": ("FLOAT", {"default": 5.0, "min": 0.01, "max": 100.0, "step": 0.1, "tooltip": "Timestep shift (Wan: 5 for 720p, 3 for 480p)."}),
    "scheduler": (list(SOLVERS), {"default": SOLVERS[0]}),
}


class SpacetimeTextEncode:
    DESCRIPTION = "Encodes a prompt into conditioning for the sampler."
    CATEGORY = "spacetime/conditioning"
    RETURN_TYPES = ("SPACETIME_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("SPACETIME_TEXT_ENCODER",),
                "text": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt (or negative prompt)."}),
            }
        }

    def encode(self, text_encoder, text: str):
        model = text_encoder.encoder.model
        comfy_glue.prepare_on_device(model, comfy_glue.torch_device("text_encoder"))
        try:
            encoded = text_encoder.encoder.encode([text], text_encoder.text_len)
        finally:
            comfy_glue.release(model)
        return (SpacetimeConditioning(encoded, text_encoder.name),)


class SpacetimeEmptyLatentVideo:
    DESCRIPTION = "An empty video latent of the given size for text-to-video."
    CATEGORY = "spacetime/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("SPACETIME_VAE", {"tooltip": "Sets the latent channels and compression factors."}),
                "width": ("INT", {"default": 64, "min": 16, "max": 8192, "step": 16}),
                "height": ("INT", {"default": 64, "min": 16, "max": 8192, "step": 16}),
                "frames": ("INT", {"default": 17, "min": 1, "max": 4097, "step": 4, "tooltip": "1 + 4k frames."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            }
        }

    def generate(self, vae, width: int, height: int, frames: int, batch_size: int):
        return ({"samples": empty_latent(vae, width, height, frames, batch_size)},)


class SpacetimeSampler:
    DESCRIPTION = "Flow-matching sampler with classifier-free guidance over spacetime patches."
    CATEGORY = "spacetime/sampling"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SPACETIME_MODEL",),
                "positive": ("SPACETIME_CONDITIONING",),
                "negative": ("SPACETIME_CONDITIONING",),
                "latent": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
                **SOLVER_WIDGETS,
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "< 1 keeps part of the input latent (video-to-video)."}),
            },
            "optional": {
                "known_frames": ("SPACETIME_KNOWN_FRAMES", {"tooltip": "Frames to keep in place (image to video, extend, connect)."}),
            },
        }

    def sample(self, model, positive, negative, latent, seed, steps, cfg, shift, scheduler, denoise, known_frames=None):
        device = comfy_glue.torch_device("diffusion")
        progress = comfy_glue.Progress(steps, "sampling")
        comfy_glue.prepare_on_device(model.dit, device)
        try:
            samples = generate(
                model, positive, negative, latent["samples"], seed, steps, cfg, shift, scheduler, denoise, device,
                on_step=lambda done, total, _x0: progress.update(done),
                known=None if known_frames is None else known_frames.known,
            )
        finally:
            comfy_glue.release(model.dit)
        return ({**latent, "samples": samples},)
