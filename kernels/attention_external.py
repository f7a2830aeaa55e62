"""Attention through optional third-party packages: flash-attn (Dao-AILab) and SageAttention (thu-ml).

Neither is a dependency: each is imported lazily, once, and any failure at import (absent, built for
another torch or CUDA, a broken wheel) makes it "not available", never an error. The adapters keep our
calling conventions - dense q/k/v ``[B, H, S, D]`` -> ``[B, H, Sq, D]``, packed ``[total, H, D]`` with
``cu_seqlens`` - and route every call the package cannot take (CPU tensors, fp32, other head dims, a
package without a packed entry point) to our reference (``attention_ref``, ``attention_varlen_ref``),
as the Triton backend does. Which backend runs is decided in ``dispatch.py``.
References: flash-attn ``flash_attn_func`` / ``flash_attn_varlen_func`` (layout ``[B, S, H, D]`` and
``[total, H, D]``); SageAttention ``sageattn(q, k, v, tensor_layout="HND", is_causal=False)`` and
``sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` (INT8 QK^T with
smoothed K, fp16/fp8 PV: close to, not equal to, exact attention).
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from .attention import attention_ref
from .attention_varlen import attention_varlen_ref

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLASH_HEAD_DIMS = tuple(range(8, 257, 8))  # flash-attn 2: head dims up to 256, multiples of 8
SAGE_HEAD_DIMS = (64, 128)
PACKAGES = {"flash_attn": "flash_attn", "sage_attention": "sageattention"}  # choice -> module
INSTALL = {"flash_attn": "pip install flash-attn", "sage_attention": "pip install sageattention"}


@functools.lru_cache(maxsize=None)
def _import(module: str) -> tuple[Any, str | None]:
    try:
        return importlib.import_module(module), None
    except Exception as error:  # noqa: BLE001 - a broken build raises anything at import (OSError, RuntimeError, ...)
        return None, f"{type(error).__name__}: {error}".splitlines()[0][:200]


def package(choice: str) -> Any:
    """The imported package behind ``choice`` ("flash_attn" / "sage_attention"), or None."""
    return _import(PACKAGES[choice])[0]


def unavailable(choice: str) -> str | None:
    """Why ``choice``'s package cannot be used, or None when it imports."""
    module, error = _import(PACKAGES[choice])
    return None if module is not None else error


def _takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: tuple[int, ...]) -> bool:
    return (
        q.device.type == "cuda"
        and q.dtype in HALF_DTYPES
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] in head_dims
        and k.shape[-1] == v.shape[-1] == q.shape[-1]
    )


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn's forward on ``[B, H, S, D]`` (its layout is ``[B, S, H, D]``: a transposed view, which is
    our model's memory layout already); the reference elsewhere."""
    lib = package("flash_attn")
    if lib is None or not _takes(q, k, v, FLASH_HEAD_DIMS):
        return attention_ref(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B,S,H,D]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return lib.flash_attn_func(q, k, v).transpose(1, 2)  # [B,H,Sq,D]


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> torch.Tensor:
    lib = package("flash_attn")
    if lib is None or not _takes(q, k, v, FLASH_HEAD_DIMS):
        return attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    cu_q, cu_k = (c.to(device=q.device, dtype=torch.int32) for c in (cu_seqlens_q, cu_seqlens_k))
    return lib.flash_attn_varlen_func(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k))


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    lib = package("sage_attention")
    if lib is None or not _takes(q, k, v, SAGE_HEAD_DIMS):
        return attention_ref(q, k, v)
    return lib.sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def sage_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> torch.Tensor:
    lib = package("sage_attention")
    varlen = getattr(lib, "sageattn_varlen", None)
    if varlen is None or not _takes(q, k, v, SAGE_HEAD_DIMS):
        return attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    cu_q, cu_k = (c.to(device=q.device, dtype=torch.int32) for c in (cu_seqlens_q, cu_seqlens_k))
    return varlen(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), is_causal=False)
