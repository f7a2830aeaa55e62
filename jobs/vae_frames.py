"""The VAE's jobs: raw latents to IMAGE frames and back, streamed chunk by chunk."""
from __future__ import annotations

import torch

from ..model_defs.bundles import SpacetimeVAE
from ..model_defs.wan_vae import ChunkCallback  # on_chunk(done, total) after each chunk; may raise to interrupt


def decode_frames(
    vae: SpacetimeVAE, latent: torch.Tensor, device: torch.device, on_chunk: ChunkCallback | None = None
) -> torch.Tensor:
    """Raw latents ``[B,C,T',h,w]`` -> IMAGE frames ``[B*T, H, W, 3]`` in 0..1 (videos one after another)."""
    if latent.ndim != 5 or latent.shape[1] != vae.latent_channels:
        raise ValueError(
            f"samples must be a video latent [B,{vae.latent_channels},T,H,W] for VAE {vae.name}, "
            f"got shape {tuple(latent.shape)}"
        )
    with torch.inference_mode():
        video = vae.vae.decode(latent.to(device=device, dtype=vae.dtype), on_chunk=on_chunk)  # [B,3,T,H,W] in -1..1
    frames = video.float().add(1).mul(0.5).clamp(0, 1)
    return frames.permute(0, 2, 3, 4, 1).flatten(0, 1).cpu()  # [B*T,H,W,3]


def encode_frames(
    vae: SpacetimeVAE, images: torch.Tensor, device: torch.device, on_chunk: ChunkCallback | None = None
) -> torch.Tensor:
    """IMAGE frames ``[N,H,W,3]`` in 0..1 (one video, N = 1 + tf*k) -> raw latent ``[1,C,T',H/sf,W/sf]``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"pixels must be IMAGE frames [N,H,W,3], got shape {tuple(images.shape)}")
    frames, height, width, _ = images.shape
    vae.frame_rules.check_size(width, height, frames)
    video = images.permute(3, 0, 1, 2).unsqueeze(0).mul(2).sub(1)  # [1,3,N,H,W] in -1..1
    with torch.inference_mode():
        latent = vae.vae.encode(video.to(device=device, dtype=vae.dtype), on_chunk=on_chunk)
    return latent.float().cpu()
