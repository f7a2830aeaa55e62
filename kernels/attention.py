"""Attention forward: softmax(q k^T / sqrt(D)) v, optionally with 3D RoPE applied to q and k first.

Shapes: q ``[B, H, Sq, D]``, k/v ``[B, H, Sk, D]``; ``key_mask`` ``[B, Sk]`` bool (True = attend);
``rope`` a pair ``(cos, sin)`` of ``[Sq, D/2]`` tables applied to consecutive pairs (x[2i], x[2i+1]) of
q and k (Wan's complex-number layout; requires Sq == Sk). Accumulation is fp32; output has q's dtype.

This file holds the pure-PyTorch reference ``attention_ref`` (the CPU path, the test oracle and the
benchmark baseline). The fused Triton kernel is added beside it by the Triton hot-path issue.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of ``x [..., S, D]`` by angles with ``cos/sin [S, D/2]``."""
    x_pairs = x.float().unflatten(-1, (-1, 2))  # [..., S, D/2, 2]
    x_even, x_odd = x_pairs.unbind(-1)  # [..., S, D/2] each
    rotated_even = x_even * cos - x_odd * sin
    rotated_odd = x_even * sin + x_odd * cos
    return torch.stack((rotated_even, rotated_odd), dim=-1).flatten(-2).to(x.dtype)  # [..., S, D]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference attention. q ``[B,H,Sq,D]``, k/v ``[B,H,Sk,D]`` -> ``[B,H,Sq,D]``."""
    if rope is not None:
        cos, sin = rope
        q = apply_rope_ref(q, cos, sin)
        k = apply_rope_ref(k, cos, sin)
    attn_mask = None
    if key_mask is not None:
        attn_mask = key_mask[:, None, None, :].to(torch.bool)  # [B,1,1,Sk]
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return out.to(q.dtype)
