"""Attention that also returns the log-sum-exp of every query row's scores, and the merge of partial results.

What it is for: ring attention (``model_defs/parallel/ring.py``) attends a query block to one key/value block at a
time and combines the partial results exactly, as flash attention combines its tiles (Dao et al. 2022; Liu et al.
2023, "Ring Attention with Blockwise Transformers"): for key blocks j with partial outputs ``out_j`` (each
normalised over its own keys) and ``lse_j = log sum_k exp(q.k / sqrt(D))`` over block j's keys,

    lse = log sum_j exp(lse_j)        out = sum_j exp(lse_j - lse) * out_j

which is softmax attention over the union of the blocks. An empty key set gives ``lse = -inf`` and ``out = 0``,
and merging it changes nothing (``merge_attention`` never computes ``-inf - -inf``).

Shapes: dense q ``[B,H,Sq,D]``, k/v ``[B,H,Sk,D]`` -> out ``[B,H,Sq,D]``, lse ``[B,H,Sq]``; varlen (flash-attn's
packed convention, as ``attention_varlen``) q ``[Tq,H,D]``, k/v ``[Tk,H,D]``, ``cu_seqlens`` ``[N+1]`` -> out
``[Tq,H,D]``, lse ``[Tq,H]``. Accumulation, out and lse in fp32 (a ring merges them again; the caller casts
once at the end). Non-causal, no mask: a caller with padded keys slices them off (real tokens first).
The ``*_ref`` functions are pure PyTorch: the references and the CPU path; the scores of a block of queries are
materialised, so queries are taken a block at a time, at most ``SCORE_ELEMENTS`` scores (1 GiB fp32) and
``QUERY_CHUNK`` rows. ``attention_lse`` / ``attention_varlen_lse`` run the attention kernel (``attention.py``, the
FlashAttention-2 style forward) with its log-sum-exp stored, where it applies (CUDA or the interpreter, head dims
64/128), so a ring's blocks never materialise their scores; elsewhere the references.
"""
from __future__ import annotations

import math

import torch

from ._triton import can_launch
from .attention import _unsupported as _dense_unsupported
from .attention import launch_attention
from .attention_varlen import _unsupported as _varlen_unsupported

QUERY_CHUNK = 1024  # query rows per score block at most
SCORE_ELEMENTS = 2**28  # fp32 scores materialised at once at most (B*H*rows*Sk)


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and the log-sum-exp of each query row's scaled scores, fp32. q ``[B,H,Sq,D]``, k/v
    ``[B,H,Sk,D]`` (Sk may be 0) -> (out ``[B,H,Sq,D]``, lse ``[B,H,Sq]``)."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [B,H,Sq,D] and k, v [B,H,Sk,D] alike, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, queries, head_dim = q.shape
    out = q.new_zeros(batch, heads, queries, head_dim, dtype=torch.float32)
    lse = q.new_full((batch, heads, queries), -math.inf, dtype=torch.float32)
    if k.shape[2] == 0 or queries == 0:
        return out, lse  # no keys: nothing attended, the merge's neutral element
    keys_t = k.float().transpose(-1, -2)  # [B,H,D,Sk]
    values = v.float()  # [B,H,Sk,D]
    scale = head_dim**-0.5
    rows = max(1, min(QUERY_CHUNK, SCORE_ELEMENTS // (batch * heads * k.shape[2])))
    for start in range(0, queries, rows):
        stop = min(start + rows, queries)
        scores = torch.matmul(q[:, :, start:stop].float() * scale, keys_t)  # [B,H,c,Sk]
        row_lse = torch.logsumexp(scores, dim=-1)  # [B,H,c], finite: every score is finite
        out[:, :, start:stop] = torch.matmul(torch.exp(scores - row_lse[..., None]), values)  # [B,H,c,D]
        lse[:, :, start:stop] = row_lse
    return out, lse


def attention_varlen_lse_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_lse_ref`` on each packed sequence alone: q ``[Tq,H,D]``, k/v ``[Tk,H,D]``, cumulative lengths
    ``[N+1]`` (a sequence may have no keys, or no queries) -> (out ``[Tq,H,D]``, lse ``[Tq,H]``) fp32. The longest
    lengths ``max_seqlen_*`` (the kernel's launch sizes) are not needed here."""
    bounds_q = [int(i) for i in cu_seqlens_q.tolist()]
    bounds_k = [int(i) for i in cu_seqlens_k.tolist()]
    if len(bounds_q) != len(bounds_k) or bounds_q[0] or bounds_k[0] or bounds_q[-1] != q.shape[0] or bounds_k[-1] != k.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0, have one length and end at the token counts ({q.shape[0]}, "
                         f"{k.shape[0]}), got q {bounds_q}, k {bounds_k}")
    out = q.new_zeros(q.shape, dtype=torch.float32)  # [Tq,H,D]
    lse = q.new_full(q.shape[:2], -math.inf, dtype=torch.float32)  # [Tq,H]
    for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        if q1 == q0 or k1 == k0:
            continue
        seq_out, seq_lse = attention_lse_ref(*(t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1])))
        out[q0:q1] = seq_out[0].transpose(0, 1)  # [Sq_i,H,D]
        lse[q0:q1] = seq_lse[0].transpose(0, 1)  # [Sq_i,H]
    return out, lse


def merge_attention(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two key sets from the results over each: ``out``/``lse`` (None: nothing yet)
    and ``block_out``/``block_lse`` (lse of shape ``out.shape[:-1]``, fp32) -> the merged (out, lse). Rows with no
    keys in either set stay ``out = 0``, ``lse = -inf``."""
    if out is None:
        return block_out.float(), block_lse.float()
    merged = torch.logaddexp(lse, block_lse)  # -inf only where both are
    reference = merged.masked_fill(merged == -math.inf, 0.0)  # so exp(-inf - reference) = 0, never nan
    weight = torch.exp(lse - reference)[..., None]  # [..., 1]
    block_weight = torch.exp(block_lse - reference)[..., None]
    return out * weight + block_out.float() * block_weight, merged


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_lse_ref``'s contract (fp32 out and lse) through the Triton kernel where it applies; an empty key
    set, or inputs it cannot take, go to the reference."""
    if k.ndim == 4 and k.shape[2] > 0 and can_launch(q) and _dense_unsupported(q, k, v) is None:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # [B,H,Sq,D]
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)  # [B,H,Sq]
        launch_attention(q, k, v, out, None, None, q.shape[2], k.shape[2], lse)
        return out, lse
    return attention_lse_ref(q, k, v)


def attention_varlen_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_varlen_lse_ref``'s contract through the Triton kernel where it applies. ``max_seqlen_*``: the
    longest sequence (read from ``cu_seqlens`` when not given: a device sync)."""
    if k.shape[0] > 0 and can_launch(q) and _varlen_unsupported(q, k, v, cu_seqlens_q, cu_seqlens_k) is None:
        cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
        cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [Tq,H,D]: rows of no program stay 0
        lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)  # [Tq,H]
        launch_attention(q, k, v, out, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), lse)
        return out, lse
    return attention_varlen_lse_ref(q, k, v, cu_seqlens_q, cu_seqlens_k)
