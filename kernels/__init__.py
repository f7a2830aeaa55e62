"""Fused ops for the hot path, each with its pure-PyTorch reference; imports only torch (and triton,
guarded: the package imports and runs on the references without it; flash-attn and SageAttention,
guarded the same way, when installed)."""
from .adaln import gated_residual_ref, layer_norm_modulate_ref
from .attention import attention_ref
from .attention_varlen import attention_varlen_ref
from .dispatch import KERNEL_CHOICES, REFERENCE, SDPA, TRITON, KernelBackend, canonical_choice, get_backend
from .rms_norm_rope import apply_rope_ref, rms_norm_rope_ref
from .rmsnorm import rms_norm_ref

__all__ = [
    "KERNEL_CHOICES",
    "KernelBackend",
    "REFERENCE",
    "SDPA",
    "TRITON",
    "canonical_choice",
    "get_backend",
    "attention_ref",
    "attention_varlen_ref",
    "apply_rope_ref",
    "layer_norm_modulate_ref",
    "gated_residual_ref",
    "rms_norm_ref",
    "rms_norm_rope_ref",
]
