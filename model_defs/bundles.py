"""What travels between nodes: frozen dataclasses around loaded models and conditioning.

They hold modules and tensors (compared by identity, hence ``eq=False``) plus the facts a downstream
node needs to validate its inputs without reaching into the module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .experts import ExpertSwitch
from .previews import LatentRGB
from .sizes import SPATIAL_PATCH, SizeRules, patch_grid
from .step_cache import StepCacheSettings
from .text_encoders import EncodedText
from .wan_dit import WanDiT
from .wan_vae import VAE_PRESETS, WanVAE, WanVAEConfig

if TYPE_CHECKING:  # clip_vision and lora read files through checkpoint, which imports this module
    from .clip_vision import ClipVisionConfig, ClipVisionEncoder
    from .lora import AppliedLora, LoraFile
    from .weight_streaming import BlockStreamer


@dataclass(frozen=True, eq=False)
class LatentFormat:
    """Per-channel statistics that map raw VAE latents to the DiT's unit-variance space."""

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rgb: LatentRGB | None = None  # the latent -> RGB map of previews (``previews``); None: no previews

    @classmethod
    def from_vae_config(cls, config: WanVAEConfig, rgb: LatentRGB | None = None) -> "LatentFormat":
        return cls(config.z_dim, tuple(config.latents_mean), tuple(config.latents_std), rgb)

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
    """SPACETIME_MODEL: a DiT, the latent format it was trained in, and the kernel backend it runs on.
    A Wan 2.2 A14B pair (``with_low_noise_expert``): ``dit`` is the high-noise expert, ``low_noise``
    the low-noise one and ``switch`` when sampling hands over. ``loras``: the LoRAs the sampler applies to
    ``dit`` while it runs (``with_lora``; the module itself is never changed outside a sampling run). ``streamer``:
    set by the loader when the DiT does not all fit on the GPU (``weight_streaming``); each expert has its own."""

    dit: WanDiT
    latent_format: LatentFormat
    name: str
    preset: str | None = None
    low_noise: "SpacetimeModel | None" = None
    switch: ExpertSwitch | None = None
    loras: "tuple[AppliedLora, ...]" = ()
    streamer: "BlockStreamer | None" = None
    step_cache: StepCacheSettings | None = None  # ``with_step_cache``: how the sampler caches this DiT's steps

    @property
    def holds_known_frames_clean(self) -> bool:
        """Trained with per-token timesteps (Wan 2.2 TI2V-5B): known frames are held clean at timestep 0
        (``known_frames``), as Wan 2.2 does image-to-video; other models take the mask path."""
        return self.config.model_type == "ti2v"

    def with_low_noise_expert(self, low_noise: "SpacetimeModel", switch: ExpertSwitch) -> "SpacetimeModel":
        """This model as the high-noise expert of a pair; ValueError naming the input when the two are not
        two different experts of one kind of model."""
        self._check_local("Spacetime Pair Experts", "high_noise_model")
        low_noise._check_local("Spacetime Pair Experts", "low_noise_model")
        if self.low_noise is not None or low_noise.low_noise is not None:
            raise ValueError("high_noise_model and low_noise_model must each be one expert, not an already paired model")
        if low_noise.config != self.config or low_noise.latent_format.channels != self.latent_format.channels:
            raise ValueError(
                f"high_noise_model ({self.name}, {self.preset or self.config.model_type}) and low_noise_model "
                f"({low_noise.name}, {low_noise.preset or low_noise.config.model_type}) are different kinds of model; "
                "load the high- and the low-noise expert of one Wan 2.2 A14B model (both T2V or both I2V)"
            )
        if low_noise.name == self.name or _same_weights(self.dit, low_noise.dit):
            raise ValueError(
                f"low_noise_model is the same expert as high_noise_model ({self.name}); connect the pair's other file "
                "(its name has low_noise where this one has high_noise) to low_noise_model"
            )
        if "low_noise" in self.name.lower() and "high_noise" in low_noise.name.lower():
            raise ValueError(
                f"high_noise_model={self.name!r} and low_noise_model={low_noise.name!r} look swapped; connect the "
                "high_noise file to high_noise_model"
            )
        return dataclasses.replace(self, low_noise=low_noise, switch=switch)

    def with_lora(self, lora: "LoraFile", strength: float = 1.0, mode: str = "unmerged") -> "SpacetimeModel":
        """This model with ``lora`` added to its LoRAs (they stack), bound to the DiT's layers now so a LoRA that
        does not fit fails here; one-line errors. An expert pair is refused: each expert takes its own LoRA."""
        from .lora import AppliedLora, bind_lora

        self._check_local("Spacetime Load LoRA")
        if self.low_noise is not None:
            raise ValueError(
                f"model {self.name} is already a pair of experts; load the LoRA on each expert before Spacetime Pair "
                "Experts (a LoRA per expert: Wan 2.2 A14B LoRAs come as a high-noise and a low-noise file)"
            )
        applied = AppliedLora(bind_lora(lora, self.dit, self.name), strength, mode)
        return dataclasses.replace(self, loras=self.loras + (applied,))

    def with_step_cache(self, settings: StepCacheSettings) -> "SpacetimeModel":
        """This model with its steps cached by ``settings`` (``step_cache``), replacing any earlier cache setting;
        an expert pair caches each expert (each with its own state and its own coefficients). ``auto`` coefficients
        are resolved here, so a model without any fails now, in one line."""
        if settings.active and getattr(self.dit, "runs_in_workers", False):
            raise ValueError(f"model {self.name} runs on Multi-GPU workers, which do not cache steps yet; remove Spacetime "
                             "Step Cache (or set its threshold to 0)")
        low_noise = None if self.low_noise is None else self.low_noise.with_step_cache(settings)
        return dataclasses.replace(self, low_noise=low_noise, step_cache=settings.resolve(self.preset, self.name))

    def _check_local(self, transform: str, what: str = "model") -> None:
        """ValueError when this model's DiT runs in worker processes (``runs_in_workers``: Spacetime Multi-GPU),
        where ``transform`` cannot reach it: it must come before the Multi-GPU node."""
        if getattr(self.dit, "runs_in_workers", False):
            raise ValueError(f"{what} {self.name} already runs on Multi-GPU workers, where {transform} cannot reach its DiT; "
                             f"connect {transform} before Spacetime Multi-GPU")

    @property
    def config(self):
        return self.dit.config

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the DiT computes in."""
        return self.dit.patch_embedding.weight.dtype

    @property
    def needs_clip(self) -> bool:
        """Whether the DiT has a CLIP image branch (Wan 2.1 I2V/FLF2V): its forward needs ``image_context``,
        the CLIP vision features of the conditioning frame(s)."""
        return self.config.clip_branch

    @property
    def image_channels(self) -> int:
        """Conditioning channels (mask + image latents, ``wan_image.image_condition``) the DiT takes after the
        noisy latents: in_dim - out_dim for image-to-video models (20 for Wan's 36-channel ones), 0 otherwise."""
        return self.config.image_channels

    def check_latent(self, latent_shape: tuple[int, ...], what: str = "latent") -> tuple[int, int, int]:
        """The patch grid of a latent ``[B,C,T',h,w]`` this DiT can sample; ValueError saying what is wrong."""
        if len(latent_shape) != 5:
            raise ValueError(f"{what} must be a video latent [B,C,T,H,W], got shape {tuple(latent_shape)}")
        if latent_shape[1] != self.config.out_dim:
            raise ValueError(
                f"{what} has {latent_shape[1]} channels but model {self.name} takes {self.config.out_dim}; "
                f"use the VAE that matches the model ({_vae_channels()})"
            )
        try:
            return patch_grid(latent_shape, self.config.patch_size)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc} of model {self.name}") from None

    def text_context(self, cond: "SpacetimeConditioning", which: str, batch: int, device) -> torch.Tensor:
        """Context ``[batch, text_len, text_dim]`` in the DiT's dtype: the prompt's token embeddings
        zero-padded or cut to the model's text length, as Wan does (no mask: Wan, diffusers and ComfyUI
        attend to the padding too)."""
        cfg = self.config
        emb = cond.text.embeddings  # [n, L, D]
        if emb.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"{which} conditioning comes from {cond.encoder_name} (dim {emb.shape[-1]}) but the model "
                f"{self.name} expects text embeddings of dim {cfg.text_dim}; use the text encoder that matches the model"
            )
        if emb.shape[0] not in (1, batch):
            raise ValueError(f"{which} conditioning holds {emb.shape[0]} prompts but the latent batch is {batch}")
        out = torch.zeros(emb.shape[0], cfg.text_len, cfg.text_dim)
        length = min(cfg.text_len, emb.shape[1])
        out[:, :length] = emb[:, :length]
        return out.expand(batch, -1, -1).to(device=device, dtype=self.dtype)


@dataclass(frozen=True, eq=False)
class ImageCondition:
    """What an image-conditioned (I2V) DiT takes besides its noisy latents: ``channels`` ``[1, tf + C, F', h, w]``
    (mask of the known pixel frames, then the normalized latents of the given frames; ``wan_image``), and
    ``clip`` ``[1, tokens, dim]`` CLIP vision features for a CLIP branch (None without one)."""

    channels: torch.Tensor
    clip: torch.Tensor | None = None


def _vae_channels() -> str:
    """Every VAE family's latent channels, for messages: 'wan2.1 VAE: 16, ...'."""
    shown = {name: config for name, config in VAE_PRESETS.items() if name.startswith("wan") or name == "tiny"}
    return ", ".join(f"{'built-in' if name == 'tiny' else name} VAE: {config.z_dim}" for name, config in shown.items())


def _same_weights(a: WanDiT, b: WanDiT) -> bool:
    """Whether two DiTs hold the same weights (checked on two tensors: two experts differ everywhere)."""
    return torch.equal(a.patch_embedding.weight, b.patch_embedding.weight) and torch.equal(a.head.modulation, b.head.modulation)


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

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def frame_rules(self) -> SizeRules:
        """What the VAE alone encodes: sides multiples of its spatial factor, 1 + tf*k frames."""
        return SizeRules(self.spatial_factor, self.temporal_factor)

    @property
    def video_rules(self) -> SizeRules:
        """What a video to generate must be: its latent also cut into the DiTs' spatial patches."""
        return self.frame_rules.with_patch((1, SPATIAL_PATCH, SPATIAL_PATCH))


@dataclass(frozen=True, eq=False)
class SpacetimeClipVision:
    """SPACETIME_CLIP_VISION: a CLIP vision encoder whose penultimate features are the image context of the
    Wan 2.1 I2V/FLF2V DiTs (``SpacetimeModel.needs_clip``)."""

    encoder: "ClipVisionEncoder"
    name: str

    @property
    def config(self) -> "ClipVisionConfig":
        return self.encoder.config

    @property
    def feature_dim(self) -> int:
        """Width of each feature token (1280 for ViT-H; the DiT's ``image_dim``)."""
        return self.encoder.config.hidden_size

    @property
    def tokens(self) -> int:
        """Feature tokens per image (257 for ViT-H/14)."""
        return self.encoder.config.tokens

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def encode(self, images: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """IMAGE frames ``[N,H,W,3]`` in 0..1 -> features ``[N, tokens, feature_dim]`` fp32 on the encoder's
        device; ``crop``: center crop to a square (ComfyUI's default) or resize the whole frame (Wan's way)."""
        return self.encoder.encode(images, crop)


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


def any_vae_rules() -> SizeRules:
    """The loosest video rules of any supported VAE family (the smallest spatial unit): what a size must
    meet before the VAE it will meet is known, e.g. when a workflow is validated before any model loads.
    The loaded VAE's own ``video_rules`` are checked again when the job runs."""
    loosest = min(VAE_PRESETS.values(), key=lambda c: (c.spatial_factor, c.temporal_factor))
    return SizeRules(loosest.spatial_factor, loosest.temporal_factor).with_patch((1, SPATIAL_PATCH, SPATIAL_PATCH))
