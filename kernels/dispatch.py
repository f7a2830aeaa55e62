"""Pick the implementation of every fused op once per device: Triton on CUDA when proven to work,
the pure-PyTorch references everywhere else.

``get_backend(device, force_reference=False)`` returns a frozen ``KernelBackend`` of callables that
model code resolves at construction; ``SPACETIME_FORCE_REFERENCE=1`` forces the references.

"Proven to work" means a tiny probe kernel compiled, ran and returned the right numbers on that device,
once per device per process (``triton_works`` caches it). Any failure - Triton missing, no C compiler
(common on Windows), an old driver, a GPU Triton does not support - costs one warning line and gives
the reference path: the user gets a slower model, never an error. The Triton backend's callables also
route each call they cannot take (CPU tensors, other head dims, odd dtypes) to the reference.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _triton
from .adaln import gated_residual, gated_residual_ref, layer_norm_modulate, layer_norm_modulate_ref
from .attention import attention, attention_ref
from .attention_varlen import attention_varlen, attention_varlen_ref
from .rmsnorm import rms_norm, rms_norm_ref

log = logging.getLogger(__name__)

FORCE_REFERENCE_ENV = "SPACETIME_FORCE_REFERENCE"


@dataclass(frozen=True)
class KernelBackend:
    name: str
    attention: Callable[..., torch.Tensor]
    layer_norm_modulate: Callable[..., torch.Tensor]
    gated_residual: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    attention_varlen: Callable[..., torch.Tensor] = attention_varlen_ref


REFERENCE = KernelBackend(
    name="reference",
    attention=attention_ref,
    layer_norm_modulate=layer_norm_modulate_ref,
    gated_residual=gated_residual_ref,
    rms_norm=rms_norm_ref,
    attention_varlen=attention_varlen_ref,
)

TRITON = KernelBackend(
    name="triton",
    attention=attention,
    layer_norm_modulate=layer_norm_modulate,
    gated_residual=gated_residual,
    rms_norm=rms_norm,
    attention_varlen=attention_varlen,
)


def reference_forced() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def probe_triton(device: torch.device) -> None:
    """Run the probe kernel on ``device``; raises what went wrong. (Separate so tests can replace it.)"""
    _triton.probe(device)


@functools.lru_cache(maxsize=None)
def triton_works(device: str) -> bool:
    """Whether the probe kernel passes on ``device`` (e.g. ``"cuda:0"``); probed once, then cached.
    A failure logs one warning naming the cause and is never raised."""
    try:
        probe_triton(torch.device(device))
        return True
    except Exception as error:  # noqa: BLE001 - any failure means "use the reference", never a user error
        cause = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
        log.warning(
            "Spacetime: Triton kernels unavailable on %s (%s); using the PyTorch reference kernels, which are "
            "correct but slower. Set %s=1 or choose kernels=reference to skip this check.",
            device,
            cause,
            FORCE_REFERENCE_ENV,
        )
        return False


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # one cache entry per physical device: "cuda" means the current one
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def get_backend(device: torch.device | str | None = None, force_reference: bool = False) -> KernelBackend:
    """The backend for ``device`` (default: the current CUDA device if any, else CPU): ``TRITON`` on a CUDA
    device where the probe passed, ``REFERENCE`` otherwise or when forced (argument or
    ``SPACETIME_FORCE_REFERENCE=1``). Never raises for a broken Triton."""
    if force_reference or reference_forced():
        return REFERENCE
    resolved = _resolve_device(device)
    if resolved.type != "cuda":
        return REFERENCE
    return TRITON if triton_works(str(resolved)) else REFERENCE
