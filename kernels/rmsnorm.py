"""RMSNorm with weight: ``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, statistics in fp32.

Wan applies it to q and k over all heads at once (last dim = hidden size, 1536 or 5120). The Triton
kernel reads each row once and writes it once: one program per row, the whole row in registers.
Limits: x fp16/bf16/fp32 with a unit-stride last dim of at most ``MAX_WIDTH`` elements; weight any
float dtype (cast to fp32). Anything else goes to ``rms_norm_ref``. Forward only.
Model: Triton tutorial 05-layer-norm (one row per program, fp32 statistics).
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

MAX_WIDTH = 16384  # one row in registers: 16K fp32 over 16 warps is 32 registers per thread


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x ``[..., C]``, weight ``[C]`` -> ``[..., C]`` in x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


@jit
def _rms_norm_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    stride_x_row,
    stride_out_row,
    n_cols,
    eps,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride overflows int32 at 75K tokens x 5120
    cols = tl.arange(0, BLOCK_C)
    in_row = cols < n_cols
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=in_row, other=0.0).to(tl.float32)
    # padding lanes hold 0, so they add nothing to the sum of squares; divide by the true width
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    out = x * rstd * weight
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=in_row)


@functools.lru_cache(maxsize=None)
def _tuned_kernel():
    return autotuned(_rms_norm_kernel, row_configs(), key=["n_cols"], prune=prune_row_configs)


def launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """Run the kernel on checked inputs, writing ``out`` (contiguous, x's shape and dtype)."""
    rows = x.reshape(-1, x.shape[-1])  # a view whenever the leading dims are collapsible
    out = out.view(rows.shape)
    n_rows, n_cols = rows.shape
    if n_rows == 0:
        return
    block = next_power_of_2(n_cols)
    args = (rows, weight, out, rows.stride(0), out.stride(0), n_cols, eps)
    if interpreting():
        launchable(_rms_norm_kernel)[(n_rows,)](*args, BLOCK_C=block)
    else:
        launchable(_tuned_kernel())[(n_rows,)](*args, BLOCK_C=block)


def _rms_norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch_rms_norm(x, weight, eps, out)
    return out


_rms_norm_op = register_op("spacetime::rms_norm", _rms_norm_launch)


def _unsupported(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can: the one rule of ``rms_norm_triton``
    (which raises it) and ``rms_norm`` (which then takes the reference)."""
    if reason := dtype_unsupported("x", x):
        return reason
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        return f"weight must be [{n_cols}] to match x {tuple(x.shape)}, got {tuple(weight.shape)}"
    if n_cols > MAX_WIDTH:
        return f"last dim {n_cols} exceeds the kernel's maximum {MAX_WIDTH}"
    if weight.device != x.device:
        return f"x is on {x.device} but weight is on {weight.device}"
    return None


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused RMSNorm. x ``[..., C]`` (fp16/bf16/fp32), weight ``[C]`` -> ``[..., C]`` contiguous in x's
    dtype; written into ``out`` when given (eager launch, for tests and benchmarks). Raises
    ``ValueError`` naming what is wrong for inputs the kernel does not take."""
    require_triton()
    check_supported("rms_norm_triton", _unsupported(x, weight))
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is not None:
        check_out("rms_norm_triton", out, x)
        launch_rms_norm(x, weight.contiguous(), float(eps), out)
        return out
    return _rms_norm_op(x, weight.contiguous(), float(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The backend's RMSNorm: the Triton kernel where it applies, ``rms_norm_ref`` elsewhere (CPU tensors
    outside the interpreter, unsupported dtypes, rows wider than ``MAX_WIDTH``)."""
    if can_launch(x) and _unsupported(x, weight) is None:
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)
