"""Fused AdaLN modulation and gated residual.

``layer_norm_modulate``: LayerNorm without affine over the last dim, then ``x * (1 + scale) + shift``;
``shift``/``scale`` broadcast against ``x [B, S, C]`` as ``[B, 1, C]`` (per sample), or ``[B, S, C]``
(per token; per-frame modulation is expanded to per-token by the caller). Statistics in fp32.
``gated_residual``: ``x + gate * y`` with ``gate`` broadcast the same way.

This file holds the pure-PyTorch references; the Triton kernels are added beside them by the Triton
hot-path issue.
"""
from __future__ import annotations

import torch


def layer_norm_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift``; x ``[B,S,C]``, shift/scale ``[B,1,C]`` or ``[B,S,C]``."""
    x32 = x.float()
    mean = x32.mean(dim=-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(dim=-1, keepdim=True)
    normed = (x32 - mean) * torch.rsqrt(var + eps)
    return (normed * (1 + scale.float()) + shift.float()).to(x.dtype)


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``; x/y ``[B,S,C]``, gate ``[B,1,C]`` or ``[B,S,C]``."""
    return (x.float() + gate.float() * y.float()).to(x.dtype)
