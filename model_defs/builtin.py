"""The built-in tiny model: the Wan architecture at a size that runs on a CPU in seconds.

Until the built-in-model issue ships trained weights, the DiT and VAE are initialised from fixed
seeds (Wan's initialisation), so every node computes for real and deterministically, but the
videos are not meaningful pictures. The text encoder is the real all-MiniLM-L6-v2.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..kernels import KernelBackend
from .bundles import LatentFormat, SpacetimeModel, SpacetimeTextEncoder, SpacetimeVAE
from .text_encoders import MINILM_NAME, MiniLMTextEncoder
from .wan_dit import DIT_PRESETS, WanDiT
from .wan_vae import VAE_PRESETS, WanVAE

BUILTIN_MODEL = "spacetime-builtin-tiny"
BUILTIN_VAE = "spacetime-builtin-tiny-vae"
BUILTIN_TEXT_ENCODER = f"{MINILM_NAME} (built-in)"
BUILTIN_DIT_PRESET = "builtin-tiny"
BUILTIN_VAE_PRESET = "tiny"
WEIGHTS_DIR = Path(__file__).resolve().parent / "builtin_weights"
_DIT_SEED = 20261124
_VAE_SEED = 20261125


def builtin_vae(dtype: torch.dtype = torch.float32) -> SpacetimeVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_VAE_SEED)
        vae = WanVAE(VAE_PRESETS[BUILTIN_VAE_PRESET])
    return SpacetimeVAE(vae.to(dtype).eval().requires_grad_(False), BUILTIN_VAE)


def builtin_model(backend: KernelBackend, dtype: torch.dtype = torch.float32) -> SpacetimeModel:
    dit = WanDiT(DIT_PRESETS[BUILTIN_DIT_PRESET], backend)
    dit.init_weights(torch.Generator().manual_seed(_DIT_SEED), zero_head=False)
    latent_format = LatentFormat.from_vae_config(VAE_PRESETS[BUILTIN_VAE_PRESET])
    return SpacetimeModel(dit.to(dtype).eval().requires_grad_(False), latent_format, BUILTIN_MODEL, BUILTIN_DIT_PRESET)


def builtin_text_encoder(device: torch.device | str = "cpu") -> SpacetimeTextEncoder:
    encoder = MiniLMTextEncoder(device)
    return SpacetimeTextEncoder(encoder, BUILTIN_TEXT_ENCODER, encoder.dim, DIT_PRESETS[BUILTIN_DIT_PRESET].text_len)
