"""How a DiT's tokens are laid out, and what that means for its blocks: one ``WanBlock`` runs either.

- ``DenseLayout``: videos of one size as a batch ``x [B, S, C]``; modulation per sample ``[B, C]``
  broadcast over the tokens (or per latent frame ``[B*F', C]``, expanded to the frame's tokens);
  attention over ``[B, H, S, D]`` with the grid's 3D RoPE.
- ``PackedLayout`` (NaViT's "patch n' pack", Dehghani et al. 2023): the spacetime patches of several
  videos of different sizes end to end as one sequence ``x [1, T, C]``, each video's result the same as
  alone. Self-attention is block-diagonal through the backend's varlen attention (``cu_seqlens``): no
  token attends across videos, no work on padding, and each video carries the 3D RoPE positions of its
  own grid. Cross-attention is varlen too: sequence i's tokens attend to sequence i's text only.
  Modulation is computed per sequence ``[N, C]`` and gathered to that sequence's tokens ``[1, T, C]`` one
  chunk at a time, right where it is used (the kernels take per-token shift/scale/gate), so the extra
  memory is two fp32 activations at most, never the six.

Modulation rows: one per sample/sequence, or one per latent frame when timesteps differ between frames
(Wan 2.2 TI2V holds a known first frame at timestep 0 while the rest is denoised: per-token timesteps,
which for every use the pack has are per-frame ones).

A layout answers four questions for a block: ``per_token(rows [N, C])`` (modulation broadcast to
``x``), ``rope`` (the self-attention's RoPE tables ``(cos, sin)`` ``[S or T, D/2]``, applied to q and k once,
in their norm), ``self_attention(q, k, v, heads)`` and ``cross_attention(q, k, v, heads)`` (q/k/v
``[.., S, C]`` after the projections and q/k norms, q/k already rotated for self-attention -> attention
output ``[.., S, C]`` before the output projection).
Shapes: T packed video tokens; Tk packed text tokens; C model width; H heads, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from einops import rearrange

from ..kernels import KernelBackend
from .layers import rope_3d_tables


class TokenLayout(Protocol):
    """What a block asks of its layout (module docstring); ``DenseLayout`` and ``PackedLayout`` are the two."""

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def per_token(self, per_sample: torch.Tensor) -> torch.Tensor: ...

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor: ...

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class Pack:
    """Where each video sequence of a pack lives: sequence i owns tokens ``cu_seqlens[i]:cu_seqlens[i+1]``
    in (f, h, w) raster order of its patch grid ``grids[i]``."""

    grids: tuple[tuple[int, int, int], ...]
    cu_seqlens: torch.Tensor  # [N+1] int32
    max_seqlen: int
    token_sequence: torch.Tensor  # [T] long: the sequence each token belongs to
    token_frame: torch.Tensor  # [T] long: the latent frame each token belongs to, numbered across the pack
    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [T, D/2] fp32, each sequence's own positions

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(f * h * w for f, h, w in self.grids)

    @property
    def num_sequences(self) -> int:
        return len(self.grids)

    @property
    def num_frames(self) -> int:
        """Latent frames (patch-grid frames) of all sequences together."""
        return sum(grid[0] for grid in self.grids)


@dataclass(frozen=True, eq=False)
class PackedText:
    """Every sequence's text context end to end: sequence i's keys are ``tokens[cu_seqlens[i]:cu_seqlens[i+1]]``."""

    tokens: torch.Tensor  # [Tk, text_dim]
    cu_seqlens: torch.Tensor  # [N+1] int32
    max_seqlen: int


def _cumulative(lengths: Sequence[int], device) -> torch.Tensor:
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + int(length))
    return torch.tensor(bounds, dtype=torch.int32, device=device)  # [N+1]


def make_pack(grids: Sequence[tuple[int, int, int]], head_dim: int, device: torch.device | str) -> Pack:
    """The layout of sequences with patch grids ``grids`` (F', H', W'), in that order."""
    grids = tuple(tuple(int(n) for n in grid) for grid in grids)
    if not grids or any(min(grid) < 1 for grid in grids):
        raise ValueError(f"a pack needs at least one sequence, each with a non-empty patch grid; got {list(grids)}")
    lengths = [f * h * w for f, h, w in grids]
    device = torch.device(device)
    tables = [rope_3d_tables(grid, head_dim, device=device) for grid in grids]  # cached per grid, as the dense forward's
    cos = torch.cat([table[0] for table in tables])  # [T, D/2]
    sin = torch.cat([table[1] for table in tables])  # [T, D/2]
    counts = torch.tensor(lengths, device=device)
    token_sequence = torch.repeat_interleave(torch.arange(len(grids), device=device), counts, output_size=sum(lengths))  # [T]
    frame_sizes = torch.tensor([h * w for f, h, w in grids for _ in range(f)], device=device)  # [sum F']
    token_frame = torch.repeat_interleave(torch.arange(frame_sizes.numel(), device=device), frame_sizes, output_size=sum(lengths))  # [T]
    return Pack(grids, _cumulative(lengths, device), max(lengths), token_sequence, token_frame, (cos, sin))


def pack_text(contexts: torch.Tensor) -> PackedText:
    """contexts ``[N, L, text_dim]`` (one row per sequence, zero-padded as the dense forward sees them) ->
    every row end to end."""
    if contexts.ndim != 3:
        raise ValueError(f"contexts must be [N, L, text_dim], got shape {tuple(contexts.shape)}")
    count, length = contexts.shape[:2]
    return PackedText(contexts.reshape(count * length, -1), _cumulative([length] * count, contexts.device), length)


@dataclass(frozen=True, eq=False)
class DenseLayout:
    """A batch of videos of one patch grid: x ``[B, S, C]``, RoPE tables ``[S, D/2]``; ``frame_grid`` (the
    patch grid) when modulation rows are per latent frame ``[B*F', C]`` instead of per sample ``[B, C]``."""

    backend: KernelBackend
    rope: tuple[torch.Tensor, torch.Tensor]
    frame_grid: tuple[int, int, int] | None = None

    def per_token(self, rows: torch.Tensor) -> torch.Tensor:
        if self.frame_grid is None:
            return rows[:, None, :]  # [B,C] -> [B,1,C]
        frames, height, width = self.frame_grid
        per_frame = rows.unflatten(0, (-1, frames))[:, :, None, :]  # [B,F',1,C]
        return per_frame.expand(-1, -1, height * width, -1).flatten(1, 2)  # [B,S,C], one chunk at a time

    def _attend(self, q, k, v, heads: int) -> torch.Tensor:
        q, k, v = (rearrange(t, "b s (h d) -> b h s d", h=heads) for t in (q, k, v))  # [B,H,S,D]
        return rearrange(self.backend.attention(q, k, v), "b h s d -> b s (h d)")  # [B,Sq,C]

    def self_attention(self, q, k, v, heads: int) -> torch.Tensor:
        return self._attend(q, k, v, heads)

    def cross_attention(self, q, k, v, heads: int) -> torch.Tensor:
        return self._attend(q, k, v, heads)


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """Sequences of different grids end to end: x ``[1, T, C]``, text ``[1, Tk, C]``; modulation rows per
    sequence ``[N, C]``, or per latent frame ``[pack.num_frames, C]`` with ``per_frame``."""

    backend: KernelBackend
    pack: Pack
    text: PackedText
    per_frame: bool = False

    def per_token(self, rows: torch.Tensor) -> torch.Tensor:
        owner = self.pack.token_frame if self.per_frame else self.pack.token_sequence  # [T]
        return rows.index_select(0, owner)[None]  # [N,C] -> [1,T,C]

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pack.rope  # [T, D/2]: each packed token's own position

    def _attend(self, q, k, v, heads: int, keys_cu, keys_max: int) -> torch.Tensor:
        q, k, v = (rearrange(t, "b t (h d) -> (b t) h d", h=heads) for t in (q, k, v))  # [T or Tk, H, D]
        pack = self.pack
        out = self.backend.attention_varlen(q, k, v, pack.cu_seqlens, keys_cu, pack.max_seqlen, keys_max)  # [T,H,D]
        return rearrange(out, "t h d -> 1 t (h d)")  # [1,T,C]

    def self_attention(self, q, k, v, heads: int) -> torch.Tensor:
        return self._attend(q, k, v, heads, self.pack.cu_seqlens, self.pack.max_seqlen)

    def cross_attention(self, q, k, v, heads: int) -> torch.Tensor:
        return self._attend(q, k, v, heads, self.text.cu_seqlens, self.text.max_seqlen)
