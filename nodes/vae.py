"""VAE decode (LATENT -> IMAGE frames) and encode (IMAGE frames -> LATENT), streamed chunk by chunk."""
from __future__ import annotations

from ..model_defs.pipeline import decode_frames, encode_frames
from . import comfy_glue


def run_on_vae_device(vae, label: str, job):
    """``job(device, on_chunk)`` with the VAE on its device and a progress bar named ``label``."""
    device = comfy_glue.torch_device("vae")
    comfy_glue.prepare_on_device(vae.vae, device)
    progress = None

    def on_chunk(done: int, total: int) -> None:
        nonlocal progress
        progress = progress or comfy_glue.Progress(total, label)
        progress.update(done)

    try:
        return job(device, on_chunk)
    finally:
        comfy_glue.release(vae.vae)


class SpacetimeVAEDecode:
    DESCRIPTION = "Decodes a video latent into IMAGE frames (all videos of the batch one after another)."
    CATEGORY = "spacetime/latent"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("SPACETIME_VAE",), "samples": ("LATENT",)}}

    def decode(self, vae, samples):
        return (run_on_vae_device(vae, "decoding", lambda device, cb: decode_frames(vae, samples["samples"], device, cb)),)


class SpacetimeVAEEncode:
    DESCRIPTION = "Encodes IMAGE frames (1 + 4k of them, sides multiples of 8) into a video latent."
    CATEGORY = "spacetime/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("SPACETIME_VAE",), "pixels": ("IMAGE",)}}

    def encode(self, vae, pixels):
        latent = run_on_vae_device(vae, "encoding", lambda device, cb: encode_frames(vae, pixels, device, cb))
        return ({"samples": latent},)
