"""The jobs behind the nodes: validate a video size, make an empty latent, sample, decode, encode.

Everything here is torch-only: services of the host (device choice, progress, interrupt) come in as
arguments and callbacks.
"""
from __future__ import annotations

from typing import Callable

import torch

from .bundles import SPATIAL_PATCH, SpacetimeConditioning, SpacetimeModel, SpacetimeVAE
from .conditioning import KnownLatents
from .flow_matching import SOLVERS, StepCallback, guided_velocity, initial_noise, sample, sampling_sigmas

ChunkCallback = Callable[[int, int], None]


def _nearest_multiples(value: int, unit: int) -> list[int]:
    if value <= unit:
        return [unit]
    below = (value // unit) * unit
    return [below, below + unit] if value % unit else [value]


def validate_video_size(width: int, height: int, frames: int, spatial_unit: int, temporal_factor: int) -> None:
    """Raise ValueError naming the offending input and the nearest allowed values."""
    for name, value in (("width", width), ("height", height)):
        if value < spatial_unit or value % spatial_unit:
            raise ValueError(
                f"{name}={value} is not allowed: it must be a multiple of {spatial_unit} "
                f"(VAE factor x patch size); nearest allowed values: {_nearest_multiples(value, spatial_unit)}"
            )
    if frames < 1 or (frames - 1) % temporal_factor:
        below = 1 + max(0, (frames - 1) // temporal_factor) * temporal_factor
        nearest = sorted({below, below + temporal_factor})
        raise ValueError(
            f"frames={frames} is not allowed: it must be 1 + {temporal_factor}*k (1, {1 + temporal_factor}, "
            f"{1 + 2 * temporal_factor}, ...); nearest allowed values: {nearest}"
        )


def empty_latent(vae: SpacetimeVAE, width: int, height: int, frames: int, batch: int) -> torch.Tensor:
    """Zeros ``[batch, C, 1 + (frames-1)/tf, height/sf, width/sf]`` after validating the size."""
    validate_video_size(width, height, frames, vae.spatial_factor * SPATIAL_PATCH, vae.temporal_factor)
    if batch < 1:
        raise ValueError(f"batch_size={batch} is not allowed: it must be >= 1")
    latent_frames = 1 + (frames - 1) // vae.temporal_factor
    sf = vae.spatial_factor
    return torch.zeros(batch, vae.latent_channels, latent_frames, height // sf, width // sf)


def _context(cond: SpacetimeConditioning, which: str, model: SpacetimeModel, batch: int, device, dtype):
    """Context ``[batch, text_len, text_dim]``: zero-padded or cut to the model's text length (as Wan does)."""
    cfg = model.config
    emb = cond.text.embeddings  # [n, L, D]
    if emb.shape[-1] != cfg.text_dim:
        raise ValueError(
            f"{which} conditioning comes from {cond.encoder_name} (dim {emb.shape[-1]}) but the model "
            f"{model.name} expects text embeddings of dim {cfg.text_dim}; use the text encoder that matches the model"
        )
    if emb.shape[0] not in (1, batch):
        raise ValueError(f"{which} conditioning holds {emb.shape[0]} prompts but the latent batch is {batch}")
    out = torch.zeros(emb.shape[0], cfg.text_len, cfg.text_dim)
    length = min(cfg.text_len, emb.shape[1])
    out[:, :length] = emb[:, :length]
    return out.expand(batch, -1, -1).to(device=device, dtype=dtype)


def generate(
    model: SpacetimeModel,
    positive: SpacetimeConditioning,
    negative: SpacetimeConditioning,
    latent: torch.Tensor,
    seed: int,
    steps: int,
    cfg: float,
    shift: float,
    scheduler: str,
    denoise: float,
    device: torch.device,
    on_step: StepCallback | None = None,
    known: KnownLatents | None = None,
) -> torch.Tensor:
    """Sample raw latents like ``latent [B,C,F,H,W]`` (raw VAE space); ``denoise < 1`` starts from ``latent``;
    ``known`` latent frames (image/video prompts) are held in place while sampling."""
    if scheduler not in SOLVERS:
        raise ValueError(f"scheduler={scheduler!r} is not allowed; allowed values: {list(SOLVERS)}")
    if steps < 1:
        raise ValueError(f"steps={steps} is not allowed: it must be >= 1")
    if latent.ndim != 5:
        raise ValueError(f"latent must be a video latent [B,C,T,H,W], got shape {tuple(latent.shape)}")
    dit_cfg = model.config
    batch, channels, frames, height, width = latent.shape
    if channels != dit_cfg.in_dim:
        raise ValueError(
            f"latent has {channels} channels but model {model.name} takes {dit_cfg.in_dim}; "
            "use the VAE that matches the model"
        )
    pt, ph, pw = dit_cfg.patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(
            f"latent size {frames}x{height}x{width} (frames x height x width) is not a multiple of the model's "
            f"patch {dit_cfg.patch_size}; make the video width/height multiples of {ph * 8}"
        )
    sigmas = sampling_sigmas(steps, shift, denoise)
    dtype = model.dit.patch_embedding.weight.dtype
    pos_ctx = _context(positive, "positive", model, batch, device, dtype)
    neg_ctx = _context(negative, "negative", model, batch, device, dtype)

    x0_start = model.latent_format.normalize(latent.float()).to(device)
    noise = initial_noise(tuple(latent.shape), seed).to(device)
    guide = None if known is None else known.guide(model.latent_format.normalize, noise)
    with torch.inference_mode():
        velocity = guided_velocity(model.dit, pos_ctx, neg_ctx, cfg)
        result = sample(velocity, x0_start, noise, sigmas, scheduler, on_step, guide)
    return model.latent_format.denormalize(result).float().cpu()


def decode_frames(
    vae: SpacetimeVAE, latent: torch.Tensor, device: torch.device, on_chunk: ChunkCallback | None = None
) -> torch.Tensor:
    """Raw latents ``[B,C,T',h,w]`` -> IMAGE frames ``[B*T, H, W, 3]`` in 0..1 (videos one after another)."""
    if latent.ndim != 5 or latent.shape[1] != vae.latent_channels:
        raise ValueError(
            f"samples must be a video latent [B,{vae.latent_channels},T,H,W] for VAE {vae.name}, "
            f"got shape {tuple(latent.shape)}"
        )
    dtype = next(vae.vae.parameters()).dtype
    with torch.inference_mode():
        video = vae.vae.decode(latent.to(device=device, dtype=dtype), on_chunk=on_chunk)  # [B,3,T,H,W] in -1..1
    frames = video.float().add(1).mul(0.5).clamp(0, 1)
    return frames.permute(0, 2, 3, 4, 1).flatten(0, 1).cpu()  # [B*T,H,W,3]


def encode_frames(
    vae: SpacetimeVAE, images: torch.Tensor, device: torch.device, on_chunk: ChunkCallback | None = None
) -> torch.Tensor:
    """IMAGE frames ``[N,H,W,3]`` in 0..1 (one video, N = 1 + 4k) -> raw latent ``[1,C,T',H/8,W/8]``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"pixels must be IMAGE frames [N,H,W,3], got shape {tuple(images.shape)}")
    frames, height, width, _ = images.shape
    validate_video_size(width, height, frames, vae.spatial_factor, vae.temporal_factor)
    dtype = next(vae.vae.parameters()).dtype
    video = images.permute(3, 0, 1, 2).unsqueeze(0).mul(2).sub(1)  # [1,3,N,H,W] in -1..1
    with torch.inference_mode():
        latent = vae.vae.encode(video.to(device=device, dtype=dtype), on_chunk=on_chunk)
    return latent.float().cpu()
