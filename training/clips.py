"""Training clips for the built-in model: pools of procedural clips (``procedural.py``) as arrays, their
conversion to the VAE's video tensors, and crops around each clip's shape.

Pools are deterministic from their seed: clip ``i`` of pool ``seed`` is ``sample_spec(seed * 1_000_003 + i)``.
"""
from __future__ import annotations

import numpy as np
import torch

from .procedural import render, sample_spec

FRAMES, SIZE = 17, 64  # the workflows' clips: 64x64, 17 frames
# (height, width, frames) of the DiT's training clips, one per chunk of 64 clips in turn: half at the
# workflows' 64x64x17, the rest at other sizes, aspect ratios (21:9 to 4:7) and lengths, so that the model
# draws at any size (Sora's native-size training); BENCHMARKS.md has what training at 64x64x17 alone did.
DIT_SIZES = ((64, 64, 17), (64, 96, 9), (64, 64, 17), (96, 64, 13), (64, 64, 17), (80, 80, 17), (64, 64, 17),
             (48, 112, 9), (64, 64, 17), (112, 64, 17))


def render_pool(count: int, seed: int, held_out: bool = False, frames: int = FRAMES, height: int = SIZE,
                width: int = SIZE) -> tuple[np.ndarray, list]:
    """uint8 clips ``[N, T, H, W, 3]`` and their specs (training clips, or held-out ones with ``held_out``)."""
    clips, _, specs = render_pool_with_coverage(count, seed, held_out, frames, height, width)
    return clips, specs


def render_pool_with_coverage(count: int, seed: int, held_out: bool = False, frames: int = FRAMES, height: int = SIZE,
                              width: int = SIZE):
    """uint8 clips ``[N, T, H, W, 3]``, the shape's coverage ``[N, T, H, W]`` (0..1) and the specs."""
    specs = [sample_spec(seed * 1_000_003 + i, held_out) for i in range(count)]
    coverage = np.empty((count, frames, height, width), np.float32)
    clips = np.stack([(render(spec, frames, width, coverage[i], height=height) * 255).round().astype(np.uint8)
                      for i, spec in enumerate(specs)])
    return clips, coverage, specs


def to_video(clips: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, T, H, W, 3]`` -> float ``[N, 3, T, H, W]`` in -1..1."""
    return torch.from_numpy(clips).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3).contiguous()


def object_crops(pool: np.ndarray, coverage: np.ndarray, index: np.ndarray, frame: int, generator: torch.Generator, crop: int = 32,
                 frames: int = 1):
    """One ``crop`` x ``crop`` crop of ``frames`` frames from ``frame`` per clip of ``index``, around the
    clip's shape in the middle one of those frames (jittered by up to 8 pixels, corners on the VAE's
    8-pixel grid): uint8 pixels ``[N, frames, crop, crop, 3]`` and the shape's coverage."""
    pixels, covered = [], []
    for i in index:
        ys, xs = np.nonzero(coverage[i, frame + frames // 2] > 0.5)
        cy, cx = (ys.mean(), xs.mean()) if len(ys) else (SIZE / 2, SIZE / 2)
        jy, jx = (int(v) for v in torch.randint(-8, 9, (2,), generator=generator))
        top = int(np.clip(round((cy - crop / 2 + jy) / 8) * 8, 0, SIZE - crop))
        left = int(np.clip(round((cx - crop / 2 + jx) / 8) * 8, 0, SIZE - crop))
        pixels.append(pool[i, frame: frame + frames, top: top + crop, left: left + crop])
        covered.append(coverage[i, frame: frame + frames, top: top + crop, left: left + crop])
    return np.stack(pixels), np.stack(covered)
