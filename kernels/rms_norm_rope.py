"""RMSNorm of q or k over all heads, then Wan's 3D RoPE per head: the one place q and k are rotated.

``rms_norm_rope(x, weight, cos, sin, eps)``: x ``[..., S, C]`` with ``C = heads * D``, weight ``[C]``,
``cos``/``sin`` ``[S, D/2]`` (fp32, one row per token, the same for every head) -> ``[..., S, C]`` in x's
dtype: ``rope(rms_norm(x) * weight)``, the rotation applied to consecutive pairs ``(x[2i], x[2i+1])`` of
each head (Wan's complex-number layout). For the packed layout x is ``[1, T, C]`` with one table row per
packed token.

Why here and not inside attention: a FlashAttention-style kernel that rotates K on the fly rotates every K
tile once per query block (~590 times per head at 75,600 tokens) and streams the fp32 tables per key; the
norm kernel already reads and writes each q/k row exactly once, so rotating there costs no extra memory
traffic and the attention kernel stays a plain one (any attention backend - ours, SDPA, flash-attn,
SageAttention - then takes rotated q/k). The alternative (permuting the q/k weight rows at load so each
head's halves are contiguous) would change every checkpoint key layout, LoRA delta and the packed path's
tables; this one keeps the weights as published.

Rounding: the reference rounds the normed values to x's dtype and rotates those (as the separate norm and
RoPE did before); the kernel does the same in registers, so the two agree to fp32 summation order.
The Triton kernel: one program per row, the whole row in registers as (even, odd) pairs loaded
contiguously and split (``tl.split``), statistics in fp32 (Triton tutorial 05-layer-norm).
Limits: x fp16/bf16/fp32, unit-stride last dim of at most ``MAX_WIDTH``; ``C`` a multiple of ``D``;
anything else goes to ``rms_norm_rope_ref``. Forward only.
"""
from __future__ import annotations

import functools

import torch

from ._triton import (
    autotuned,
    can_launch,
    check_out,
    check_supported,
    dtype_unsupported,
    interpreting,
    jit,
    launchable,
    next_power_of_2,
    prune_row_configs,
    register_op,
    require_triton,
    row_configs,
    tl,
)
from .rmsnorm import MAX_WIDTH, rms_norm_ref


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of ``x [..., S, D]`` by angles with ``cos/sin [S, D/2]``."""
    x_pairs = x.float().unflatten(-1, (-1, 2))  # [..., S, D/2, 2]
    x_even, x_odd = x_pairs.unbind(-1)  # [..., S, D/2] each
    rotated_even = x_even * cos - x_odd * sin
    rotated_odd = x_even * sin + x_odd * cos
    return torch.stack((rotated_even, rotated_odd), dim=-1).flatten(-2).to(x.dtype)  # [..., S, D]


def rms_norm_rope_ref(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """x ``[..., S, C]``, weight ``[C]``, cos/sin ``[S, D/2]`` -> ``[..., S, C]`` in x's dtype."""
    head_dim = 2 * cos.shape[-1]
    normed = rms_norm_ref(x, weight, eps)  # [..., S, C]
    per_head = normed.unflatten(-1, (-1, head_dim)).transpose(-3, -2)  # [..., H, S, D]
    return apply_rope_ref(per_head, cos, sin).transpose(-3, -2).flatten(-2)  # [..., S, C]


@jit
def _rms_norm_rope_kernel(
    x_ptr,
    weight_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_x_row,
    stride_out_row,
    stride_rope_s,
    n_pairs,
    seqlen,
    eps,
    HALF_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride overflows int32 at 75K tokens x 5120
    token = row % seqlen  # x is [..., S, C] flattened to rows: the table row is the token's position
    pairs = tl.arange(0, BLOCK_P)
    in_row = pairs < n_pairs
    # [BLOCK_P, 2] (even, odd) pairs: one contiguous load, split in registers
    offsets = 2 * pairs[:, None] + tl.arange(0, 2)[None, :]
    x = tl.load(x_ptr + row * stride_x_row + offsets, mask=in_row[:, None], other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + offsets, mask=in_row[:, None], other=0.0).to(tl.float32)
    # padding lanes hold 0: they add nothing to the sum of squares; divide by the true width
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (2 * n_pairs) + eps)
    # round the normed values to the output dtype, as the reference's separate norm does
    normed = (x * rstd * weight).to(out_ptr.dtype.element_ty).to(tl.float32)
    even, odd = tl.split(normed)  # [BLOCK_P] each
    angle = token * stride_rope_s + pairs % HALF_D  # each head uses the same D/2 angles
    cos = tl.load(cos_ptr + angle, mask=in_row, other=1.0)
    sin = tl.load(sin_ptr + angle, mask=in_row, other=0.0)
    out = tl.join(even * cos - odd * sin, even * sin + odd * cos)  # [BLOCK_P, 2]
    tl.store(out_ptr + row * stride_out_row + offsets, out.to(out_ptr.dtype.element_ty), mask=in_row[:, None])


@functools.lru_cache(maxsize=None)
def _tuned_kernel():
    return autotuned(_rms_norm_rope_kernel, row_configs(), key=["n_pairs", "HALF_D"], prune=_prune)


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    block = kwargs.get("BLOCK_P", named_args.get("BLOCK_P"))
    return prune_row_configs(configs, {"BLOCK_C": 2 * block})


def launch_rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, out: torch.Tensor
) -> None:
    """Run the kernel on checked inputs (cos/sin fp32 with a unit-stride last dim), writing ``out``
    (contiguous, x's shape and dtype)."""
    rows = x.reshape(-1, x.shape[-1])  # a view whenever the leading dims are collapsible
    out = out.view(rows.shape)
    n_rows, n_cols = rows.shape
    if n_rows == 0:
        return
    n_pairs = n_cols // 2
    args = (rows, weight, cos, sin, out, rows.stride(0), out.stride(0), cos.stride(0), n_pairs, x.shape[-2], eps)
    meta = dict(HALF_D=cos.shape[-1], BLOCK_P=next_power_of_2(n_pairs))
    if interpreting():
        launchable(_rms_norm_rope_kernel)[(n_rows,)](*args, **meta)
    else:
        launchable(_tuned_kernel())[(n_rows,)](*args, **meta)


def _rms_norm_rope_launch(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch_rms_norm_rope(x, weight, cos, sin, eps, out)
    return out


_rms_norm_rope_op = register_op("spacetime::rms_norm_rope", _rms_norm_rope_launch)


def _unsupported(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can: the one rule of ``rms_norm_rope_triton``
    (which raises it) and ``rms_norm_rope`` (which then takes the reference)."""
    if reason := dtype_unsupported("x", x):
        return reason
    if x.dim() < 2:
        return f"x must be [..., S, C], got {tuple(x.shape)}"
    tokens, n_cols = x.shape[-2], x.shape[-1]
    if weight.shape != (n_cols,):
        return f"weight must be [{n_cols}] to match x {tuple(x.shape)}, got {tuple(weight.shape)}"
    if cos.dim() != 2 or cos.shape[0] != tokens or sin.shape != cos.shape:
        return f"rope tables must be [{tokens}, D/2], got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
    if cos.shape[1] == 0 or n_cols % (2 * cos.shape[1]):
        return f"width {n_cols} must be a multiple of the head dim 2 * {cos.shape[1]}"
    if n_cols > MAX_WIDTH:
        return f"last dim {n_cols} exceeds the kernel's maximum {MAX_WIDTH}"
    if not (weight.device == cos.device == sin.device == x.device):
        return f"x, weight and the rope tables must be on one device, got {x.device}, {weight.device}, {cos.device}, {sin.device}"
    return None


def rms_norm_rope_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused RMSNorm + RoPE; shapes in the module docstring. Written into ``out`` when given (eager launch,
    for tests and benchmarks). Raises ``ValueError`` naming what is wrong for inputs the kernel does not take."""
    require_triton()
    check_supported("rms_norm_rope_triton", _unsupported(x, weight, cos, sin))
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = (t.to(torch.float32).contiguous() for t in (cos, sin))
    if out is not None:
        check_out("rms_norm_rope_triton", out, x)
        launch_rms_norm_rope(x, weight.contiguous(), cos, sin, float(eps), out)
        return out
    return _rms_norm_rope_op(x, weight.contiguous(), cos, sin, float(eps))


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The backend's fused op: the Triton kernel where it applies, ``rms_norm_rope_ref`` elsewhere (CPU
    tensors outside the interpreter, unsupported dtypes or shapes)."""
    if can_launch(x) and _unsupported(x, weight, cos, sin) is None:
        return rms_norm_rope_triton(x, weight, cos, sin, eps)
    return rms_norm_rope_ref(x, weight, cos, sin, eps)
