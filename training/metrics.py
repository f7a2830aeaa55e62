"""How well a VAE reconstructs videos: PSNR, and its mean over a pool of held-out clips."""
from __future__ import annotations

import math

import torch

from ..model_defs.wan_vae import WanVAE
from .clips import render_pool, to_video


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in -1..1 (measured in 0..1)."""
    mse = ((a - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def vae_psnr(vae: WanVAE, pool_seed: int, count: int = 16) -> float:
    """Mean reconstruction PSNR (encode, then decode) of ``vae`` over the ``count`` held-out 64x64x17 clips
    of pool ``pool_seed`` (``render_pool(count, pool_seed, held_out=True)``), one clip at a time."""
    held, _ = render_pool(count, pool_seed, held_out=True)
    video = to_video(held).to(next(vae.parameters()).device)
    return sum(psnr(vae.decode(vae.encode(video[i: i + 1])), video[i: i + 1]) for i in range(count)) / count
