"""fp8 weight storage: Linear weights stored as float8 (e4m3fn / e5m2) in the file stay fp8 in memory
and are upcast one layer at a time in ``forward``, halving the weight memory of a bf16 model.

ComfyUI's ``scaled_fp8`` files (a ``scaled_fp8`` marker tensor plus a per-layer ``<layer>.scale_weight``)
store ``weight / scale``; the upcast multiplies the scale back. ``scale_input`` entries (for fp8 matmul
of activations) are not used: activations stay in the compute dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_FP8_MARKER = "scaled_fp8"


class FP8Linear(nn.Module):
    """A Linear whose weight is kept in fp8 and upcast to the input's dtype per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.scale_weight.to(x.dtype)  # one layer's weight, briefly
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)


def has_fp8_weights(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(t.dtype in FP8_DTYPES for t in state_dict.values())


def prepare_fp8(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swap every Linear of ``model`` whose weight is fp8 in ``state_dict`` for an ``FP8Linear`` and return
    the state dict to assign (ComfyUI's marker and input scales dropped, missing weight scales = 1)."""
    state_dict = {k: v for k, v in state_dict.items() if k != SCALED_FP8_MARKER and not k.endswith(".scale_input")}
    for name, module in list(model.named_modules()):
        weight = state_dict.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or weight is None or weight.dtype not in FP8_DTYPES:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            replacement = FP8Linear(module.in_features, module.out_features, module.bias is not None, weight.dtype)
        setattr(parent, child, replacement)
        state_dict[f"{name}.scale_weight"] = state_dict.get(f"{name}.scale_weight", torch.ones(())).float().reshape(())
    kept = {name for name, module in model.named_modules() if isinstance(module, FP8Linear)}
    for key, tensor in list(state_dict.items()):  # fp8 tensors of other layers (convs, norms): dequantize
        owner = key.rpartition(".")[0]
        if tensor.dtype in FP8_DTYPES and owner not in kept:
            scale = state_dict.pop(f"{owner}.scale_weight", torch.ones(()))
            state_dict[key] = tensor.float() * scale.float()
    return state_dict


def cast_for_compute(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor to ``dtype`` except fp8 weights and their fp32 scales, which stay as stored."""
    return {
        k: v if (v.dtype in FP8_DTYPES or k.endswith(".scale_weight")) else v.to(dtype)
        for k, v in state_dict.items()
    }


def dequantize_fp8(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor in ``dtype``, fp8 weights multiplied by their ComfyUI ``scale_weight`` (for models whose
    code cannot run fp8 Linears, e.g. transformers' T5 casts activations to its weights' dtype)."""
    out = {}
    for key, tensor in state_dict.items():
        if key == SCALED_FP8_MARKER or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = state_dict.get(key.rpartition(".")[0] + ".scale_weight")
        value = tensor.to(dtype)
        out[key] = value * scale.to(dtype) if scale is not None and tensor.dtype in FP8_DTYPES else value
    return out
