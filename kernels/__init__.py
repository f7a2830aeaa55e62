"""Fused ops for the hot path, each with its pure-PyTorch reference; imports only torch (and triton lazily)."""
from .adaln import gated_residual_ref, layer_norm_modulate_ref
from .attention import apply_rope_ref, attention_ref
from .dispatch import REFERENCE, KernelBackend, get_backend
from .rmsnorm import rms_norm_ref

__all__ = [
    "KernelBackend",
    "REFERENCE",
    "get_backend",
    "attention_ref",
    "apply_rope_ref",
    "layer_norm_modulate_ref",
    "gated_residual_ref",
    "rms_norm_ref",
]
