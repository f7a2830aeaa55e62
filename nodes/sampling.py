"""Text encode, empty video latent and the sampler."""
from __future__ import annotations

from ..jobs.text_to_video import empty_latent, encode_prompts, generate, pair_experts, step_preview
from ..jobs.video_prompts import check_image_prompt, image_condition
from . import comfy_glue
from .widgets import (
    CFG_LOW_NOISE, DENOISE, FRAMES, HEIGHT, KNOWN_FRAMES, SEED, SOLVER_WIDGETS, SWITCH_STEP, WIDTH, size_rule, solver_rule,
    solver_settings, validate_inputs,
)


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

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values)

    def encode(self, text_encoder, text: str):
        with comfy_glue.on_device(text_encoder.encoder.model, "text_encoder"):
            return (encode_prompts(text_encoder, [text])[0],)


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
                "width": WIDTH,
                "height": HEIGHT,
                "frames": FRAMES,
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, size_rule)

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
                "seed": SEED,
                **SOLVER_WIDGETS,
                "denoise": DENOISE,
            },
            "optional": {
                "known_frames": (KNOWN_FRAMES, {"tooltip": "Frames to keep in place (image to video, extend, connect)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, solver_rule)

    def sample(self, model, positive, negative, latent, seed, steps, cfg, shift, scheduler, denoise, known_frames=None):
        settings = solver_settings(steps, cfg, shift, scheduler, denoise)
        image = None
        if model.image_channels:  # an image-to-video model: the known frames through its own image channels
            check_image_prompt(model, known_frames)
            with comfy_glue.on_device(known_frames.vae.vae, "vae") as vae_device:
                image = image_condition(model, known_frames, vae_device, comfy_glue.progress_callback("encoding"))
        progress = comfy_glue.Progress(steps, "sampling")
        with comfy_glue.device_slot() as slot:
            samples = generate(
                model, positive, negative, latent["samples"], seed, settings, slot.device,
                on_step=lambda done, total, x0: progress.update(done, step_preview(model, x0)),
                known=None if known_frames is None else known_frames.known, use=slot.use, image=image,
            )
        return ({**latent, "samples": samples},)


class SpacetimeExpertPair:
    DESCRIPTION = (
        "Wan 2.2 A14B: pairs the high-noise and the low-noise expert into one model for one sampler. The sampler runs "
        "the high-noise expert for the first steps and the low-noise one for the rest, switching at the published "
        "boundary (T2V 0.875, I2V 0.900 of the noise level) for any step count; only the running expert is on the GPU."
    )
    CATEGORY = "spacetime/loaders"
    RETURN_TYPES = ("SPACETIME_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "pair"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "high_noise_model": ("SPACETIME_MODEL", {"tooltip": "The high-noise expert (file name with high_noise)."}),
                "low_noise_model": ("SPACETIME_MODEL", {"tooltip": "The low-noise expert (file name with low_noise)."}),
                "switch_step": SWITCH_STEP,
                "cfg_low_noise": CFG_LOW_NOISE,
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values)

    def pair(self, high_noise_model, low_noise_model, switch_step: int = -1, cfg_low_noise: float = 0.0):
        return (pair_experts(high_noise_model, low_noise_model, switch_step, cfg_low_noise),)
