"""Packed variable-length attention (NaViT "patch n' pack"): several sequences of different lengths laid
end to end, attention block-diagonal (no token attends across sequences, no work on padding).

Shapes (flash-attn's varlen convention): q ``[total_q, H, D]``, k/v ``[total_k, H, D]``;
``cu_seqlens_q``/``cu_seqlens_k`` int ``[N+1]`` cumulative lengths (sequence i owns tokens
``cu[i]:cu[i+1]``); ``max_seqlen_q``/``max_seqlen_k`` python ints at least the longest sequence (they
size the launch grid, so no device sync is needed). q and k arrive rotated (each video's own 3D RoPE
positions, applied per packed token by ``rms_norm_rope``). Output ``[total_q, H, D]`` in q's dtype.

The kernel is the dense one in ``attention.py`` with ``IS_VARLEN``: each program reads its sequence's
start and length from ``cu_seqlens`` and programs past a short sequence's end exit at once.
Limits as for dense attention: head dim 64/128, fp16/bf16/fp32, non-causal, no key mask (there is no
padding to mask: each sequence's keys are exactly its own), forward only.
"""
from __future__ import annotations

import torch

from ._triton import can_launch, check_supported, register_op, require_triton
from .attention import attention_ref, check_attention_out, launch_attention, qkv_unsupported


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> torch.Tensor:
    """Reference: ``attention_ref`` on each sequence alone. q ``[total_q,H,D]``, k/v ``[total_k,H,D]`` ->
    ``[total_q,H,D]``."""
    bounds_q = [int(i) for i in cu_seqlens_q.tolist()]
    bounds_k = [int(i) for i in cu_seqlens_k.tolist()]
    _check_bounds(bounds_q, bounds_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    out = torch.empty_like(q)
    for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        seq_q = q[q0:q1].transpose(0, 1)[None]  # [1, H, Sq_i, D]
        seq_k = k[k0:k1].transpose(0, 1)[None]
        seq_v = v[k0:k1].transpose(0, 1)[None]
        seq_out = attention_ref(seq_q, seq_k, seq_v)
        out[q0:q1] = seq_out[0].transpose(0, 1)
    return out


def _check_bounds(
    bounds_q: list[int], bounds_k: list[int], total_q: int, total_k: int, max_seqlen_q: int, max_seqlen_k: int
) -> None:
    if len(bounds_q) != len(bounds_k) or len(bounds_q) < 1 or bounds_q[0] != 0 or bounds_k[0] != 0:
        raise ValueError(f"cu_seqlens must both start at 0 and have one length, got q {bounds_q}, k {bounds_k}")
    if bounds_q[-1] != total_q or bounds_k[-1] != total_k:
        raise ValueError(f"cu_seqlens must end at the token counts (q {total_q}, k {total_k}), got {bounds_q[-1]}, {bounds_k[-1]}")
    for bounds, longest, name in ((bounds_q, max_seqlen_q, "q"), (bounds_k, max_seqlen_k, "k")):
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"cu_seqlens_{name} must be non-decreasing, got {bounds}")
        if lengths and max(lengths) > longest:
            raise ValueError(f"max_seqlen_{name}={longest} is shorter than the longest sequence ({max(lengths)})")


def _attention_varlen_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    launch_attention(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return out


_attention_varlen_op = register_op("spacetime::attention_varlen", _attention_varlen_launch)


def _unsupported(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can: the one rule of
    ``attention_varlen_triton`` (which raises it) and ``attention_varlen`` (which then takes the reference).
    Shapes and dtypes only, never the values of ``cu_seqlens`` (that would need a device sync)."""
    if reason := qkv_unsupported(q, k, v):
        return reason
    if q.dim() != 3 or k.dim() != 3 or q.shape[1] != k.shape[1]:
        return f"q must be [total_q,H,D] and k/v [total_k,H,D], got q {tuple(q.shape)}, k {tuple(k.shape)}"
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 1:
        return f"cu_seqlens must be 1-D [N+1] of one length, got q {tuple(cu_seqlens_q.shape)}, k {tuple(cu_seqlens_k.shape)}"
    if cu_seqlens_q.is_floating_point() or cu_seqlens_k.is_floating_point():
        return f"cu_seqlens must be integer, got {cu_seqlens_q.dtype}, {cu_seqlens_k.dtype}"
    return None


def attention_varlen_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused packed attention; shapes and contract in the module docstring. Checks shapes, not the values
    of ``cu_seqlens`` (that would need a device sync): they must be valid, as for flash-attn. Writes into
    ``out`` (q's shape, unit-stride head dim) when given: an eager launch, for tests and benchmarks."""
    require_triton()
    check_supported("attention_varlen_triton", _unsupported(q, k, v, cu_seqlens_q, cu_seqlens_k))
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is not None:
        check_attention_out("attention_varlen_triton", out, q)
        launch_attention(q, k, v, out, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k))
        return out
    return _attention_varlen_op(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k))


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> torch.Tensor:
    """The backend's packed attention: the Triton kernel where it applies, ``attention_varlen_ref``
    elsewhere (CPU tensors outside the interpreter, other head dims, mixed dtypes, malformed shapes, which
    the reference then reports)."""
    if can_launch(q) and _unsupported(q, k, v, cu_seqlens_q, cu_seqlens_k) is None:
        return attention_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
