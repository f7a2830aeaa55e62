"""Wan causal 3D VAEs. Wan 2.1: 4x in time, 8x8 in space, 16 latent channels. Wan 2.2 (TI2V-5B's VAE,
``residual=True``): 4x in time, 16x16 in space (2x2 pixels folded into channels, then 8x8), 48 channels.

Sources: Wan-Video/Wan2.1 ``wan/modules/vae.py`` and Wan-Video/Wan2.2 ``wan/modules/vae2_2.py``
(architectures, streaming scheme and parameter names, which ``wan_2.1_vae.safetensors`` and
``wan2.2_vae.safetensors`` use); diffusers ``AutoencoderKLWan`` (``is_residual``) for the diffusers layout.
Every temporal convolution is causal and streams: encode takes the first frame, then chunks of four;
decode one latent frame at a time. Each causal conv keeps the last two input frames of the previous
chunk in a ``FeatureCache`` passed through the call, so memory is bounded by the chunk, not the video.
Wan 2.2 differs only in its stages: each down/up stage adds a parameter-free shortcut (averaged or
duplicated pixels) around its blocks, and its upsamplers keep their width; the streaming is the same.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

from .layers import config_from_dict

CACHE_FRAMES = 2  # a 3-tap causal conv needs the previous two frames
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# Wan 2.2's published latent statistics: Wan-Video/Wan2.2 ``wan/modules/vae2_2.py`` (``Wan2_2_VAE``), the same
# values as diffusers' Wan-AI/Wan2.2-TI2V-5B-Diffusers ``vae/config.json`` and ComfyUI's ``latent_formats.Wan22``.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
ChunkCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    # Wan 2.2: residual stages (see ``DownStage`` / ``UpStage``), a decoder of its own width (None: base_dim)
    # and patch_size x patch_size pixels folded into channels around the encoder and decoder.
    residual: bool = False
    decoder_base_dim: int | None = None
    patch_size: int = 1

    def __post_init__(self):
        if self.residual and self.attn_scales:
            raise ValueError(f"attn_scales must be () for a residual (Wan 2.2) VAE, got {self.attn_scales}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be 1 or more, got {self.patch_size}")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def pixel_channels(self) -> int:
        """Channels the encoder takes and the decoder gives: RGB times the folded pixels."""
        return 3 * self.patch_size**2

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "WanVAEConfig":
        return config_from_dict(cls, data)


class FeatureCache:
    """The last input frames of every causal conv, carried from one chunk to the next."""

    def __init__(self):
        self.slots: list[torch.Tensor | str | None] = []
        self.index = 0
        self.chunks = 0

    def start_chunk(self) -> None:
        self.index = 0
        self.chunks += 1

    @property
    def first_chunk(self) -> bool:
        return self.chunks <= 1

    def take(self) -> int:
        if self.index == len(self.slots):
            self.slots.append(None)
        self.index += 1
        return self.index - 1


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the past side in time (by the cached frames of the previous chunk)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self._pad = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        pad = list(self._pad)
        if past is not None and pad[4] > 0:
            x = torch.cat([past.to(x.device, x.dtype), x], dim=2)
            pad[4] -= past.shape[2]
        return super().forward(F.pad(x, pad))

    def streamed(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        """Run on this chunk with the previous chunk's frames, and remember this chunk's last frames."""
        if cache is None:
            return self(x)
        slot = cache.take()
        previous = cache.slots[slot]
        keep = x[:, :, -CACHE_FRAMES:].clone()
        if keep.shape[2] < CACHE_FRAMES and isinstance(previous, torch.Tensor):
            keep = torch.cat([previous[:, :, -1:].to(keep.device), keep], dim=2)
        out = self(x, previous if isinstance(previous, torch.Tensor) else None)
        cache.slots[slot] = keep
        return out


class ChannelRMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a per-channel gain (Wan's ``RMS_norm``)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Resample(nn.Module):
    """2x spatial up/down-sampling, plus 2x in time for the ``*3d`` modes. Upsampling halves the channels
    (Wan 2.1) unless ``upsample_dim`` says otherwise (Wan 2.2 keeps them)."""

    def __init__(self, dim: int, mode: str, upsample_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            out_dim = dim // 2 if upsample_dim is None else upsample_dim
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, out_dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def _time_upsample(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        if cache is None:
            return x
        slot = cache.take()
        previous = cache.slots[slot]
        if previous is None:  # the first latent frame decodes to one frame: no doubling
            cache.slots[slot] = "first"
            return x
        keep = x[:, :, -CACHE_FRAMES:].clone()
        if keep.shape[2] < CACHE_FRAMES:
            before = torch.zeros_like(keep) if previous == "first" else previous[:, :, -1:].to(keep.device)
            keep = torch.cat([before, keep], dim=2)
        x = self.time_conv(x, None if previous == "first" else previous)  # [B, 2C, T, H, W]
        cache.slots[slot] = keep
        return rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)  # frames interleaved

    def _time_downsample(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        if cache is None:
            return x
        slot = cache.take()
        previous = cache.slots[slot]
        if previous is None:  # the first frame is its own latent frame
            cache.slots[slot] = x.clone()
            return x
        keep = x[:, :, -1:].clone()
        x = self.time_conv(torch.cat([previous[:, :, -1:].to(x.device), x], dim=2))
        cache.slots[slot] = keep
        return x

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        frames = x.shape[2]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = self.resample[0](x.float()).type_as(x) if self.mode.startswith("upsample") else self.resample[0](x)
        x = rearrange(self.resample[1](x), "(b t) c h w -> b c t h w", t=frames)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelRMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        skip = self.shortcut(x)
        for layer in self.residual:
            x = layer.streamed(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        # Zero output projection, as Wan initialises it: the block starts as the identity. A random one adds
        # a near-uniform average over the frame that, at narrow widths, drowns the local features (a tiny VAE
        # then reconstructs only each frame's mean colour and barely learns past it).
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        frames, height = x.shape[2], x.shape[3]
        h = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        q, k, v = rearrange(self.to_qkv(h), "n (three c) h w -> three n 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # [N,1,HW,C]
        out = self.proj(rearrange(out, "n 1 (h w) c -> n c h w", h=height))
        return x + rearrange(out, "(b t) c h w -> b c t h w", t=frames)


def run_streamed(layers: nn.Sequential, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    """A plain sequence of layers whose causal convs stream through ``cache``."""
    for layer in layers:
        x = layer.streamed(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
    return x


class AvgDown3D(nn.Module):
    """Wan 2.2's parameter-free shortcut around a down stage: each (time x height x width) block of pixels is
    folded into channels and groups of those channels are averaged down to ``out_dim``. A lone first frame
    is averaged with a zero frame before it, as Wan 2.2 does."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        folded = in_dim * factor_t * factor_s**2
        if folded % out_dim:
            raise ValueError(f"AvgDown3D: in_dim*{factor_t}*{factor_s}^2 = {folded} must be a multiple of out_dim {out_dim}")
        self.factor_t, self.factor_s, self.group = factor_t, factor_s, folded // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % self.factor_t, 0))  # frames up to a multiple of factor_t
        x = rearrange(x, "b c (t p) (h q) (w r) -> b (c p q r) t h w", p=self.factor_t, q=self.factor_s, r=self.factor_s)
        return reduce(x, "b (o g) t h w -> b o t h w", "mean", g=self.group)  # [B, out_dim, T/ft, H/fs, W/fs]


class DupUp3D(nn.Module):
    """Wan 2.2's parameter-free shortcut around an up stage, the mirror of ``AvgDown3D``: channels are
    repeated, then unfolded into (time x height x width) blocks. The first chunk keeps only the last of its
    ``factor_t`` frames, as the stage's main path makes one frame of the first latent frame."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        unfolded = out_dim * factor_t * factor_s**2
        if unfolded % in_dim:
            raise ValueError(f"DupUp3D: out_dim*{factor_t}*{factor_s}^2 = {unfolded} must be a multiple of in_dim {in_dim}")
        self.factor_t, self.factor_s, self.repeats = factor_t, factor_s, unfolded // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        x = repeat(x, "b c t h w -> b (c k) t h w", k=self.repeats)
        x = rearrange(x, "b (o p q r) t h w -> b o (t p) (h q) (w r)", p=self.factor_t, q=self.factor_s, r=self.factor_s)
        return x[:, :, self.factor_t - 1:] if first_chunk else x  # [B, out_dim, T*ft (1 first), H*fs, W*fs]


class DownStage(nn.Module):
    """A Wan 2.2 encoder stage (``Down_ResidualBlock``): residual blocks and a downsampler, plus ``AvgDown3D``."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if spatial else 1)
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks)]
        if spatial:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)  # the smaller tensor is the one kept while the blocks run
        for layer in self.downsamples:
            x = layer(x, cache)
        return x + shortcut


class UpStage(nn.Module):
    """A Wan 2.2 decoder stage (``Up_ResidualBlock``): residual blocks and a width-keeping upsampler, plus
    ``DupUp3D`` when it upsamples."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, dropout: float, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if spatial else None
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_blocks)]
        if spatial:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", upsample_dim=out_dim))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        main = x
        for layer in self.upsamples:
            main = layer(main, cache)
        if self.avg_shortcut is None:
            return main
        # Without a cache the time convs are skipped, exactly as for a first chunk.
        return main + self.avg_shortcut(x, first_chunk=cache is None or cache.first_chunk)


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(ChannelRMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _down_blocks(config: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
    """Wan 2.1: one flat list of residual (+attention) blocks and resamplers."""
    blocks: list[nn.Module] = []
    scale = 1.0
    last = len(config.dim_mult) - 1
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(config.num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
            if scale in config.attn_scales:
                blocks.append(AttentionBlock(out_dim))
            in_dim = out_dim
        if i != last:
            blocks.append(Resample(out_dim, "downsample3d" if config.temporal_downsample[i] else "downsample2d"))
            scale /= 2.0
    return blocks


def _down_stages(config: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
    last = len(config.dim_mult) - 1
    return [DownStage(in_dim, out_dim, config.num_res_blocks, config.dropout, i != last and config.temporal_downsample[i], i != last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))]


def _up_blocks(config: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
    """Wan 2.1: one flat list; each upsampler halves the channels."""
    temporal_upsample = config.temporal_downsample[::-1]
    blocks: list[nn.Module] = []
    scale = 1.0 / 2 ** (len(config.dim_mult) - 2)
    last = len(config.dim_mult) - 1
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            in_dim = in_dim // 2  # the upsampling conv halved the channels
        for _ in range(config.num_res_blocks + 1):
            blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
            if scale in config.attn_scales:
                blocks.append(AttentionBlock(out_dim))
            in_dim = out_dim
        if i != last:
            blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
            scale *= 2.0
    return blocks


def _up_stages(config: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
    temporal_upsample = config.temporal_downsample[::-1]
    last = len(config.dim_mult) - 1
    return [UpStage(in_dim, out_dim, config.num_res_blocks + 1, config.dropout, i != last and temporal_upsample[i], i != last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))]


class Encoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(config.pixel_channels, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(_down_stages if config.residual else _down_blocks)(config, dims))
        self.middle = _middle(dims[-1], config.dropout)
        self.head = _head(dims[-1], config.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        x = self.conv1.streamed(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return run_streamed(self.head, x, cache)


class Decoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        mult = config.dim_mult
        dims = [config.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], config.dropout)
        self.upsamples = nn.Sequential(*(_up_stages if config.residual else _up_blocks)(config, dims))
        self.head = _head(dims[-1], config.pixel_channels)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        x = self.conv1.streamed(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return run_streamed(self.head, x, cache)


def fold_pixels(video: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B,3,T,H,W]`` -> ``[B,3*p*p,T,H/p,W/p]``, Wan 2.2's channel order (colour, then column, then row)."""
    if patch == 1:
        return video
    return rearrange(video, "b c t (h q) (w r) -> b (c r q) t h w", q=patch, r=patch)


def unfold_pixels(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of ``fold_pixels``."""
    if patch == 1:
        return x
    return rearrange(x, "b (c r q) t h w -> b c t (h q) (w r)", q=patch, r=patch)


class WanVAE(nn.Module):
    """``encode``: video ``[B,3,T,H,W]`` in -1..1 (T = 1+4k) -> raw latent mean ``[B,z,1+(T-1)/4,H/sf,W/sf]``;
    ``decode``: the reverse, clamped to -1..1. Both stream chunk by chunk. ``sf`` is the config's
    ``spatial_factor`` (8 for Wan 2.1, 16 for Wan 2.2)."""

    def __init__(self, config: WanVAEConfig = WanVAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    def encode(self, video: torch.Tensor, on_chunk: ChunkCallback | None = None) -> torch.Tensor:
        tf, patch = self.config.temporal_factor, self.config.patch_size
        frames, height, width = video.shape[2:]
        if (frames - 1) % tf:
            raise ValueError(f"encode needs 1 + {tf}*k frames, got {frames}")
        if height % patch or width % patch:
            raise ValueError(f"encode needs a height and width that are multiples of {patch}, got {height}x{width}")
        cache = FeatureCache()
        chunks = 1 + (frames - 1) // tf
        outputs = []
        for i in range(chunks):
            cache.start_chunk()
            piece = video[:, :, :1] if i == 0 else video[:, :, 1 + tf * (i - 1): 1 + tf * i]  # first frame, then tf at a time
            outputs.append(self.encoder(fold_pixels(piece, patch), cache))
            if on_chunk is not None:
                on_chunk(i + 1, chunks)
        mean, _log_var = self.conv1(torch.cat(outputs, dim=2)).chunk(2, dim=1)
        return mean

    def decode(self, latent: torch.Tensor, on_chunk: ChunkCallback | None = None, clamp: bool = True) -> torch.Tensor:
        """``clamp=False`` keeps gradients of out-of-range pixels (training)."""
        cache = FeatureCache()
        x = self.conv2(latent)
        chunks = latent.shape[2]
        video = None  # filled chunk by chunk: no list of pieces and no concatenated copy
        done = 0
        for i in range(chunks):
            cache.start_chunk()
            piece = unfold_pixels(self.decoder(x[:, :, i: i + 1], cache), self.config.patch_size)  # 1 frame first, then tf frames
            if clamp:
                piece = piece.clamp(-1.0, 1.0)
            if video is None:
                frames = 1 + (chunks - 1) * self.config.temporal_factor
                video = piece.new_empty(piece.shape[0], piece.shape[1], frames, *piece.shape[3:])
            video[:, :, done: done + piece.shape[2]] = piece
            done += piece.shape[2]
            if on_chunk is not None:
                on_chunk(i + 1, chunks)
        return video


VAE_PRESETS: dict[str, WanVAEConfig] = {
    "wan2.1": WanVAEConfig(),
    # Wan-AI/Wan2.2-TI2V-5B's VAE (diffusers: base_dim 160, decoder_base_dim 256, z_dim 48, is_residual, patch_size 2).
    "wan2.2": WanVAEConfig(base_dim=160, decoder_base_dim=256, z_dim=48, residual=True, patch_size=2,
                           latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD),
    "tiny": WanVAEConfig(base_dim=24, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16),
    "tiny2.2": WanVAEConfig(base_dim=16, decoder_base_dim=24, z_dim=48, dim_mult=(1, 2, 2, 2), num_res_blocks=1, residual=True,
                            patch_size=2, latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48),
}
