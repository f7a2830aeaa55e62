"""The VAE decode split across the ranks of a world by spatial tiles (``vae_tiles``: the same tiles, ramps and blend
as a one-process tiled decode).

Tiles are numbered row by row; rank r of N decodes tiles r, r+N, r+2N, ... (each through the VAE's whole causal
time stream), so its working memory is that of one tile. The decoded pieces are then all-gathered over
``groups.world`` (a rank with fewer tiles sends zero padding) and every rank blends all of them, in tile order:
the same sums in the same order as ``decode_tiled`` in one process, so the result is that decode's, bit for bit,
on every rank (``dst``: on that rank only, the pieces gathered there; the others return None and hold only their
own tiles). One tile (``tile_size`` covering the frame, or 0/auto below ``AUTO_UNTILED_PIXELS``) cannot be split:
every rank decodes it whole (with ``dst``: only that rank), as one process would. Pass a ``tile_size`` to split.

Why tiles and not time: the causal decode of latent frame t needs the cached features of frames < t, so time
chunks with the cache handed over run one after the other (a pipeline at best: a rank starts chunk k+1 only once
chunk k's cache arrives); tiles are independent. A split in time would need each rank to re-decode a few latent
frames before its chunk to warm its cache (the causal convolutions reach back 2 frames per layer) and would then
only approximate the serial decode.
"""
from __future__ import annotations

import logging

import math
from typing import TYPE_CHECKING

import torch

from ..vae_tiles import decode_tiles
from ..wan_vae import ChunkCallback

if TYPE_CHECKING:
    from .plan import ParallelGroups

log = logging.getLogger(__name__)


def decode_split(
    vae, latent: torch.Tensor, groups: "ParallelGroups | None", tile_size: int = 0, overlap: int | None = None,
    on_chunk: ChunkCallback | None = None, clamp: bool = True, device: torch.device | None = None,
    out_device: torch.device | None = None, dst: int | None = None,
) -> torch.Tensor | None:
    """``decode_tiled(vae, latent, tile_size, overlap, ...)`` with the tiles shared over ``groups.world`` (every rank
    calls it, collectively, with the same latent ``[B,z,T',h,w]`` and arguments) -> video ``[B,3,T,h*sf,w*sf]``
    (fp32 on ``out_device``, default: the latent's, when tiled) on every rank, or on rank ``dst`` only (None on the
    others). The gathered pieces travel on the decode ``device`` (NCCL needs them on the GPU). ``on_chunk(done,
    total)`` counts this rank's tiles' chunks. ``groups`` None: the whole default process group (a torchrun world)."""
    import torch.distributed as dist

    group = dist.group.WORLD if groups is None else groups.world
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < world):
        raise ValueError(f"dst={dst!r} is not allowed; allowed: None (every rank) or a rank from 0 to {world - 1}")
    run, grid = decode_tiles(vae, latent, tile_size, overlap, clamp, device)  # checks the sizes before any work
    if grid is None:
        return run(latent, on_chunk) if dst in (None, rank) else None
    sf = vae.config.spatial_factor
    mine = range(rank, len(grid), world)
    if rank == 0:
        log.info("Spacetime: decoding %d tiles over %d ranks", len(grid), world)
    per_rank = math.ceil(len(grid) / world)
    stack = None  # [per_rank, B, 3, T, th, tw]: this rank's pieces, zero past its last one
    for index, number in enumerate(mine):
        def progress(done: int, total: int, index: int = index) -> None:
            if on_chunk is not None:
                on_chunk(index * total + done, len(mine) * total)

        piece = run(latent[(..., *grid.window(number, 1))], progress)  # [B,3,T,th,tw]
        if stack is None:
            stack = piece.new_zeros(per_rank, *piece.shape)
        stack[index] = piece
    if stack is None:  # fewer tiles than ranks: this one sends only padding, shaped as the others' pieces
        stack = _empty_stack(vae, latent, grid, per_rank, device)
    out_device = latent.device if out_device is None else out_device
    if dst is None:
        gathered = [torch.empty_like(stack) for _ in range(world)]
        dist.all_gather(gathered, stack, group=group)
    else:
        gathered = [torch.empty_like(stack) for _ in range(world)] if rank == dst else None
        dist.gather(stack, gathered, dst=dist.get_global_rank(group, dst), group=group)
        if rank != dst:
            return None
    pieces = ((number, gathered[number % world][number // world]) for number in range(len(grid)))  # tile order
    return grid.blend(pieces, sf, out_device)


def _empty_stack(vae, latent: torch.Tensor, grid, count: int, device: torch.device | None) -> torch.Tensor:
    """Zeros shaped as ``count`` decoded tiles of ``latent``: ``[count, B, 3, 1 + (T'-1)*tf, th*sf, tw*sf]``."""
    parameter = next(vae.parameters())
    frames = 1 + (latent.shape[2] - 1) * vae.config.temporal_factor
    height, width = grid.tile_shape(vae.config.spatial_factor)
    device = parameter.device if device is None else device
    return torch.zeros(count, latent.shape[0], 3, frames, height, width, dtype=parameter.dtype, device=device)
