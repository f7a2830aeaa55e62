"""Pick the implementation of every fused op once per device: Triton on CUDA when proven to work,
the pure-PyTorch references everywhere else.

``get_backend(device, force_reference=False)`` returns a frozen ``KernelBackend`` of callables that
model code resolves at construction; ``SPACETIME_FORCE_REFERENCE=1`` forces the references.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .adaln import gated_residual_ref, layer_norm_modulate_ref
from .attention import attention_ref
from .rmsnorm import rms_norm_ref

log = logging.getLogger(__name__)

FORCE_REFERENCE_ENV = "SPACETIME_FORCE_REFERENCE"


@dataclass(frozen=True)
class KernelBackend:
    name: str
    attention: Callable[..., torch.Tensor]
    layer_norm_modulate: Callable[..., torch.Tensor]
    gated_residual: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]


REFERENCE = KernelBackend(
    name="reference",
    attention=attention_ref,
    layer_norm_modulate=layer_norm_modulate_ref,
    gated_residual=gated_residual_ref,
    rms_norm=rms_norm_ref,
)


def reference_forced() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def get_backend(device: torch.device | str | None = None, force_reference: bool = False) -> KernelBackend:
    """The backend for ``device``: the references until the Triton kernels land."""
    if force_reference or reference_forced():
        return REFERENCE
    return REFERENCE
