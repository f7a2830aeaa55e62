"""What travels between nodes: frozen dataclasses around loaded models and conditioning.

They hold modules and tensors (compared by identity, hence ``eq=False``) plus the facts a downstream
node needs to validate its inputs without reaching into the module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .text_encoders import EncodedText
from .wan_dit import WanDiT
from .wan_vae import WanVAE, WanVAEConfig

# Every supported DiT cuts latents into 2x2 patches in space; the sampler checks its model's own patch.
SPATIAL_PATCH = 2


@dataclass(frozen=True, eq=False)
class LatentFormat:
    """Per-channel statistics that map raw VAE latents to the DiT's unit-variance space."""

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_vae_config(cls, config: WanVAEConfig) -> "LatentFormat":
        return cls(config.z_dim, tuple(config.latents_mean), tuple(config.latents_std))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.channels, 1, 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(raw)
        return (raw - mean) / std

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(normalized)
        return normalized * std + mean


@dataclass(frozen=True, eq=False)
class SpacetimeModel:
    """SPACETIME_MODEL: a DiT, the latent format it was trained in, and the kernel backend it runs on."""

    dit: WanDiT
    latent_format: LatentFormat
    name: str
    preset: str | None = None

    @property
    def config(self):
        return self.dit.config


@dataclass(frozen=True, eq=False)
class SpacetimeVAE:
    """SPACETIME_VAE: a causal 3D VAE and its compression factors."""

    vae: WanVAE
    name: str

    @property
    def config(self) -> WanVAEConfig:
        return self.vae.config

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.vae.config.spatial_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim


@dataclass(frozen=True, eq=False)
class SpacetimeTextEncoder:
    """SPACETIME_TEXT_ENCODER: anything with ``encode(prompts, text_len) -> EncodedText``; ``text_len`` is
    how many tokens of context it produces (the sampler pads or cuts to the model's own length)."""

    encoder: object
    name: str
    dim: int
    text_len: int


@dataclass(frozen=True, eq=False)
class SpacetimeConditioning:
    """SPACETIME_CONDITIONING: encoded prompt(s) and which encoder produced them."""

    text: EncodedText
    encoder_name: str

    @property
    def dim(self) -> int:
        return self.text.embeddings.shape[-1]
