"""CLIP vision encoder for the Wan 2.1 I2V/FLF2V DiTs' image branch: OpenCLIP ViT-H/14 (hidden 1280, 32 layers,
16 heads, 224 px, 14 px patches, GELU) through transformers' ``CLIPVisionModel``, built on the meta device and
assigned from a .safetensors file (pickles are refused by the reader).

Files and their key layouts:
- transformers' names, ``vision_model.embeddings.patch_embedding.weight``, ..., ``vision_model.encoder.layers.N.
  {self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}``, ``visual_projection.weight``: what
  ComfyUI's CLIP vision files hold (ComfyUI loads them straight into its transformers-named model, comfy/clip_model.py),
  e.g. Comfy-Org/Wan_2.1_ComfyUI_repackaged ``split_files/clip_vision/clip_vision_h.safetensors``, and what
  transformers' own CLIPVisionModel(WithProjection) files hold; any prefix before ``vision_model.`` is accepted;
- OpenCLIP's, ``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ...: converted as
  ComfyUI's comfy/clip_vision.py does (it accepts these too).
The projection, the text tower and ``position_ids`` are not needed and are dropped.

Features as Wan uses them (Wan-Video/Wan2.1 `wan/modules/clip.py`, ``use_31_block``; ComfyUI's
``penultimate_hidden_states``): the hidden states after the second-to-last layer, ``[N, 257, 1280]``, of frames
preprocessed like ComfyUI's ``clip_preprocess`` (bicubic resize of the short side and center crop to 224, or a
plain resize to 224 x 224 as Wan does; 8-bit rounding; CLIP mean/std).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, read_checkpoint, wrong_family_error
from .fp8 import dequantize_fp8

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_HF_MARKER = "embeddings.patch_embedding.weight"  # after an optional prefix ending in "vision_model."
_OPEN_CLIP_MARKER = "transformer.resblocks.0.attn.in_proj_weight"  # after an optional prefix ending in "visual."
# head counts of the published CLIP towers by width (not visible in shapes); others get 64-dimensional heads
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    eps: float = 1e-5
    hidden_act: str = "gelu"

    @property
    def tokens(self) -> int:
        """Tokens per image: the patches and the class token (257 for ViT-H/14 at 224 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_transformers(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, image_size=self.image_size, patch_size=self.patch_size,
            num_channels=self.num_channels, layer_norm_eps=self.eps, hidden_act=self.hidden_act,
        )


CLIP_VISION_PRESETS = {"clip-vit-h-14": ClipVisionConfig()}


def _prefix_of(state_dict: dict, marker: str, must_end: str) -> str | None:
    for key in state_dict:
        if key.endswith(marker):
            prefix = key[: -len(marker)]
            if prefix == "" or prefix.endswith(must_end):
                return prefix
    return None


def _from_open_clip(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's visual tower (``prefix`` stripped) -> transformers' CLIPVisionModel names."""
    top = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
           "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
    in_block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    block = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$|^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
    converted = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in top:
            converted[top[name]] = tensor
        elif (match := block.match(name)) and match[4] is not None:  # fused q/k/v -> three projections
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"encoder.layers.{match[4]}.self_attn.{part}.{match[5]}"] = chunk
        elif match and match[2] in in_block:
            converted[f"encoder.layers.{match[1]}.{in_block[match[2]]}.{match[3]}"] = tensor
    return converted  # the projection ("proj") is dropped


def vision_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The vision tower of a CLIP file in transformers' CLIPVisionModel names, or None when the file holds no
    CLIP vision tower in a layout we know."""
    prefix = _prefix_of(state_dict, _HF_MARKER, "vision_model.")
    if prefix is not None:
        return {key[len(prefix):]: value for key, value in state_dict.items()
                if key.startswith(prefix) and not key.endswith("position_ids")}
    prefix = _prefix_of(state_dict, _OPEN_CLIP_MARKER, "visual.")
    if prefix is not None:
        return _from_open_clip(state_dict, prefix)
    return None


def detect_clip_vision_config(state_dict: dict[str, torch.Tensor]) -> ClipVisionConfig:
    """The config of a vision tower in transformers' names, from its shapes (a preset when one matches)."""
    hidden = state_dict["embeddings.class_embedding"].shape[0]
    patch_weight = state_dict["embeddings.patch_embedding.weight"]  # [hidden, channels, p, p]
    positions = state_dict["embeddings.position_embedding.weight"].shape[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ValueError(f"a CLIP vision tower has 1 + n^2 positions (class token + n x n patches), this one {positions}")
    config = ClipVisionConfig(
        hidden_size=hidden,
        intermediate_size=state_dict["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_layers=1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.layers.")),
        num_heads=_HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)),
        image_size=side * patch_weight.shape[-1],
        patch_size=patch_weight.shape[-1],
        num_channels=patch_weight.shape[1],
    )
    return next((preset for preset in CLIP_VISION_PRESETS.values() if preset == config), config)


def build_clip_vision(state_dict: dict[str, torch.Tensor], config: ClipVisionConfig, name: str):
    """transformers' CLIPVisionModel on the meta device, its parameters assigned from ``state_dict``."""
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(config.to_transformers())
    try:
        model.load_state_dict(state_dict, assign=True, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{name} does not match the CLIP vision layout of {config}: {first_line}") from None
    embeddings = model.embeddings  # its position_ids are a buffer no file holds: made here, off the meta device
    embeddings.register_buffer("position_ids", torch.arange(config.tokens).expand((1, -1)), persistent=False)
    return model.eval().requires_grad_(False)


def clip_preprocess(images: torch.Tensor, size: int, crop: bool = True) -> torch.Tensor:
    """IMAGE frames ``[N,H,W,C]`` in 0..1 -> CLIP pixels ``[N,3,size,size]`` fp32: the short side resized to
    ``size`` (bicubic, antialiased) and the center cut out (``crop``), or the whole frame resized to size x size;
    rounded to 8 bits and normalized with CLIP's mean and std."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be IMAGE frames [N, H, W, 3] in 0..1, got shape {tuple(images.shape)}")
    pixels = images[..., :3].float().movedim(-1, 1)  # [N,3,H,W]
    height, width = pixels.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        resized = (round(height * scale), round(width * scale)) if crop else (size, size)
        pixels = F.interpolate(pixels, size=resized, mode="bicubic", antialias=True)  # [N,3,h,w]
        top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
        pixels = pixels[:, :, top : top + size, left : left + size]  # [N,3,size,size]
    pixels = (pixels * 255).clamp(0, 255).round() / 255
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


class ClipVisionEncoder:
    """A loaded CLIP vision tower and its config; ``encode`` gives Wan's image context."""

    def __init__(self, model, config: ClipVisionConfig, name: str):
        self.model = model
        self.config = config
        self.name = name

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embedding.weight.dtype

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels ``[N,3,S,S]`` -> penultimate hidden states ``[N, tokens, hidden]`` fp32."""
        weight = self.model.embeddings.patch_embedding.weight
        out = self.model(pixel_values=pixels.to(device=weight.device, dtype=weight.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float()  # [N,T,D]: after the second-to-last layer, as Wan uses it

    def encode(self, images: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """IMAGE frames ``[N,H,W,3]`` in 0..1 -> CLIP features ``[N, 257, 1280]`` fp32 (ViT-H/14), on the model's device."""
        return self.encode_pixels(clip_preprocess(images, self.config.image_size, crop))


def load_clip_vision(path: str | Path, dtype: torch.dtype) -> ClipVisionEncoder:
    """A CLIP vision tower from a .safetensors file (transformers/ComfyUI or OpenCLIP names), on the CPU."""
    name = Path(path).name
    state_dict, _ = read_checkpoint(path, dtype)
    vision = vision_state_dict(state_dict)
    if vision is None:
        raise wrong_family_error(name, "CLIP vision", state_dict)
    vision = dequantize_fp8(vision, dtype)
    try:
        config = detect_clip_vision_config(vision)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{name} is not a whole CLIP vision model: {exc}") from None
    return ClipVisionEncoder(build_clip_vision(vision, config, name), config, name)
