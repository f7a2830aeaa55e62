"""VAE decode (LATENT -> IMAGE frames) and encode (IMAGE frames -> LATENT), streamed chunk by chunk and
tiled in space for large frames."""
from __future__ import annotations

from ..jobs.vae_frames import decode_frames, encode_frames
from . import comfy_glue
from .widgets import TILE_SIZE, tile_rule, validate_inputs


class SpacetimeVAEDecode:
    DESCRIPTION = "Decodes a video latent into IMAGE frames (all videos of the batch one after another)."
    CATEGORY = "spacetime/latent"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        # optional: workflows saved before it existed (no value for it in widgets_values) keep working
        return {"required": {"vae": ("SPACETIME_VAE",), "samples": ("LATENT",)}, "optional": {"tile_size": TILE_SIZE}}

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, tile_rule)

    def decode(self, vae, samples, tile_size: int = 0):
        with comfy_glue.on_device(vae.vae, "vae") as device:
            progress = comfy_glue.progress_callback("decoding")
            return (decode_frames(vae, samples["samples"], device, progress, tile_size),)


class SpacetimeVAEEncode:
    DESCRIPTION = "Encodes IMAGE frames (1 + 4k of them, sides multiples of the VAE's factor) into a video latent."
    CATEGORY = "spacetime/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("SPACETIME_VAE",), "pixels": ("IMAGE",)}, "optional": {"tile_size": TILE_SIZE}}

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, tile_rule)

    def encode(self, vae, pixels, tile_size: int = 0):
        with comfy_glue.on_device(vae.vae, "vae") as device:
            latent = encode_frames(vae, pixels, device, comfy_glue.progress_callback("encoding"), tile_size)
        return ({"samples": latent},)
