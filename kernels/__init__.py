"""Fused ops for the hot path, each with its pure-PyTorch reference; imports only torch (and triton,
guarded: the package imports and runs on the references without it)."""
from .adaln import gated_residual_ref, layer_norm_modulate_ref
from .attention import apply_rope_ref, attention_ref
from .attention_varlen import attention_varlen_ref
from .dispatch import REFERENCE, TRITON, KernelBackend, get_backend
from .rmsnorm import rms_norm_ref

__all__ = [
    "KernelBackend",
    "REFERENCE",
    "TRITON",
    "get_backend",
    "attention_ref",
    "attention_varlen_ref",
    "apply_rope_ref",
    "layer_norm_modulate_ref",
    "gated_residual_ref",
    "rms_norm_ref",
]
