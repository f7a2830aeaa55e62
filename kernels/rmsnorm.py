"""RMSNorm with weight: ``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, statistics in fp32.

Wan applies it to q and k over all heads at once (last dim = hidden size). This file holds the
pure-PyTorch reference; the Triton kernel is added beside it by the Triton hot-path issue.
"""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x ``[..., C]``, weight ``[C]`` -> ``[..., C]`` in x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)
