"""Spacetime Load LoRA: a model in, the same model with one more LoRA out (chainable; LoRAs stack)."""
from __future__ import annotations

from ..model_defs.builtin import BUILTIN_LORAS, builtin_lora_path
from ..model_defs.lora import LORA_MODES, read_lora
from . import comfy_glue
from .widgets import validate_inputs

NO_LORA_FILES = "no LoRA files in models/loras"  # offered when the folder is empty, so choosing it says where to put them


class SpacetimeLoadLoRA:
    DESCRIPTION = (
        "Adds a LoRA to a Wan model (ComfyUI/kohya, diffusers/PEFT or original keys, with the diff/diff_b deltas of "
        "distillation LoRAs). Chain several to stack them; for Wan 2.2 A14B load one on each expert before pairing them."
    )
    CATEGORY = "spacetime/loaders"
    RETURN_TYPES = ("SPACETIME_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SPACETIME_MODEL",),
                "lora_name": (
                    [*BUILTIN_LORAS, *(comfy_glue.list_model_files("loras") or [NO_LORA_FILES])],
                    {"tooltip": "A LoRA .safetensors file from models/loras, made for this model's family and size, or the "
                                "built-in tiny model's few-step LoRA (4 steps, cfg 1, euler_distill)."},
                ),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                    "tooltip": "How much of the LoRA to add: 0 is the model without it, negative values subtract it.",
                }),
                "mode": (list(LORA_MODES), {
                    "default": LORA_MODES[0],
                    "tooltip": "unmerged: added beside each layer (fp8 weights stay fp8); merged: folded into the "
                               "weights for the run (faster per step, an fp8 layer held in the compute dtype meanwhile).",
                }),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values)

    def load(self, model, lora_name: str, strength: float = 1.0, mode: str = "unmerged"):
        if lora_name in BUILTIN_LORAS:
            path = builtin_lora_path(lora_name)
        else:
            path = comfy_glue.model_file_path("loras", lora_name, "lora_name")
        return (model.with_lora(read_lora(path), strength, mode),)
