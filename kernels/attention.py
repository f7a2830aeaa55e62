"""Attention forward: softmax(q k^T / sqrt(D)) v, a plain one: q and k arrive already rotated (3D RoPE is
applied once per token, fused into the q/k RMSNorm: ``rms_norm_rope.py``).

Shapes: q ``[B, H, Sq, D]``, k/v ``[B, H, Sk, D]``. Accumulation is fp32; output has q's dtype. The packed variable-length form (``[total, H, D]``
with ``cu_seqlens``) is in ``attention_varlen.py`` and runs the same kernel.
No key mask: every key is attended. Cross-attention reads the text context zero-padded to its fixed
length and unmasked, as Wan 2.1's original code, diffusers' WanPipeline and ComfyUI do; sequences of
different lengths are packed (``attention_varlen``), not padded and masked.

The Triton kernel is a FlashAttention-2 style forward (Dao 2023; Triton tutorial 06-fused-attention):
one program per (query block, batch x head) streams key/value blocks through an online softmax, so
the Sq x Sk score matrix never exists in memory. RoPE used to be fused in here, re-rotating every K tile
in every query-block program (a review counted ~590 rotations of each K per head at 75,600 tokens, plus
fp32 cos/sin streamed per key and stride-2 half loads); rotating once in the norm kernel removes all that.
Handled in the kernel:
- Ragged lengths: keys past the sequence's end (in a partial last tile) score -inf; a query row with
  no key to attend (a packed sequence of no keys) returns zeros, as torch SDPA (the reference) does.
- Packing: with ``cu_seqlens`` each program finds its sequence's start and length, so sequences never
  attend across each other and no work is spent on padding.
Limits: head dim 64 or 128 (others go to ``attention_ref``); fp16/bf16 (tensor-core dots, fp32
accumulation) and fp32 (IEEE dots: accepted, not fast); q, k, v of one dtype; head dim unit-stride;
non-causal; forward only (no autograd).
The reference runs torch SDPA in the input dtype, so on a GPU SDPA may take its flash / cuDNN backends.
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


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention: torch SDPA in the inputs' dtype (fp32 stays fp32; bf16/fp16 run SDPA's own
    fused backends, which accumulate in fp32). q ``[B,H,Sq,D]``, k/v ``[B,H,Sk,D]`` -> ``[B,H,Sq,D]``."""
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return F.scaled_dot_product_attention(q, k, v)


@jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, num_heads,
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_out_b, stride_out_h, stride_out_s,
    stride_lse_b, stride_lse_h, stride_lse_s,
    qk_scale,
    seq_bucket_q, seq_bucket_k,  # powers of two of the (max) lengths: autotune keys only
    HEAD_DIM: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_LSE: tl.constexpr,
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
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q_base = q_ptr + b * stride_q_b + h * stride_q_h + q_start * stride_q_s
    k_base = k_ptr + b * stride_k_b + h * stride_k_h + k_start * stride_k_s
    v_base = v_ptr + b * stride_v_b + h * stride_v_h + k_start * stride_v_s

    q = tl.load(q_base + offs_m[:, None] * stride_q_s + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # online softmax in base 2: scores carry log2(e)/sqrt(D), so exp2 replaces exp
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < k_len
        k = tl.load(k_base + offs_n[:, None] * stride_k_s + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
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
    if STORE_LSE:
        # log-sum-exp of the row's scores in natural units (ring attention merges partial results with it): the
        # scores carry log2(e), so log2 of the sum is m_i + log2(l_i), times ln 2; no key: -inf
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))) * 0.6931471805599453)
        lse_base = lse_ptr + b * stride_lse_b + h * stride_lse_h + q_start * stride_lse_s
        tl.store(lse_base + offs_m * stride_lse_s, lse, mask=row_ok)


# (BLOCK_M, BLOCK_N, warps, stages): a short list, because every distinct (length bucket, head dim) key
# autotunes once per process and each config costs a compile (~seconds): 128x128 / 8 warps is FlashAttention-2's
# head-dim-128 tile, 64-row tiles serve short or packed sequences, 32-wide keys short text contexts
ATTENTION_TILES = (
    (128, 128, 8, 2),
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (64, 128, 4, 2),
    (64, 64, 4, 3),
    (64, 32, 4, 4),
    (128, 32, 8, 4),
)


def attention_configs() -> list:
    """Tile shapes tried by the CUDA autotuner (before pruning)."""
    triton = load_triton()
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in ATTENTION_TILES
    ]


SHARED_MEMORY_BUDGET = 160 * 1024  # bytes, when the device does not say: under A100's ~164 KB per block


@functools.lru_cache(maxsize=None)
def shared_memory_budget(device_index: int) -> int:
    """Shared memory one block may use on that CUDA device (H100/H200: 227 KB; A100: 163 KB; RTX 4090: 99 KB)."""
    try:
        props = torch.cuda.get_device_properties(device_index)
        return int(getattr(props, "shared_memory_per_block_optin", 0)) or SHARED_MEMORY_BUDGET
    except (RuntimeError, AssertionError, AttributeError):
        return SHARED_MEMORY_BUDGET


def prune_attention_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Keep tiles that fit and can help: K/V stages within the device's shared memory; 8 warps only for
    128-row tiles; no tile taller or wider than the (bucketed) sequence lengths. Key tiles go to 128 wide
    at head dim 128 too: with RoPE gone from the loop the registers of a 128x128 score tile are free
    (FlashAttention-2's own head-dim-128 forward uses 128x128 tiles on H100); the autotuner drops any
    config that does not compile for lack of resources."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    q = named_args["q_ptr"]
    elem = q.element_size()
    budget = shared_memory_budget(q.device.index or 0) if q.device.type == "cuda" else SHARED_MEMORY_BUDGET
    bucket_q = max(named_args["seq_bucket_q"], 64)
    bucket_k = max(named_args["seq_bucket_k"], 32)
    kept = []
    for config in configs:
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        shared = (config.num_stages * 2 * block_n + block_m) * head_dim * elem
        if shared > budget or block_m > bucket_q or block_n > bucket_k:
            continue
        if (config.num_warps == 8) != (block_m == 128):
            continue
        kept.append(config)
    # nothing fits: the smallest tiles, which do wherever anything does
    return kept or [min(configs, key=lambda c: (c.num_stages * 2 * c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_M"]))]


@functools.lru_cache(maxsize=None)
def _tuned_kernel():
    key = ["seq_bucket_q", "seq_bucket_k", "HEAD_DIM", "IS_VARLEN"]
    return autotuned(_attention_fwd_kernel, attention_configs(), key=key, prune=prune_attention_configs)


def launch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    lse: torch.Tensor | None = None,
) -> None:
    """Run the kernel on already-checked inputs, as 4D ``[B,H,S,D]`` (dense: cu_seqlens None) or 3D
    ``[total,H,D]`` (packed). Writes ``out`` (same layout as q) and, when given, ``lse`` (fp32, ``[B,H,S]`` or
    ``[total,H]``): each query row's log-sum-exp of its scaled scores (``attention_lse``)."""
    packed = cu_seqlens_q is not None
    lse_or_out = out if lse is None else lse  # strides of an absent lse are never read (STORE_LSE is False)
    if packed:
        batch, num_heads, head_dim = cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
        # [total, H, D]: token stride is dim 0; no batch stride (sequences are found via cu_seqlens)
        strides = [(0, t.stride(1), t.stride(0)) for t in (q, k, v, out, lse_or_out)]
    else:
        batch, num_heads, head_dim = q.shape[0], q.shape[1], q.shape[3]
        strides = [(t.stride(0), t.stride(1), t.stride(2)) for t in (q, k, v, out, lse_or_out)]
    if batch == 0 or max_seqlen_q == 0:
        return
    dummy = q  # stands in for the absent cu_seqlens of the dense form; never read (IS_VARLEN is False)
    interpret = interpreting()
    args = [
        q, k, v, out, lse_or_out,
        cu_seqlens_q if packed else dummy, cu_seqlens_k if packed else dummy,
        max_seqlen_q, max_seqlen_k, num_heads,
        *strides[0], *strides[1], *strides[2], *strides[3], *strides[4],
        math.log2(math.e) / math.sqrt(head_dim),
        next_power_of_2(max_seqlen_q), next_power_of_2(max_seqlen_k),
    ]  # fmt: skip
    meta = dict(
        HEAD_DIM=head_dim,
        IS_VARLEN=packed,
        # numpy has no bf16, so the interpreter's bf16 dot is wrong: dot in fp32 there (inputs are
        # still bf16 in memory and rounded as on the GPU); on the GPU bf16 runs on tensor cores
        UPCAST_DOT=interpret and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit dots
        STORE_LSE=lse is not None,
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
    rule shared by the dense and packed forms; each adds its layout checks."""
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


def check_attention_out(op: str, out: torch.Tensor, q: torch.Tensor) -> None:
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"{op}: out must be {q.dtype} {tuple(q.shape)} on {q.device} with a unit-stride last dim, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} with strides {out.stride()}"
        )


def _attention_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    batch, num_heads, seqlen_q, head_dim = q.shape
    # [B,H,Sq,D] values in [B,Sq,H,D] memory: the model's "b h s d -> b s (h d)" is then a free view
    out = torch.empty((batch, seqlen_q, num_heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    launch_attention(q, k, v, out, None, None, seqlen_q, k.shape[2])
    return out


_attention_op = register_op("spacetime::attention", _attention_launch)


def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can: the one rule of ``attention_triton``
    (which raises it) and ``attention`` (which then takes the reference)."""
    if reason := qkv_unsupported(q, k, v):
        return reason
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2]:
        return f"q must be [B,H,Sq,D] and k/v [B,H,Sk,D], got q {tuple(q.shape)}, k {tuple(k.shape)}"
    return None


def attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused attention over every key (no mask). q ``[B,H,Sq,D]``, k/v ``[B,H,Sk,D]`` (any strides with a
    unit-stride head dim) -> ``[B,H,Sq,D]`` in q's dtype (stored as ``[B,Sq,H,D]`` memory); written into
    ``out`` (q's shape, unit-stride head dim) when given: an eager launch, for tests and benchmarks."""
    require_triton()
    check_supported("attention_triton", _unsupported(q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is not None:
        check_attention_out("attention_triton", out, q)
        launch_attention(q, k, v, out, None, None, q.shape[2], k.shape[2])
        return out
    return _attention_op(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The backend's attention: the Triton kernel where it applies, ``attention_ref`` elsewhere (CPU tensors
    outside the interpreter, head dims other than 64/128, mixed or unsupported dtypes, malformed inputs,
    which the reference then reports)."""
    if can_launch(q) and _unsupported(q, k, v) is None:
        return attention_triton(q, k, v)
    return attention_ref(q, k, v)
