"""The image-conditioned Wan DiTs' own pieces: the CLIP image embedder and the conditioning channels.

Sources: Wan-Video/Wan2.1 `wan/modules/model.py` (``MLPProj``: parameter names ``img_emb.proj.*`` and FLF2V's
``img_emb.emb_pos``), `wan/image2video.py` and `wan/first_last_frame2video.py` (the mask channels), read
beside diffusers' `WanImageToVideoPipeline.prepare_latents`, which lays them out the same way.

Kinds (``WanDiTConfig.model_type`` / ``clip_branch``):
- Wan 2.1 I2V-14B: 36 input channels (16 noisy + 4 mask + 16 image latents) and a CLIP branch: 257 CLIP
  ViT-H tokens of the first frame, embedded by ``img_emb`` and put before the text tokens; each block's
  cross-attention attends to them through its own ``k_img``/``v_img`` and adds the result.
- Wan 2.1 FLF2V-14B: the same for a first and a last frame, 2 x 257 tokens with learned positions.
- Wan 2.2 I2V-A14B: the 36 channels only, no CLIP branch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .wan_dit import WanDiTConfig

CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token
FLF2V_IMAGE_TOKENS = 2 * CLIP_TOKENS  # first frame's tokens, then the last frame's


def _layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with fp32 statistics (the DiT's precision policy), result in x's dtype."""
    weight = norm.weight.float() if norm.weight is not None else None
    bias = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


class ImageEmbedding(nn.Module):
    """CLIP features ``[B, Li, image_dim]`` -> image tokens ``[B, Li, dim]``: LayerNorm, Linear, GELU, Linear,
    LayerNorm (Wan's ``MLPProj``); FLF2V adds learned positions ``emb_pos [1, 514, image_dim]`` first."""

    def __init__(self, image_dim: int, dim: int, first_last_positions: bool):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(image_dim), nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, dim), nn.LayerNorm(dim)
        )
        self.emb_pos = nn.Parameter(torch.zeros(1, FLF2V_IMAGE_TOKENS, image_dim)) if first_last_positions else None

    def forward(self, image_context: torch.Tensor) -> torch.Tensor:
        x = image_context  # [B,Li,image_dim]
        if self.emb_pos is not None:
            x = x + self.emb_pos[:, : x.shape[1]].to(x.dtype)  # [B,Li,image_dim]; Li = 257 (first frame only) or 514
        norm_in, fc1, act, fc2, norm_out = self.proj
        x = fc1(_layer_norm_fp32(norm_in, x))  # [B,Li,image_dim]
        x = fc2(act(x))  # [B,Li,dim]
        return _layer_norm_fp32(norm_out, x)  # [B,Li,dim]


def check_image_context(config: "WanDiTConfig", batch: int, context: torch.Tensor, image_context: torch.Tensor | None) -> None:
    """ValueError (one line) unless ``image_context`` suits the model: present exactly when it has a CLIP branch,
    ``[batch, Li, image_dim]`` with Li <= 514, and the text ``context`` of ``text_len`` tokens behind which the
    blocks find the image tokens."""
    if not config.clip_branch:
        if image_context is not None:
            raise ValueError(
                f"image_context was given but this {config.model_type} Wan model has no CLIP image branch; pass image_context=None"
            )
        return
    if image_context is None:
        raise ValueError(
            f"image_context is required: this {config.model_type} Wan model has a CLIP image branch; pass the CLIP vision "
            f"features [B, {CLIP_TOKENS if config.model_type == 'i2v' else FLF2V_IMAGE_TOKENS}, {config.image_dim}]"
        )
    limit = FLF2V_IMAGE_TOKENS if config.model_type == "flf2v" else None
    shape = tuple(image_context.shape)
    if len(shape) != 3 or shape[0] != batch or shape[2] != config.image_dim or not 1 <= shape[1] <= (limit or shape[1]):
        tokens = f"1..{limit}" if limit else "Li"
        raise ValueError(f"image_context must be [{batch}, {tokens}, {config.image_dim}] (CLIP features), got {shape}")
    if context.ndim != 3 or context.shape[1] != config.text_len:
        raise ValueError(
            f"context must hold text_len={config.text_len} tokens for an image-conditioned Wan model (the image tokens "
            f"are found before them), got shape {tuple(context.shape)}"
        )


def image_condition(latents: torch.Tensor, known_frames: Iterable[int], temporal_factor: int) -> torch.Tensor:
    """The channels an image-to-video Wan DiT takes after its noisy latents: ``[B, tf + C, F', h, w]``, mask
    channels first, then ``latents``.

    ``latents [B, C, F', h, w]``: the NORMALIZED latents of the conditioning video of ``N = 1 + tf*(F'-1)``
    frames (the known pixel frames, zeros elsewhere, VAE-encoded by the caller). ``known_frames``: indices of
    the known PIXEL frames (negative ones count from the end): ``[0]`` for I2V, ``[0, -1]`` for FLF2V, any set.
    The pixel mask (1 = known) has its first frame repeated ``tf`` times, so it covers ``tf * F'`` slots, which
    are cut into ``tf`` consecutive slots per latent frame, becoming that frame's ``tf`` mask channels
    (Wan's and diffusers' layout)."""
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, C, F', h, w] (normalized VAE latents), got shape {tuple(latents.shape)}")
    if temporal_factor < 1:
        raise ValueError(f"temporal_factor must be >= 1, got {temporal_factor}")
    batch, _, latent_frames, height, width = latents.shape
    num_frames = 1 + temporal_factor * (latent_frames - 1)
    mask = torch.zeros(num_frames, dtype=latents.dtype, device=latents.device)  # [N]
    for index in known_frames:
        if not -num_frames <= index < num_frames:
            raise ValueError(
                f"known_frames: frame {index} is outside the video of {num_frames} frames (allowed: 0..{num_frames - 1}, "
                f"or -{num_frames}..-1 from the end)"
            )
        mask[index] = 1.0
    mask = torch.cat([mask[:1].expand(temporal_factor), mask[1:]])  # [tf*F']: frame 0 repeated tf times
    mask = mask.view(latent_frames, temporal_factor).t()  # [tf, F']: channel c of latent frame t is slot tf*t + c
    mask = mask[None, :, :, None, None].expand(batch, -1, -1, height, width)  # [B,tf,F',h,w]
    return torch.cat([mask, latents], dim=1)  # [B,tf+C,F',h,w]
