"""Spatially tiled VAE decode and encode, on top of the VAE's streaming in time: the one place that says
how a frame is cut into tiles, how large they are by default, and how they are blended back.

A frame is cut into overlapping tiles aligned to the VAE's spatial factor ``sf`` (in latent units for decode,
in blocks of ``sf`` pixels for encode, so every tile maps onto whole latent pixels). Each tile runs through
the VAE's full temporal streaming (its own causal time cache, all frames), and the results are summed with
weights that ramp linearly across each overlap (a feathered blend: a tile's edge, where it lacks its
neighbours' context, counts least) and divided by the summed weights. The memory a decode needs then
follows the tile, not the frame.

Tiles are not exactly the untiled result: the VAE's convolutions see zero padding at a tile's inner edges
instead of the neighbouring pixels (the overlap hides most of this), and the middle block's attention mixes
the pixels of one tile instead of the whole frame. Everything else (per-pixel RMS norms, the causal time
cache, Wan 2.2's pixel folds and shortcuts) is local and the same per tile. ``tests/test_jobs_vae_tiles.py``
states the measured difference. A tile at least as large as the frame is the untiled path itself.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .sizes import nearest_allowed
from .wan_vae import ChunkCallback

# Defaults, in pixels. A 256-px tile keeps a Wan 2.1 decode's working set at what an untiled 256x256 frame needs
# (BENCHMARKS.md, "Tiled VAE": ~0.65 GB in fp32 on a CPU for the first chunk, flat in the frame's size, where an
# untiled 512x512 frame needs 2 GB). A 64-px overlap is 8 latent pixels of Wan 2.1 (4 of Wan 2.2): a wide band
# for the feathered blend, at a cost of at most (256/192)^2 = 1.8x the untiled work; tile_spans spreads any spare
# length over the overlaps, so they are often wider.
DEFAULT_TILE = 256
DEFAULT_OVERLAP = 64
# Auto tiles frames above this many pixels: 1280x720 (Wan's 720p, TI2V-5B's 1280x704) and smaller stay untiled,
# so what every published Wan setting decodes is unchanged (tiles differ from the whole frame where the VAE's
# attention sees one tile: tests/test_jobs_vae_tiles.py) and no time is spent on overlaps; larger frames are tiled
# (untiled memory grows with the area: 3.1x from 256x256 to 512x512 in BENCHMARKS.md). Set tile_size for less.
AUTO_UNTILED_PIXELS = 1280 * 720

TileRun = Callable[[torch.Tensor, ChunkCallback | None], torch.Tensor]


def check_tile_size(tile_size: int, spatial_factor: int, name: str = "tile_size") -> None:
    """ValueError (one line, naming the input and the nearest allowed values) unless ``tile_size`` is 0
    (auto) or a positive multiple of the VAE's spatial factor."""
    if isinstance(tile_size, int) and not isinstance(tile_size, bool) and tile_size >= 0 and tile_size % spatial_factor == 0:
        return
    if not isinstance(tile_size, int) or isinstance(tile_size, bool):
        nearest = [0, spatial_factor]
    elif tile_size < 0:
        nearest = [0]
    elif tile_size < spatial_factor:
        nearest = [0, spatial_factor]
    else:
        nearest = nearest_allowed(tile_size, spatial_factor, spatial_factor)
    raise ValueError(
        f"{name}={tile_size} is not allowed: it must be 0 (auto) or a multiple of {spatial_factor} (the VAE's spatial "
        f"factor), in pixels; nearest allowed values: {nearest}"
    )


def default_overlap(tile_size: int, spatial_factor: int) -> int:
    """The overlap (pixels) of ``tile_size``-pixel tiles: a quarter of the tile, at most ``DEFAULT_OVERLAP``,
    in whole factors, at least one factor when the tile has room for it."""
    overlap = min(DEFAULT_OVERLAP, tile_size // 4) // spatial_factor * spatial_factor
    return max(overlap, spatial_factor) if tile_size > spatial_factor else 0


def auto_tile_size(tile_size: int, height: int, width: int, spatial_factor: int) -> int:
    """The tile size (pixels) to use for a ``height x width`` frame; 0 means untiled. ``tile_size`` 0 is
    auto: untiled up to ``AUTO_UNTILED_PIXELS``, else ``DEFAULT_TILE`` (in whole factors)."""
    check_tile_size(tile_size, spatial_factor)
    if tile_size == 0:
        if height * width <= AUTO_UNTILED_PIXELS:
            return 0
        tile_size = max(spatial_factor, DEFAULT_TILE // spatial_factor * spatial_factor)
    return 0 if tile_size >= max(height, width) else tile_size


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(length)`` with tiles of ``tile`` units that overlap by
    ``overlap`` units or more (the spare length is spread over the overlaps, so the last tile is whole)."""
    if length <= tile:
        return [(0, length)]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap={overlap} must be at least 0 and below the tile, {tile}")
    count = 1 + math.ceil((length - tile) / (tile - overlap))
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return [(start, start + tile) for start in starts]


def blend_ramp(spans: list[tuple[int, int]], index: int, scale: int) -> torch.Tensor:
    """The weights ``[(stop - start) * scale]`` of tile ``index`` along one axis: 1 inside, rising linearly
    across the overlap with the previous tile and falling across the overlap with the next (in output units,
    ``scale`` per tile unit). Two tiles' ramps over a shared overlap sum to 1."""
    start, stop = spans[index]
    size = (stop - start) * scale
    position = torch.arange(size, dtype=torch.float32) + 0.5
    weight = torch.ones(size)
    if index > 0:
        weight = torch.minimum(weight, position / ((spans[index - 1][1] - start) * scale))
    if index + 1 < len(spans):
        weight = torch.minimum(weight, (size - position) / ((stop - spans[index + 1][0]) * scale))
    return weight


class TileGrid:
    """Overlapping tiles over a ``height x width`` grid of units (``tile_spans`` on each axis), numbered row by row:
    where each tile sits and how it is blended back. ``run_tiled`` runs every tile in one process; a parallel
    decode (``parallel/vae_decode.py``) runs each rank's tiles and blends them all here, in the same order."""

    def __init__(self, height: int, width: int, tile: int, overlap: int):
        self.rows = tile_spans(height, tile, overlap)
        self.cols = tile_spans(width, tile, overlap)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def window(self, number: int, scale: int) -> tuple[slice, slice]:
        """(rows, columns) of tile ``number`` in a tensor of ``scale`` pixels per unit."""
        (top, bottom), (left, right) = self.rows[number // len(self.cols)], self.cols[number % len(self.cols)]
        return slice(top * scale, bottom * scale), slice(left * scale, right * scale)

    def tile_shape(self, scale: int) -> tuple[int, int]:
        """(height, width) of every tile at ``scale`` pixels per unit (all tiles have one size)."""
        return (self.rows[0][1] - self.rows[0][0]) * scale, (self.cols[0][1] - self.cols[0][0]) * scale

    def blend(self, pieces, scale: int, device: torch.device) -> torch.Tensor:
        """The tiles' outputs ``(number, piece [B,C',T',h',w'])``, summed with their ramps and divided by the
        summed weights, in the order given: fp32 ``[B,C',T',H',W']`` on ``device``."""
        out = weight = None
        for number, piece in pieces:
            if out is None:
                height, width = self.rows[-1][1] * scale, self.cols[-1][1] * scale
                out = torch.zeros(*piece.shape[:3], height, width, dtype=torch.float32, device=device)  # [B,C',T',H',W']
                weight = torch.zeros(height, width, dtype=torch.float32, device=device)
            row, col = divmod(number, len(self.cols))
            ramp = blend_ramp(self.rows, row, scale)[:, None] * blend_ramp(self.cols, col, scale)[None, :]  # [h', w']
            ramp = ramp.to(out.device)
            window = self.window(number, scale)
            out[(..., *window)] += piece.to(out.device, torch.float32) * ramp
            weight[window] += ramp
        return out.div_(weight)


def run_tiled(
    run: TileRun, x: torch.Tensor, tile: int, overlap: int, in_scale: int, out_scale: int,
    on_chunk: ChunkCallback | None = None, out_device: torch.device | None = None,
) -> torch.Tensor:
    """``run`` on overlapping spatial tiles of ``x [B,C,T,H,W]``, blended. Tiles are cut on a grid of units:
    one unit is ``in_scale`` pixels of ``x`` and ``out_scale`` pixels of ``run``'s output, so ``H`` and ``W``
    must be multiples of ``in_scale``; ``tile`` and ``overlap`` are in units. A single tile is ``run(x)``
    itself; otherwise the result is fp32 on ``out_device`` (default: ``x``'s). ``on_chunk(done, total)``
    counts every tile's chunks."""
    grid = TileGrid(x.shape[3] // in_scale, x.shape[4] // in_scale, tile, overlap)
    return run_grid(run, x, grid, in_scale, out_scale, on_chunk, out_device)


def run_grid(
    run: TileRun, x: torch.Tensor, grid: TileGrid, in_scale: int, out_scale: int,
    on_chunk: ChunkCallback | None = None, out_device: torch.device | None = None,
) -> torch.Tensor:
    """``run_tiled`` on the tiles of ``grid`` (in units of ``in_scale`` pixels of ``x``)."""
    if len(grid) == 1:
        return run(x, on_chunk)
    count = len(grid)

    def pieces():  # one tile at a time: each is blended before the next runs
        for number in range(count):
            def progress(done: int, total: int, number: int = number) -> None:
                if on_chunk is not None:
                    on_chunk(number * total + done, count * total)

            yield number, run(x[(..., *grid.window(number, in_scale))], progress)

    return grid.blend(pieces(), out_scale, x.device if out_device is None else out_device)


def _unit_tiles(tile_size: int, overlap: int | None, spatial_factor: int) -> tuple[int, int]:
    """Pixel tile size and overlap -> (tile, overlap) in factors, the overlap checked against the tile."""
    overlap = default_overlap(tile_size, spatial_factor) if overlap is None else overlap
    if overlap < 0 or overlap % spatial_factor or overlap >= tile_size:
        raise ValueError(
            f"overlap={overlap} is not allowed with tile_size={tile_size}: it must be a multiple of {spatial_factor} "
            f"(the VAE's spatial factor) from 0 to {tile_size - spatial_factor}"
        )
    return tile_size // spatial_factor, overlap // spatial_factor


def decode_tiles(
    vae, latent: torch.Tensor, tile_size: int = 0, overlap: int | None = None, clamp: bool = True,
    device: torch.device | None = None,
) -> tuple[TileRun, TileGrid | None]:
    """How ``decode_tiled`` decodes ``latent [B,z,T',h,w]``: the per-tile decode (each tile moved to ``device`` in
    the VAE's dtype, default: where the VAE is) and the tile grid in latent units (None: one tile, untiled). Checks
    ``tile_size`` and ``overlap`` (one-line errors) before any work."""
    sf = vae.config.spatial_factor
    parameter = next(vae.parameters())
    device = parameter.device if device is None else device
    tile_size = auto_tile_size(tile_size, latent.shape[3] * sf, latent.shape[4] * sf, sf)

    def run(piece: torch.Tensor, progress: ChunkCallback | None) -> torch.Tensor:
        return vae.decode(piece.to(device=device, dtype=parameter.dtype), on_chunk=progress, clamp=clamp)

    if tile_size == 0:
        return run, None
    tile, overlap = _unit_tiles(tile_size, overlap, sf)
    grid = TileGrid(latent.shape[3], latent.shape[4], tile, overlap)
    return run, grid if len(grid) > 1 else None


def decode_tiled(
    vae, latent: torch.Tensor, tile_size: int = 0, overlap: int | None = None, on_chunk: ChunkCallback | None = None,
    clamp: bool = True, device: torch.device | None = None, out_device: torch.device | None = None,
) -> torch.Tensor:
    """``vae.decode`` (a ``WanVAE``) in spatial tiles: latent ``[B,z,T',h,w]`` -> video ``[B,3,T,h*sf,w*sf]``.
    ``tile_size`` and ``overlap`` are in pixels (multiples of ``sf``; 0: auto, see ``auto_tile_size``; overlap
    None: ``default_overlap``). Each tile is moved to ``device`` in the VAE's dtype (default: where the VAE
    is). Untiled: exactly ``vae.decode``; tiled: fp32 on ``out_device`` (default: the latent's)."""
    run, grid = decode_tiles(vae, latent, tile_size, overlap, clamp, device)
    if grid is None:
        return run(latent, on_chunk)
    return run_grid(run, latent, grid, 1, vae.config.spatial_factor, on_chunk, out_device)


def encode_tiled(
    vae, video: torch.Tensor, tile_size: int = 0, overlap: int | None = None, on_chunk: ChunkCallback | None = None,
    device: torch.device | None = None, out_device: torch.device | None = None,
) -> torch.Tensor:
    """``vae.encode`` (a ``WanVAE``) in spatial tiles: video ``[B,3,T,H,W]`` (sides multiples of ``sf``) ->
    latent ``[B,z,T',H/sf,W/sf]``; the arguments as for ``decode_tiled``."""
    sf = vae.config.spatial_factor
    parameter = next(vae.parameters())
    device = parameter.device if device is None else device
    height, width = video.shape[3:]
    if height % sf or width % sf:
        raise ValueError(f"encode needs a height and width that are multiples of {sf}, got {height}x{width}")
    tile_size = auto_tile_size(tile_size, height, width, sf)

    def run(piece: torch.Tensor, progress: ChunkCallback | None) -> torch.Tensor:
        return vae.encode(piece.to(device=device, dtype=parameter.dtype), on_chunk=progress)

    if tile_size == 0:
        return run(video, on_chunk)
    tile, overlap = _unit_tiles(tile_size, overlap, sf)
    return run_tiled(run, video, tile, overlap, sf, 1, on_chunk, out_device)
