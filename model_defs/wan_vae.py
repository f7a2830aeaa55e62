"""Wan 2.1 causal 3D VAE: 4x in time, 8x8 in space, 16 latent channels.

Source: Wan-Video/Wan2.1 ``wan/modules/vae.py`` (architecture, streaming scheme and parameter names,
which ``wan_2.1_vae.safetensors`` uses); diffusers ``AutoencoderKLWan`` for the diffusers layout.
Every temporal convolution is causal and streams: encode takes the first frame, then chunks of four;
decode one latent frame at a time. Each causal conv keeps the last two input frames of the previous
chunk in a ``FeatureCache`` passed through the call, so memory is bounded by the chunk, not the video.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

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

    def start_chunk(self) -> None:
        self.index = 0

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
    """2x spatial up/down-sampling, plus 2x in time for the ``*3d`` modes."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1))
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


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    for layer in head:
        x = layer.streamed(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(config.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if config.temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, config.dropout), AttentionBlock(out_dim), ResidualBlock(out_dim, out_dim, config.dropout))
        self.head = nn.Sequential(ChannelRMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, config.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        x = self.conv1.streamed(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = config.temporal_downsample[::-1]
        scale = 1.0 / 2 ** (len(mult) - 2)
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], config.dropout), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0], config.dropout))
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim = in_dim // 2  # the upsampling conv halved the channels
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(ChannelRMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        x = self.conv1.streamed(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return _run_head(self.head, x, cache)


class WanVAE(nn.Module):
    """``encode``: video ``[B,3,T,H,W]`` in -1..1 (T = 1+4k) -> raw latent mean ``[B,z,1+(T-1)/4,H/8,W/8]``;
    ``decode``: the reverse, clamped to -1..1. Both stream chunk by chunk."""

    def __init__(self, config: WanVAEConfig = WanVAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    def encode(self, video: torch.Tensor, on_chunk: ChunkCallback | None = None) -> torch.Tensor:
        tf = self.config.temporal_factor
        frames = video.shape[2]
        if (frames - 1) % tf:
            raise ValueError(f"encode needs 1 + {tf}*k frames, got {frames}")
        cache = FeatureCache()
        chunks = 1 + (frames - 1) // tf
        outputs = []
        for i in range(chunks):
            cache.start_chunk()
            piece = video[:, :, :1] if i == 0 else video[:, :, 1 + tf * (i - 1): 1 + tf * i]  # first frame, then tf at a time
            outputs.append(self.encoder(piece, cache))
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
            piece = self.decoder(x[:, :, i: i + 1], cache)  # 1 frame first, then tf frames
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
    "tiny": WanVAEConfig(base_dim=24, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16),
}
