"""Fused AdaLN modulation and gated residual.

``layer_norm_modulate``: LayerNorm without affine over the last dim, then ``x * (1 + scale) + shift``;
``shift``/``scale`` broadcast against ``x [B, S, C]`` as ``[B, 1, C]`` (per sample), or ``[B, S, C]``
(per token; per-frame modulation is expanded to per-token by the caller, e.g. with ``expand``, which
costs no memory: the kernel reads through the broadcast strides). Statistics in fp32.
``gated_residual``: ``x + gate * y`` with ``gate`` broadcast the same way.

Eager PyTorch reads the activation 3-5 times for these (mean, variance, normalise, modulate); the
kernels read x (and y) once and write once. One program per row for the norm (the whole row in
registers, rows up to ``MAX_WIDTH``), one per (row, column block) for the residual.
Limits: x/y fp16/bf16/fp32 with a unit-stride last dim; shift/scale/gate any float dtype (Wan keeps
them in fp32), cast to fp32 in registers. Anything else goes to the ``*_ref`` functions. Forward only.
Model: Triton tutorial 05-layer-norm; Liger-Kernel's fused modulated norms.
"""
from __future__ import annotations

import functools

import torch

from ._triton import (
    autotuned,
    can_launch,
    cdiv,
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

MAX_WIDTH = 16384  # one row in registers: 16K fp32 over 16 warps is 32 registers per thread
RESIDUAL_BLOCK = 1024  # columns per program of the (memory-bound, row-independent) gated residual


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


@jit
def _layer_norm_modulate_kernel(
    x_ptr,
    shift_ptr,
    scale_ptr,
    out_ptr,
    seq_len,
    n_cols,
    stride_x_b,
    stride_x_s,
    stride_shift_b,
    stride_shift_s,
    stride_scale_b,
    stride_scale_s,
    stride_out_b,
    stride_out_s,
    eps,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: offsets overflow int32 at 75K tokens x 5120
    b = row // seq_len
    s = row % seq_len
    cols = tl.arange(0, BLOCK_C)
    in_row = cols < n_cols
    x = tl.load(x_ptr + b * stride_x_b + s * stride_x_s + cols, mask=in_row, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    # zero the padding lanes after centring, or they would add mean^2 each to the variance
    centred = tl.where(in_row, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    # per-sample modulation has stride_*_s == 0: every row of a sample reads the same (cached) vector
    shift = tl.load(shift_ptr + b * stride_shift_b + s * stride_shift_s + cols, mask=in_row, other=0.0)
    scale = tl.load(scale_ptr + b * stride_scale_b + s * stride_scale_s + cols, mask=in_row, other=0.0)
    out = centred * rstd * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(out_ptr + b * stride_out_b + s * stride_out_s + cols, out.to(out_ptr.dtype.element_ty), mask=in_row)


@jit
def _gated_residual_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    out_ptr,
    seq_len,
    n_cols,
    stride_x_b,
    stride_x_s,
    stride_y_b,
    stride_y_s,
    stride_gate_b,
    stride_gate_s,
    stride_out_b,
    stride_out_s,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    s = row % seq_len
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_row = cols < n_cols
    x = tl.load(x_ptr + b * stride_x_b + s * stride_x_s + cols, mask=in_row, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_y_b + s * stride_y_s + cols, mask=in_row, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gate_b + s * stride_gate_s + cols, mask=in_row, other=0.0)
    out = x + gate.to(tl.float32) * y
    tl.store(out_ptr + b * stride_out_b + s * stride_out_s + cols, out.to(out_ptr.dtype.element_ty), mask=in_row)


@functools.lru_cache(maxsize=None)
def _tuned_layer_norm_modulate():
    return autotuned(_layer_norm_modulate_kernel, row_configs(), key=["n_cols"], prune=prune_row_configs)


def _x_unsupported(x: torch.Tensor) -> str | None:
    if x.dim() != 3:
        return f"x must be [B,S,C], got shape {tuple(x.shape)}"
    return dtype_unsupported("x", x)


def _broadcast_unsupported(name: str, t: torch.Tensor, x: torch.Tensor) -> str | None:
    """Why ``t`` cannot be read as x's ``[B, S, C]`` through broadcast strides, or None."""
    if t.dim() != 3 or t.shape[0] not in (1, x.shape[0]) or t.shape[1] not in (1, x.shape[1]) or t.shape[2] != x.shape[2]:
        return f"{name} must be [B,1,C] (per sample) or [B,S,C] (per token) for x {tuple(x.shape)}, got {tuple(t.shape)}"
    if t.device != x.device:
        return f"{name} is on {t.device} but x is on {x.device}"
    return None


def _layer_norm_modulate_unsupported(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can: the one rule of
    ``layer_norm_modulate_triton`` (which raises it) and ``layer_norm_modulate`` (which then takes the
    reference)."""
    if reason := _x_unsupported(x):
        return reason
    if x.shape[-1] > MAX_WIDTH:
        return f"width {x.shape[-1]} exceeds the kernel's maximum {MAX_WIDTH}"
    return _broadcast_unsupported("shift", shift, x) or _broadcast_unsupported("scale", scale, x)


def _gated_residual_unsupported(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can: the one rule of
    ``gated_residual_triton`` and ``gated_residual``."""
    if reason := _x_unsupported(x):
        return reason
    if y.shape != x.shape or y.device != x.device:
        return f"y must match x: x {tuple(x.shape)} on {x.device}, y {tuple(y.shape)} on {y.device}"
    return _broadcast_unsupported("gate", gate, x)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit-stride last dim (a copy only when it has not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_layer_norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out: torch.Tensor
) -> None:
    """Run the kernel on checked inputs (shift/scale already broadcast to x's shape), writing ``out``."""
    batch, seq_len, n_cols = x.shape
    if x.numel() == 0:
        return
    args = (
        x, shift, scale, out, seq_len, n_cols,
        x.stride(0), x.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        out.stride(0), out.stride(1), eps,
    )  # fmt: skip
    block = next_power_of_2(n_cols)
    kernel = _layer_norm_modulate_kernel if interpreting() else _tuned_layer_norm_modulate()
    launchable(kernel)[(batch * seq_len,)](*args, BLOCK_C=block)


def launch_gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> None:
    """Run the kernel on checked inputs (gate already broadcast to x's shape), writing ``out``."""
    batch, seq_len, n_cols = x.shape
    if x.numel() == 0:
        return
    block = min(RESIDUAL_BLOCK, next_power_of_2(n_cols))
    grid = (batch * seq_len, cdiv(n_cols, block))
    launchable(_gated_residual_kernel)[grid](
        x, y, gate, out, seq_len, n_cols,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0), gate.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_C=block, num_warps=4,  # 1024 columns / 128 threads: 8 elements, two 16-byte vectors each
    )  # fmt: skip


def _layer_norm_modulate_launch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    launch_layer_norm_modulate(x, shift, scale, eps, out)
    return out


def _gated_residual_launch(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    launch_gated_residual(x, y, gate, out)
    return out


_layer_norm_modulate_op = register_op("spacetime::layer_norm_modulate", _layer_norm_modulate_launch)
_gated_residual_op = register_op("spacetime::gated_residual", _gated_residual_launch)


def layer_norm_modulate_triton(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused ``LN(x) * (1 + scale) + shift``. x ``[B,S,C]`` fp16/bf16/fp32; shift/scale ``[B,1,C]`` (per
    sample) or ``[B,S,C]`` (per token), any float dtype -> ``[B,S,C]`` contiguous in x's dtype; written
    into ``out`` when given (eager launch, for tests and benchmarks)."""
    require_triton()
    check_supported("layer_norm_modulate_triton", _layer_norm_modulate_unsupported(x, shift, scale))
    x = _rows(x)
    shift, scale = _rows(shift).expand(x.shape), _rows(scale).expand(x.shape)  # broadcast strides, no copy
    if out is not None:
        check_out("layer_norm_modulate_triton", out, x)
        launch_layer_norm_modulate(x, shift, scale, float(eps), out)
        return out
    return _layer_norm_modulate_op(x, shift, scale, float(eps))


def gated_residual_triton(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused ``x + gate * y``. x/y ``[B,S,C]``, gate ``[B,1,C]`` or ``[B,S,C]`` -> ``[B,S,C]`` contiguous in
    x's dtype; written into ``out`` when given (eager launch, for tests and benchmarks)."""
    require_triton()
    check_supported("gated_residual_triton", _gated_residual_unsupported(x, y, gate))
    x, y = _rows(x), _rows(y)
    gate = _rows(gate).expand(x.shape)  # broadcast strides, no copy
    if out is not None:
        check_out("gated_residual_triton", out, x)
        launch_gated_residual(x, y, gate, out)
        return out
    return _gated_residual_op(x, y, gate)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The backend's AdaLN: the Triton kernel where it applies, ``layer_norm_modulate_ref`` elsewhere."""
    if can_launch(x) and _layer_norm_modulate_unsupported(x, shift, scale) is None:
        return layer_norm_modulate_triton(x, shift, scale, eps)
    return layer_norm_modulate_ref(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The backend's gated residual: the Triton kernel where it applies, ``gated_residual_ref`` elsewhere."""
    if can_launch(x) and _gated_residual_unsupported(x, y, gate) is None:
        return gated_residual_triton(x, y, gate)
    return gated_residual_ref(x, y, gate)
