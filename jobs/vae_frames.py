"""The VAE's jobs: raw latents to IMAGE frames and back, streamed chunk by chunk in time and, for large
frames, tiled in space (``model_defs/vae_tiles.py`` holds the tiling rule: ``tile_size`` 0 is auto)."""
from __future__ import annotations

import torch

from ..model_defs.bundles import SpacetimeVAE
from ..model_defs.vae_tiles import decode_tiled, encode_tiled
from ..model_defs.wan_vae import ChunkCallback  # on_chunk(done, total) after each chunk; may raise to interrupt
from .parallel.torchrun import shares_decodes

CPU = torch.device("cpu")


def decode_frames(
    vae: SpacetimeVAE, latent: torch.Tensor, device: torch.device, on_chunk: ChunkCallback | None = None, tile_size: int = 0
) -> torch.Tensor:
    """Raw latents ``[B,C,T',h,w]`` -> IMAGE frames ``[B*T, H, W, 3]`` in 0..1 (videos one after another).
    ``tile_size``: pixels per spatial tile, a multiple of the VAE's factor; 0: auto (untiled for small frames)."""
    if latent.ndim != 5 or latent.shape[1] != vae.latent_channels:
        raise ValueError(
            f"samples must be a video latent [B,{vae.latent_channels},T,H,W] for VAE {vae.name}, "
            f"got shape {tuple(latent.shape)}"
        )
    with torch.inference_mode():
        # tiles are blended on the CPU, where the frames go anyway: the device holds one tile's video at a time; in a
        # torchrun world each rank decodes its share of the tiles (untiled frames: every rank the whole video)
        decode = _split_decode if shares_decodes() else decode_tiled
        video = decode(vae.vae, latent, tile_size, on_chunk=on_chunk, device=device, out_device=CPU)  # [B,3,T,H,W] in -1..1
    frames = video.float().add(1).mul(0.5).clamp(0, 1)
    return frames.permute(0, 2, 3, 4, 1).flatten(0, 1).cpu()  # [B*T,H,W,3]


def _split_decode(vae, latent: torch.Tensor, tile_size: int, **kwargs) -> torch.Tensor:
    from ..model_defs.parallel.vae_decode import decode_split

    return decode_split(vae, latent, None, tile_size, **kwargs)


def encode_frames(
    vae: SpacetimeVAE, images: torch.Tensor, device: torch.device, on_chunk: ChunkCallback | None = None, tile_size: int = 0
) -> torch.Tensor:
    """IMAGE frames ``[N,H,W,3]`` in 0..1 (one video, N = 1 + tf*k) -> raw latent ``[1,C,T',H/sf,W/sf]``.
    ``tile_size`` as for ``decode_frames``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"pixels must be IMAGE frames [N,H,W,3], got shape {tuple(images.shape)}")
    frames, height, width, _ = images.shape
    vae.frame_rules.check_size(width, height, frames)
    video = images.permute(3, 0, 1, 2).unsqueeze(0).mul(2).sub(1)  # [1,3,N,H,W] in -1..1, on the CPU: moved tile by tile
    with torch.inference_mode():
        latent = encode_tiled(vae.vae, video, tile_size, on_chunk=on_chunk, device=device)
    return latent.float().cpu()
