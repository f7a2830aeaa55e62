"""Loader nodes: diffusion model (DiT), VAE and text encoder, each offering the built-in model first; CLIP vision
(for the Wan 2.1 image-to-video models)."""
from __future__ import annotations

import torch

from ..kernels import KERNEL_CHOICES as _KERNEL_CHOICES
from ..kernels import get_backend
from ..model_defs.builtin import (
    BUILTIN_MODEL,
    BUILTIN_TEXT_ENCODER,
    BUILTIN_VAE,
    builtin_model,
    builtin_text_encoder,
    builtin_vae,
)
from ..model_defs.bundles import SpacetimeClipVision, SpacetimeTextEncoder, SpacetimeVAE
from ..model_defs.checkpoint import DTYPES, load_model, load_vae
from ..model_defs.clip_vision import load_clip_vision
from ..model_defs.compiled import COMPILE_CHOICES, check_compile, compile_blocks
from ..model_defs.umt5 import UMT5_TOKENIZER_DIR, UMT5TextEncoder
from ..model_defs.weight_streaming import check_budget, stream_weights
from . import comfy_glue
from .widgets import literal_values, validate_inputs

WEIGHT_DTYPES = ["default", *DTYPES]
KERNEL_CHOICES = list(_KERNEL_CHOICES)  # auto, triton, sdpa, flash_attn, sage_attention, reference (= sdpa)
KERNEL_TOOLTIP = (
    "Attention backend. auto: on a CUDA GPU, the fastest that passes a numerical self-check against SDPA "
    "(ours, sdpa, and flash_attn / sage_attention when installed); triton: our fused Triton kernels; sdpa: "
    "plain PyTorch; flash_attn (pip install flash-attn) and sage_attention (pip install sageattention) when "
    "installed. A choice that cannot run falls back to sdpa with one log line. reference: the old name of sdpa."
)
GPU_BUDGET_GB = ("FLOAT", {
    "default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.5, "round": 0.01,
    "tooltip": "GB (1024^3 bytes) of DiT weights kept on the GPU; the other blocks stay in CPU memory and move in just "
               "before they run (weight streaming: slower, for GPUs smaller than the model). 0: the whole model on the GPU. "
               "Leave room for activations.",
})


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "default":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if choice not in DTYPES:
        raise ValueError(f"weight_dtype={choice!r} is not allowed; allowed values: {WEIGHT_DTYPES}")
    return DTYPES[choice]


class SpacetimeModelLoader:
    DESCRIPTION = "Loads a Wan diffusion transformer (original or ComfyUI layout) or the built-in tiny model."
    CATEGORY = "spacetime/loaders"
    RETURN_TYPES = ("SPACETIME_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (
                    [BUILTIN_MODEL, *comfy_glue.list_model_files("diffusion_models")],
                    {"tooltip": "A file from models/diffusion_models, or the built-in tiny model (runs on CPU)."},
                ),
                "weight_dtype": (WEIGHT_DTYPES, {"default": "default", "tooltip": "default: fp32 on CPU, bf16 on GPU."}),
                "kernels": (
                    KERNEL_CHOICES,
                    {"default": "auto", "tooltip": KERNEL_TOOLTIP},
                ),
            },
            "optional": {  # optional: workflows saved before these inputs existed still load
                "gpu_budget_gb": GPU_BUDGET_GB,
                "compile": (list(COMPILE_CHOICES), {
                    "default": "off",
                    "tooltip": "on: torch.compile each block at the first step (slow once; for GPUs: on a CPU it did not speed up "
                               "larger models, BENCHMARKS.md); falls back to running uncompiled, with a log line, where "
                               "compiling does not work.",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, lambda v: check_budget(*literal_values(v, "gpu_budget_gb")))

    def load(self, model_name: str, weight_dtype: str = "default", kernels: str = "auto", gpu_budget_gb: float = 0.0,
             compile: str = "off"):
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r} is not allowed; allowed values: {KERNEL_CHOICES}")
        check_budget(gpu_budget_gb)
        check_compile(compile)
        device = comfy_glue.torch_device("diffusion")
        dtype = resolve_dtype(weight_dtype, device)
        backend = get_backend(device, choice=kernels)
        if model_name == BUILTIN_MODEL:
            model = builtin_model(backend, dtype)
        else:
            model = load_model(comfy_glue.model_file_path("diffusion_models", model_name, "model_name"), dtype, backend)
        if compile == "on":
            compile_blocks(model.dit, model.name)
        return (stream_weights(model, gpu_budget_gb, device),)


class SpacetimeVAELoader:
    DESCRIPTION = "Loads a Wan causal 3D VAE (original, ComfyUI or diffusers layout) or the built-in tiny VAE."
    CATEGORY = "spacetime/loaders"
    RETURN_TYPES = ("SPACETIME_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (
                    [BUILTIN_VAE, *comfy_glue.list_model_files("vae")],
                    {"tooltip": "A file from models/vae (e.g. wan_2.1_vae.safetensors), or the built-in tiny VAE."},
                ),
                "weight_dtype": (WEIGHT_DTYPES, {"default": "default"}),
            }
        }

    def load(self, vae_name: str, weight_dtype: str = "default"):
        dtype = resolve_dtype(weight_dtype, comfy_glue.torch_device("vae"))
        if vae_name == BUILTIN_VAE:
            return (builtin_vae(dtype),)
        path = comfy_glue.model_file_path("vae", vae_name, "vae_name")
        return (SpacetimeVAE(load_vae(path, dtype), vae_name),)


class SpacetimeTextEncoderLoader:
    DESCRIPTION = "Loads the text encoder whose embeddings the model was trained on."
    CATEGORY = "spacetime/loaders"
    RETURN_TYPES = ("SPACETIME_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (
                    [BUILTIN_TEXT_ENCODER, *comfy_glue.list_model_files("text_encoders")],
                    {"tooltip": "The built-in all-MiniLM-L6-v2 for the built-in model; umT5-XXL "
                     "(umt5_xxl_fp16.safetensors, tokenizer files in text_encoders/umt5-xxl/) for Wan."},
                ),
                "weight_dtype": (WEIGHT_DTYPES, {"default": "default"}),
            }
        }

    def load(self, text_encoder_name: str, weight_dtype: str = "default"):
        # built on the offload device; Text Encode moves it to the text-encoder device while it runs
        if text_encoder_name == BUILTIN_TEXT_ENCODER:
            return (builtin_text_encoder(comfy_glue.offload_device()),)
        path = comfy_glue.model_file_path("text_encoders", text_encoder_name, "text_encoder_name")
        dtype = resolve_dtype(weight_dtype, comfy_glue.torch_device("text_encoder"))
        encoder = UMT5TextEncoder(path, path.parent / UMT5_TOKENIZER_DIR, dtype, comfy_glue.offload_device())
        return (SpacetimeTextEncoder(encoder, encoder.name, encoder.dim, encoder.text_len),)


CLIP_VISION_FILE = "clip_vision_h.safetensors"  # offered when the folder is empty, so choosing it says where to put it


class SpacetimeCLIPVisionLoader:
    DESCRIPTION = "Loads a CLIP vision model (ViT-H/14, e.g. clip_vision_h.safetensors): the image encoder of Wan 2.1 I2V/FLF2V."
    CATEGORY = "spacetime/loaders"
    RETURN_TYPES = ("SPACETIME_CLIP_VISION",)
    RETURN_NAMES = ("clip_vision",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_name": (
                    comfy_glue.list_model_files("clip_vision") or [CLIP_VISION_FILE],
                    {"tooltip": "A file from models/clip_vision: clip_vision_h.safetensors from "
                     "Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/clip_vision/) for Wan 2.1 I2V and FLF2V."},
                ),
            }
        }

    def load(self, clip_name: str):
        # built on the offload device, like the text encoder; the job moves it where it encodes
        path = comfy_glue.model_file_path("clip_vision", clip_name, "clip_name")
        dtype = resolve_dtype("default", comfy_glue.torch_device("text_encoder"))
        encoder = load_clip_vision(path, dtype)
        encoder.model.to(comfy_glue.offload_device())
        return (SpacetimeClipVision(encoder, clip_name),)
