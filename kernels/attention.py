"""Attention forward: softmax(q k^T / sqrt(D)) v, optionally with 3D RoPE applied to q and k first.

Shapes: q ``[B, H, Sq, D]``, k/v ``[B, H, Sk, D]``; ``rope`` a pair ``(cos, sin)`` of ``[Sq, D/2]``
tables applied to consecutive pairs (x[2i], x[2i+1]) of q and k (Wan's complex-number layout; requires
Sq == Sk). Accumulation is fp32; output has q's dtype. The packed variable-length form (``[total, H, D]``
with ``cu_seqlens``) is in ``attention_varlen.py`` and runs the same kernel.
No key mask: every key is attended. Cross-attention reads the text context zero-padded to its fixed
length and unmasked, as Wan 2.1's original code, diffusers' WanPipeline and ComfyUI do; sequences of
different lengths are packed (``attention_varlen``), not padded and masked.

The Triton kernel is a FlashAttention-2 style forward (Dao 2023; Triton tutorial 06-fused-attention):
one program per (query block, batch x head) streams key/value blocks through an online softmax, so
the Sq x Sk score matrix never exists in memory. Fused in:
- RoPE: q and k are loaded as their even and odd halves, rotated in fp32 registers with the per-token
  (cos, sin) rows, and the score is ``q_even.k_even + q_odd.k_odd`` (two dots of width D/2, the same
  flops as one of width D): rotated q/k never round-trip through memory, nothing is re-interleaved.
- Ragged lengths: keys past the sequence's end (in a partial last tile) score -inf; a query row with
  no key to attend (a packed sequence of no keys) returns zeros, as torch SDPA (the reference) does.
- Packing: with ``cu_seqlens`` each program finds its sequence's start and length, so sequences never
  attend across each other and no work is spent on padding.
Limits: head dim 64 or 128 (others go to ``attention_ref``); fp16/bf16 (tensor-core dots, fp32
accumulation) and fp32 (IEEE dots: accepted, not fast); q, k, v of one dtype; head dim unit-stride;
non-causal; forward only (no autograd).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ._triton import (
    autotuned,
    can_launch,
    cdiv,
    check_supported,
    dtype_supported,
    interpreting,
    jit,
    launchable,
    load_triton,
    next_power_of_2,
    register_op,
    require_triton,
    tl,
)

HEAD_DIMS = (64, 128)
INTERPRET_BLOCK = 16  # the interpreter's fixed tile: small, so CPU tests stay fast


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
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference attention. q ``[B,H,Sq,D]``, k/v ``[B,H,Sk,D]`` -> ``[B,H,Sq,D]``."""
    if rope is not None:
        cos, sin = rope
        q = apply_rope_ref(q, cos, sin)
        k = apply_rope_ref(k, cos, sin)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return out.to(q.dtype)


@jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    cos_ptr, sin_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, num_heads,
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_out_b, stride_out_h, stride_out_s,
    stride_rope_s,
    qk_scale,
    seq_bucket_q, seq_bucket_k,  # powers of two of the (max) lengths: autotune keys only
    HEAD_DIM: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)  # int64: offsets overflow int32 at 75K tokens x 40 heads
    h = (batch_head % num_heads).to(tl.int64)
    if IS_VARLEN:
        # packed: sequence b owns tokens [cu[b], cu[b+1]); the batch strides are 0
        q_start = tl.load(cu_seqlens_q_ptr + b).to(tl.int64)
        q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
        k_start = tl.load(cu_seqlens_k_ptr + b).to(tl.int64)
        k_len = tl.load(cu_seqlens_k_ptr + b + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    if block_m * BLOCK_M >= q_len:
        return  # the grid covers the longest sequence; shorter ones leave programs idle
    in_dtype = q_ptr.dtype.element_ty
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_half = tl.arange(0, HALF)
    row_ok = offs_m < q_len
    q_base = q_ptr + b * stride_q_b + h * stride_q_h + q_start * stride_q_s
    k_base = k_ptr + b * stride_k_b + h * stride_k_h + k_start * stride_k_s
    v_base = v_ptr + b * stride_v_b + h * stride_v_h + k_start * stride_v_s

    if HAS_ROPE:
        # rotate in fp32, then round to the input dtype as the reference's rotated q/k are
        q_rows = q_base + offs_m[:, None] * stride_q_s
        q_even = tl.load(q_rows + 2 * offs_half[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q_odd = tl.load(q_rows + 2 * offs_half[None, :] + 1, mask=row_ok[:, None], other=0.0).to(tl.float32)
        rope_q = (q_start + offs_m[:, None]) * stride_rope_s + offs_half[None, :]
        cos_q = tl.load(cos_ptr + rope_q, mask=row_ok[:, None], other=1.0)
        sin_q = tl.load(sin_ptr + rope_q, mask=row_ok[:, None], other=0.0)
        q_a = (q_even * cos_q - q_odd * sin_q).to(in_dtype)  # rotated even half [BLOCK_M, HALF]
        q_b = (q_even * sin_q + q_odd * cos_q).to(in_dtype)  # rotated odd half
        if UPCAST_DOT:
            q_a = q_a.to(tl.float32)
            q_b = q_b.to(tl.float32)
    else:
        q_a = tl.load(q_base + offs_m[:, None] * stride_q_s + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        q_b = q_a  # unused
        if UPCAST_DOT:
            q_a = q_a.to(tl.float32)

    # online softmax in base 2: scores carry log2(e)/sqrt(D), so exp2 replaces exp
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < k_len
        if HAS_ROPE:
            k_rows = k_base + offs_n[:, None] * stride_k_s
            k_even = tl.load(k_rows + 2 * offs_half[None, :], mask=col_ok[:, None], other=0.0).to(tl.float32)
            k_odd = tl.load(k_rows + 2 * offs_half[None, :] + 1, mask=col_ok[:, None], other=0.0).to(tl.float32)
            rope_k = (k_start + offs_n[:, None]) * stride_rope_s + offs_half[None, :]
            cos_k = tl.load(cos_ptr + rope_k, mask=col_ok[:, None], other=1.0)
            sin_k = tl.load(sin_ptr + rope_k, mask=col_ok[:, None], other=0.0)
            k_a = (k_even * cos_k - k_odd * sin_k).to(in_dtype)
            k_b = (k_even * sin_k + k_odd * cos_k).to(in_dtype)
            if UPCAST_DOT:
                k_a = k_a.to(tl.float32)
                k_b = k_b.to(tl.float32)
            scores = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
            scores += tl.dot(q_b, tl.trans(k_b), input_precision=DOT_PRECISION)
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_k_s + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            if UPCAST_DOT:
                k = k.to(tl.float32)
            scores = tl.dot(q_a, tl.trans(k), input_precision=DOT_PRECISION)
        scores = tl.where(col_ok[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # a row whose scores so far are all -inf has m_new = -inf: subtract 0 instead (exp2(-inf) = 0, not NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)  # rescales what was accumulated under the old maximum
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_v_s + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if UPCAST_DOT:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i == 0: no key to attend, output zeros
    out_base = out_ptr + b * stride_out_b + h * stride_out_h + q_start * stride_out_s
    tl.store(out_base + offs_m[:, None] * stride_out_s + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip


def attention_configs() -> list:
    """Tile shapes tried by the CUDA autotuner (before pruning)."""
    return [
        load_triton().Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m in (64, 128)
        for block_n in (32, 64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]


SHARED_MEMORY_BUDGET = 160 * 1024  # bytes; under the ~228 KB of H100 and ~164 KB of A100 per block


def prune_attention_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Keep tiles that fit and can help: K/V stages within shared memory; 128-key tiles only at head dim 64
    (at 128 the score and accumulator tiles spill registers); 8 warps only for 128-row tiles; no tile
    taller or wider than the (bucketed) sequence lengths."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    elem = named_args["q_ptr"].element_size()
    bucket_q = max(named_args["seq_bucket_q"], 64)
    bucket_k = max(named_args["seq_bucket_k"], 32)
    kept = []
    for config in configs:
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        shared = (config.num_stages * 2 * block_n + block_m) * head_dim * elem
        if shared > SHARED_MEMORY_BUDGET or block_m > bucket_q or block_n > bucket_k:
            continue
        if head_dim == 128 and block_n == 128:
            continue
        if (config.num_warps == 8) != (block_m == 128):
            continue
        kept.append(config)
    return kept or [configs[0]]


@functools.lru_cache(maxsize=None)
def _tuned_kernel():
    key = ["seq_bucket_q", "seq_bucket_k", "HEAD_DIM", "IS_VARLEN", "HAS_ROPE"]
    return autotuned(_attention_fwd_kernel, attention_configs(), key=key, prune=prune_attention_configs)


def launch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    """Run the kernel on already-checked inputs, as 4D ``[B,H,S,D]`` (dense: cu_seqlens None) or 3D
    ``[total,H,D]`` (packed). Writes ``out`` (same layout as q)."""
    packed = cu_seqlens_q is not None
    if packed:
        batch, num_heads, head_dim = cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
        # [total, H, D]: token stride is dim 0; no batch stride (sequences are found via cu_seqlens)
        strides = [(0, t.stride(1), t.stride(0)) for t in (q, k, v, out)]
    else:
        batch, num_heads, head_dim = q.shape[0], q.shape[1], q.shape[3]
        strides = [(t.stride(0), t.stride(1), t.stride(2)) for t in (q, k, v, out)]
    if batch == 0 or max_seqlen_q == 0:
        return
    dummy = q  # stands in for absent optional pointers; never read (the matching HAS_* is False)
    interpret = interpreting()
    args = [
        q, k, v, out,
        cos if cos is not None else dummy, sin if sin is not None else dummy,
        cu_seqlens_q if packed else dummy, cu_seqlens_k if packed else dummy,
        max_seqlen_q, max_seqlen_k, num_heads,
        *strides[0], *strides[1], *strides[2], *strides[3],
        cos.stride(0) if cos is not None else 0,
        math.log2(math.e) / math.sqrt(head_dim),
        next_power_of_2(max_seqlen_q), next_power_of_2(max_seqlen_k),
    ]  # fmt: skip
    meta = dict(
        HEAD_DIM=head_dim,
        IS_VARLEN=packed,
        HAS_ROPE=cos is not None,
        # numpy has no bf16, so the interpreter's bf16 dot is wrong: dot in fp32 there (inputs are
        # still bf16 in memory and rounded as on the GPU); on the GPU bf16 runs on tensor cores
        UPCAST_DOT=interpret and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit dots
    )
    if interpret:
        grid = (cdiv(max_seqlen_q, INTERPRET_BLOCK), batch * num_heads)
        launchable(_attention_fwd_kernel)[grid](*args, **meta, BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK)
    else:

        def grid(config):
            return (cdiv(max_seqlen_q, config["BLOCK_M"]), batch * num_heads)

        launchable(_tuned_kernel())[grid](*args, **meta)


def qkv_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot take q, k, v (head dim, dtypes, devices, k/v shapes), or None: the part of the
    rule shared by the dense and packed forms; each adds its layout and RoPE checks."""
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        return f"head dim must be one of {HEAD_DIMS}, got {head_dim}"
    if not (q.dtype == k.dtype == v.dtype) or not dtype_supported(q.dtype):
        return f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
    if k.shape != v.shape or k.shape[-1] != head_dim:
        return f"k and v must have one shape with q's head dim, got k {tuple(k.shape)}, v {tuple(v.shape)}"
    return None


def rope_unsupported(rope: tuple[torch.Tensor, torch.Tensor] | None, tokens: int, head_dim: int) -> str | None:
    """Why the kernel cannot take the RoPE tables for ``tokens`` tokens, or None (also when there are none)."""
    if rope is None:
        return None
    cos, sin = rope
    if cos.shape != (tokens, head_dim // 2) or sin.shape != cos.shape:
        return f"rope tables must be [{tokens}, {head_dim // 2}], got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
    return None


def check_attention_out(op: str, out: torch.Tensor, q: torch.Tensor) -> None:
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"{op}: out must be {q.dtype} {tuple(q.shape)} on {q.device} with a unit-stride last dim, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} with strides {out.stride()}"
        )


def rope_tables(rope: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device):
    """``(cos, sin)`` (already checked by the op's rule) as fp32 on ``device`` with a unit-stride last dim,
    or ``(None, None)``."""
    if rope is None:
        return None, None
    cos, sin = rope
    return (cos.to(device=device, dtype=torch.float32).contiguous(), sin.to(device=device, dtype=torch.float32).contiguous())


def _attention_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> torch.Tensor:
    batch, num_heads, seqlen_q, head_dim = q.shape
    # [B,H,Sq,D] values in [B,Sq,H,D] memory: the model's "b h s d -> b s (h d)" is then a free view
    out = torch.empty((batch, seqlen_q, num_heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    launch_attention(q, k, v, out, cos, sin, None, None, seqlen_q, k.shape[2])
    return out


_attention_op = register_op("spacetime::attention", _attention_launch)


def _unsupported(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can: the one rule of ``attention_triton``
    (which raises it) and ``attention`` (which then takes the reference)."""
    if reason := qkv_unsupported(q, k, v):
        return reason
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2]:
        return f"q must be [B,H,Sq,D] and k/v [B,H,Sk,D], got q {tuple(q.shape)}, k {tuple(k.shape)}"
    seqlen_q, seqlen_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    if rope is not None and seqlen_q != seqlen_k:
        return f"rope needs self-attention (Sq == Sk), got Sq={seqlen_q}, Sk={seqlen_k}"
    return rope_unsupported(rope, seqlen_q, head_dim)


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused attention over every key (no mask). q ``[B,H,Sq,D]``, k/v ``[B,H,Sk,D]`` (any strides with a
    unit-stride head dim), ``rope`` ``(cos, sin)`` ``[Sq, D/2]`` (needs Sq == Sk) -> ``[B,H,Sq,D]`` in q's
    dtype (stored as ``[B,Sq,H,D]`` memory); written into ``out`` (q's shape, unit-stride head dim) when
    given: an eager launch, for tests and benchmarks."""
    require_triton()
    check_supported("attention_triton", _unsupported(q, k, v, rope))
    cos, sin = rope_tables(rope, q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is not None:
        check_attention_out("attention_triton", out, q)
        launch_attention(q, k, v, out, cos, sin, None, None, q.shape[2], k.shape[2])
        return out
    return _attention_op(q, k, v, cos, sin)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The backend's attention: the Triton kernel where it applies, ``attention_ref`` elsewhere (CPU tensors
    outside the interpreter, head dims other than 64/128, mixed or unsupported dtypes, malformed inputs,
    which the reference then reports)."""
    if can_launch(q) and _unsupported(q, k, v, rope) is None:
        return attention_triton(q, k, v, rope)
    return attention_ref(q, k, v, rope)
