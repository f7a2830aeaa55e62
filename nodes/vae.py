"""VAE decode (LATENT -> IMAGE frames) and encode (IMAGE frames -> LATENT), streamed chunk by chunk."""
from __future__ import annotations

from ..jobs.vae_frames import decode_frames, encode_frames
from . import comfy_glue


class SpacetimeVAEDecode:
    DESCRIPTION = "Decodes a video latent into IMAGE frames (all videos of the batch one after another)."
    CATEGORY = "spacetime/latent"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("SPACETIME_VAE",), "samples": ("LATENT",)}}

    def decode(self, vae, samples):
        with comfy_glue.on_device(vae.vae, "vae") as device:
            return (decode_frames(vae, samples["samples"], device, comfy_glue.progress_callback("decoding")),)


class SpacetimeVAEEncode:
    DESCRIPTION = "Encodes IMAGE frames (1 + 4k of them, sides multiples of the VAE's factor) into a video latent."
    CATEGORY = "spacetime/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("SPACETIME_VAE",), "pixels": ("IMAGE",)}}

    def encode(self, vae, pixels):
        with comfy_glue.on_device(vae.vae, "vae") as device:
            latent = encode_frames(vae, pixels, device, comfy_glue.progress_callback("encoding"))
        return ({"samples": latent},)
