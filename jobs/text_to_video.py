"""Text to video (and video to video with ``denoise < 1``): an empty latent of a checked size, and the
sampler that turns noise into raw latents under text conditioning, optionally holding known frames."""
from __future__ import annotations

import torch

from ..model_defs.bundles import SpacetimeConditioning, SpacetimeModel, SpacetimeTextEncoder, SpacetimeVAE
from ..model_defs.flow_matching import SolverSettings, StepCallback, guided_velocity, initial_noise, sample
from ..model_defs.known_frames import KnownLatents


def encode_prompts(text_encoder: SpacetimeTextEncoder, prompts: list[str]) -> list[SpacetimeConditioning]:
    """Each prompt encoded alone, at the encoder's own text length (the sampler pads or cuts to the model's)."""
    return [SpacetimeConditioning(text_encoder.encoder.encode([p], text_encoder.text_len), text_encoder.name) for p in prompts]


def empty_latent(vae: SpacetimeVAE, width: int, height: int, frames: int, batch: int) -> torch.Tensor:
    """Zeros ``[batch, C, T', height/sf, width/sf]`` after checking the size against the VAE's rules."""
    size = vae.video_rules.latent_size(width, height, frames)
    if batch < 1:
        raise ValueError(f"batch_size={batch} is not allowed: it must be >= 1")
    return torch.zeros(batch, vae.latent_channels, *size)


def generate(
    model: SpacetimeModel,
    positive: SpacetimeConditioning,
    negative: SpacetimeConditioning,
    latent: torch.Tensor,
    seed: int,
    settings: SolverSettings,
    device: torch.device,
    on_step: StepCallback | None = None,
    known: KnownLatents | None = None,
) -> torch.Tensor:
    """Sample raw latents like ``latent [B,C,F,H,W]`` (raw VAE space); ``settings.denoise < 1`` starts from
    ``latent``; ``known`` latent frames (image/video prompts) are held in place while sampling."""
    model.check_latent(tuple(latent.shape))
    batch = latent.shape[0]
    pos_ctx = model.text_context(positive, "positive", batch, device)
    neg_ctx = model.text_context(negative, "negative", batch, device)

    x0_start = model.latent_format.normalize(latent.float()).to(device)
    noise = initial_noise(tuple(latent.shape), seed).to(device)
    guide = None if known is None else known.guide(model.latent_format.normalize, noise)
    with torch.inference_mode():
        velocity = guided_velocity(model.dit, pos_ctx, neg_ctx, settings.cfg)
        result = sample(velocity, x0_start, noise, settings.sigmas(), settings.scheduler, on_step, guide)
    return model.latent_format.denormalize(result).float().cpu()
