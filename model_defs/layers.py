"""Layers shared by the model families: patchify/unpatchify, sinusoidal timestep embedding and 3D RoPE
tables.

Sources: Wan 2.1 (`wan/modules/model.py`) for the cos-first timestep embedding and the split of the
rotary dimensions between time, height and width; RoFormer (Su et al., 2021) for rotary embeddings.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from einops import rearrange


def config_from_dict(cls, data: dict):
    """A frozen config dataclass from its ``asdict`` form (JSON turns tuples into lists; unknown keys are
    an error naming the allowed ones)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; allowed: {sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def patchify(latent: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """latent ``[..., C, F, H, W]`` -> patch vectors ``[..., F'*H'*W', pt*ph*pw*C]`` in (f, h, w) raster order
    (the order of the DiT's tokens and of its head's output)."""
    pt, ph, pw = patch_size
    return rearrange(latent, "... c (f p) (h q) (w r) -> ... (f h w) (p q r c)", p=pt, q=ph, r=pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """patch vectors ``[..., F'*H'*W', pt*ph*pw*C]`` -> ``[..., C, F, H, W]`` (the inverse of ``patchify``)."""
    pt, ph, pw = patch_size
    f, h, w = grid
    return rearrange(tokens, "... (f h w) (p q r c) -> ... c (f p) (h q) (w r)", f=f, h=h, w=w, p=pt, q=ph, r=pw)


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """timesteps ``[N]`` (any float scale) -> ``[N, dim]`` fp32 as ``cat(cos, sin)`` (Wan's order)."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float64, device=timesteps.device) / half
    freqs = torch.pow(max_period, -exponents)  # [half]
    angles = torch.outer(timesteps.to(torch.float64), freqs)  # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()  # [N, dim]


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How many rotary pairs go to (time, height, width) for one head: Wan gives height and width
    ``(D/2)//3`` pairs each and time the rest."""
    pairs = head_dim // 2
    spatial = pairs // 3
    return pairs - 2 * spatial, spatial, spatial


def _axis_angles(positions: torch.Tensor, num_pairs: int, theta: float) -> torch.Tensor:
    """positions ``[S]`` -> angles ``[S, num_pairs]`` with frequencies ``theta^(-2i/(2*num_pairs))``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, 2 * num_pairs, 2, dtype=torch.float64) / (2 * num_pairs))
    return torch.outer(positions.to(torch.float64), inv_freq.to(positions.device))


@functools.lru_cache(maxsize=8)
def rope_3d_tables(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) ``[F*H*W, head_dim/2]`` fp32 for tokens in (f, h, w) raster order. Cached: every
    sampling step of a video asks for the same tables (callers must not modify them)."""
    with torch.inference_mode(False):  # cached tables must stay usable by a later autograd pass
        return _rope_3d_tables(grid, head_dim, theta, device)


def _rope_3d_tables(grid, head_dim, theta, device):
    frames, height, width = grid
    t_pairs, h_pairs, w_pairs = rope_axis_dims(head_dim)
    f_idx = torch.arange(frames, device=device)
    h_idx = torch.arange(height, device=device)
    w_idx = torch.arange(width, device=device)
    angles = torch.cat(
        [
            _axis_angles(f_idx, t_pairs, theta)[:, None, None, :].expand(frames, height, width, t_pairs),
            _axis_angles(h_idx, h_pairs, theta)[None, :, None, :].expand(frames, height, width, h_pairs),
            _axis_angles(w_idx, w_pairs, theta)[None, None, :, :].expand(frames, height, width, w_pairs),
        ],
        dim=-1,
    ).reshape(frames * height * width, head_dim // 2)  # [S, D/2]
    return torch.cos(angles).float(), torch.sin(angles).float()
