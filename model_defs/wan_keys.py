"""The Wan family's checkpoint key layouts and config detection, DiT and VAE together.

- diffusers' ``WanTransformer3DModel`` / ``AutoencoderKLWan`` names -> the original Wan names our modules
  use (ComfyUI's repackaged files already use the original names, possibly under a
  ``model.diffusion_model.`` prefix, which the loader strips). Source of the mappings: diffusers' Wan
  models and their single-file conversion, read side by side with Wan's ``model.py``, ``vae.py`` and Wan 2.2's ``vae2_2.py``.
- the config of an original-layout state dict, from its keys and shapes: a pure function of them.
"""
from __future__ import annotations

import math
import re

import torch

from .wan_dit import DIT_PRESETS, WanDiTConfig
from .wan_vae import VAE_PRESETS, WanVAEConfig

# Keys every Wan DiT state dict holds; config detection reads their shapes.
DIT_REQUIRED_KEYS = (
    "patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight", "blocks.0.ffn.0.weight",
)


VAE_REQUIRED_KEYS = ("encoder.conv1.weight", "conv2.weight", "decoder.head.0.gamma")
RESIDUAL_VAE_MARKER = "encoder.downsamples.0.downsamples.0.residual.0.gamma"  # only Wan 2.2's nested stages have it
REAL_VAE_PRESETS = ("wan2.1", "wan2.2")  # the published VAEs, whose statistics DiTs were trained in


class MissingKeysError(KeyError):
    """A state dict lacks keys its family needs (the loader turns it into a CheckpointError)."""

# Whole-name renames, applied to the part after ``blocks.N.`` for block keys and to the full key otherwise.
_TOP_LEVEL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
    "patch_embedding": "patch_embedding",
}
_IN_BLOCK = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",  # diffusers' norm2 is the cross-attention norm (Wan's norm3)
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# Tensors some diffusers I2V checkpoints carry that no model uses (diffusers ignores them on load too).
_UNUSED = re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.(weight|bias)$")
_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(name: str, table: dict[str, str], full_key: str) -> str:
    if name in table:
        return table[name]
    raise KeyError(f"unknown key {full_key!r} in a diffusers-layout Wan DiT")


def original_dit_name(name: str, full_key: str | None = None) -> str:
    """A diffusers ``WanTransformer3DModel`` module or parameter name, without a ``.weight``/``.bias`` ending
    (``blocks.0.attn1.to_q``, ``scale_shift_table``), as the original Wan name (``blocks.0.self_attn.q``,
    ``head.modulation``); KeyError naming ``full_key`` (default: ``name``) when it is not one."""
    full_key = full_key or name
    match = _BLOCK_NAME.match(name)
    if match:
        return f"blocks.{match.group(1)}.{_rename(match.group(2), _IN_BLOCK, full_key)}"
    if name == "condition_embedder.image_embedder.pos_embed":  # FLF2V's learned CLIP token positions
        return "img_emb.emb_pos"
    return _rename(name, _TOP_LEVEL, full_key)


def convert_diffusers_dit_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``WanTransformer3DModel`` keys -> original Wan keys (tensors unchanged)."""
    converted = {}
    for key, tensor in state_dict.items():
        if _UNUSED.match(key):
            continue
        name, _, kind = key.rpartition(".")
        if kind in ("weight", "bias"):
            converted[f"{original_dit_name(name, key)}.{kind}"] = tensor
        else:  # parameters of their own: scale_shift_table, pos_embed
            converted[original_dit_name(key)] = tensor
    return converted


def _image_kind(state_dict: dict[str, torch.Tensor], in_dim: int, out_dim: int) -> dict:
    """model_type, clip_branch and image_dim from the keys: a CLIP branch has ``img_emb``; FLF2V's also has
    learned positions; Wan 2.2 I2V has neither but takes more input channels than it predicts."""
    if "img_emb.proj.0.weight" in state_dict:
        kind = "flf2v" if "img_emb.emb_pos" in state_dict else "i2v"
        return dict(model_type=kind, clip_branch=True, image_dim=state_dict["img_emb.proj.0.weight"].shape[0])
    if in_dim > out_dim:
        return dict(model_type="i2v", clip_branch=False)
    # the only DiT on the Wan 2.2 VAE's latents is TI2V-5B, trained with per-token timesteps
    return dict(model_type="ti2v" if out_dim == VAE_PRESETS["wan2.2"].z_dim else "t2v", clip_branch=False)


def detect_dit_config(state_dict: dict[str, torch.Tensor]) -> WanDiTConfig:
    """The config of an original-layout Wan DiT state dict, from its keys and shapes (a preset when one
    matches); ``MissingKeysError`` naming the missing keys when it is not a whole DiT."""
    missing = [key for key in DIT_REQUIRED_KEYS if key not in state_dict]
    if missing:
        raise MissingKeysError(missing)
    patch_weight = state_dict["patch_embedding.weight"]  # [dim, in_dim, pt, ph, pw]
    dim, in_dim = patch_weight.shape[:2]
    patch = tuple(int(s) for s in patch_weight.shape[2:])
    num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    shapes = dict(
        dim=dim,
        in_dim=in_dim,
        patch_size=patch,
        num_layers=num_layers,
        ffn_dim=state_dict["blocks.0.ffn.0.weight"].shape[0],
        text_dim=state_dict["text_embedding.0.weight"].shape[1],
        freq_dim=state_dict["time_embedding.0.weight"].shape[1],
        out_dim=state_dict["head.head.weight"].shape[0] // math.prod(patch),
        cross_attn_norm="blocks.0.norm3.weight" in state_dict,
        **_image_kind(state_dict, in_dim, state_dict["head.head.weight"].shape[0] // math.prod(patch)),
    )
    for preset in DIT_PRESETS.values():
        if all(getattr(preset, name) == value for name, value in shapes.items()):
            return preset
    # Every published Wan model uses 128-dimensional heads; the head count is not visible in shapes.
    return WanDiTConfig(num_heads=dim // 128, **shapes)


# diffusers AutoencoderKLWan -> original names. Residual-block parts and top-level renames:
_RESBLOCK_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6", "conv_shortcut": "shortcut"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_SIDE = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
_MID = {("resnets", "0"): "middle.0", ("attentions", "0"): "middle.1", ("resnets", "1"): "middle.2"}


def _resblock_rest(rest: str) -> str:
    part, _, tail = rest.partition(".")
    return f"{_RESBLOCK_PARTS.get(part, part)}.{tail}" if part in _RESBLOCK_PARTS else rest


def _resnets_per_block(state_dict: dict, prefix: str) -> int:
    """How many ``resnets`` the diffusers block ``prefix`` holds (0 when it has none)."""
    found = [int(m[1]) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}\.resnets\.(\d+)\.", k))]
    return 1 + max(found) if found else 0


def convert_diffusers_vae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKLWan`` keys -> original Wan keys (tensors unchanged). Wan 2.1 layout (flat
    ``down_blocks``, ``up_blocks.N.upsamplers.0``) or Wan 2.2's ``is_residual`` one (``down_blocks.N.resnets``/
    ``downsampler``, ``up_blocks.N.upsampler``, which are ``downsamples.N.downsamples.M`` / ``upsamples.N.upsamples.M``
    in Wan 2.2's names, the sampler last in its stage). No attention in the up/down paths."""
    up_resnets = _resnets_per_block(state_dict, "decoder.up_blocks.0")
    down_resnets = _resnets_per_block(state_dict, "encoder.down_blocks.0")  # 0 in the Wan 2.1 layout
    stage = up_resnets + 1  # Wan 2.1: entries per decoder stage in the flat original list (resblocks + upsampler)
    converted = {}
    for key, tensor in state_dict.items():
        side, _, rest = key.partition(".")
        if side in _TOP:
            new = f"{_TOP[side]}.{rest}"
        elif (m := re.match(r"(conv_in|norm_out|conv_out)\.(.+)$", rest)):
            new = f"{side}.{_SIDE[m[1]]}.{m[2]}"
        elif (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", rest)):
            new = f"{side}.{_MID[(m[1], m[2])]}.{_resblock_rest(m[3])}"
        elif (m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)):  # Wan 2.2
            new = f"{side}.downsamples.{m[1]}.downsamples.{m[2]}.{_resblock_rest(m[3])}"
        elif (m := re.match(r"down_blocks\.(\d+)\.downsampler\.(.+)$", rest)):  # Wan 2.2
            new = f"{side}.downsamples.{m[1]}.downsamples.{down_resnets}.{m[2]}"
        elif (m := re.match(r"down_blocks\.(\d+)\.(.+)$", rest)):
            new = f"{side}.downsamples.{m[1]}.{_resblock_rest(m[2])}"
        elif (m := re.match(r"up_blocks\.(\d+)\.upsampler\.(.+)$", rest)):  # Wan 2.2
            new = f"{side}.upsamples.{m[1]}.upsamples.{up_resnets}.{m[2]}"
        elif down_resnets and (m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)):  # Wan 2.2
            new = f"{side}.upsamples.{m[1]}.upsamples.{m[2]}.{_resblock_rest(m[3])}"
        elif (m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)):
            new = f"{side}.upsamples.{int(m[1]) * stage + int(m[2])}.{_resblock_rest(m[3])}"
        elif (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest)):
            new = f"{side}.upsamples.{int(m[1]) * stage + up_resnets}.{m[2]}"
        else:
            raise KeyError(f"unknown key {key!r} in a diffusers-layout Wan VAE")
        converted[new] = tensor
    return converted


def _flat_stages(state_dict: dict, base_dim: int) -> dict:
    """Wan 2.1's encoder: one flat list of residual blocks and resamplers."""
    entries = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.downsamples.")})
    resamples = [i for i in entries if f"encoder.downsamples.{i}.resample.1.weight" in state_dict]
    stages = len(resamples) + 1
    num_res_blocks = (len(entries) - len(resamples)) // stages
    dim_mult = tuple(
        state_dict[f"encoder.downsamples.{s * (num_res_blocks + 1)}.residual.2.weight"].shape[0] // base_dim for s in range(stages)
    )
    temporal = tuple(f"encoder.downsamples.{i}.time_conv.weight" in state_dict for i in resamples)
    return dict(dim_mult=dim_mult, num_res_blocks=num_res_blocks, temporal_downsample=temporal)


def _residual_stages(state_dict: dict, base_dim: int) -> dict:
    """Wan 2.2's encoder: ``downsamples.S.downsamples.M``, residual blocks then the stage's resampler."""
    stages = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.downsamples."))
    num_res_blocks = sum(1 for k in state_dict if re.match(r"encoder\.downsamples\.0\.downsamples\.\d+\.residual\.2\.weight$", k))
    dim_mult = tuple(state_dict[f"encoder.downsamples.{s}.downsamples.0.residual.2.weight"].shape[0] // base_dim for s in range(stages))
    temporal = tuple(f"encoder.downsamples.{s}.downsamples.{num_res_blocks}.time_conv.weight" in state_dict for s in range(stages - 1))
    return dict(dim_mult=dim_mult, num_res_blocks=num_res_blocks, temporal_downsample=temporal)


def detect_vae_config(state_dict: dict[str, torch.Tensor]) -> WanVAEConfig:
    """The config of an original-layout Wan 2.1 or 2.2 VAE state dict, from its keys and shapes, with the
    published statistics of the real VAE of its kind and width (zeros and ones otherwise);
    ``MissingKeysError`` naming the missing keys when it is not a whole VAE."""
    missing = [key for key in VAE_REQUIRED_KEYS if key not in state_dict]
    if missing:
        raise MissingKeysError(missing)
    conv_in = state_dict["encoder.conv1.weight"]  # [base_dim, 3 * patch^2, 3, 3, 3]
    base_dim = conv_in.shape[0]
    z_dim = state_dict["conv2.weight"].shape[0]
    residual = RESIDUAL_VAE_MARKER in state_dict
    shapes = (_residual_stages if residual else _flat_stages)(state_dict, base_dim)
    decoder_dim = state_dict["decoder.head.0.gamma"].shape[0] // shapes["dim_mult"][0]
    real = next((p for name in REAL_VAE_PRESETS if (p := VAE_PRESETS[name]).z_dim == z_dim and p.residual == residual), None)
    return WanVAEConfig(base_dim=base_dim, z_dim=z_dim, residual=residual, patch_size=math.isqrt(conv_in.shape[1] // 3),
                        decoder_base_dim=None if decoder_dim == base_dim else decoder_dim, **shapes,
                        latents_mean=real.latents_mean if real else (0.0,) * z_dim,
                        latents_std=real.latents_std if real else (1.0,) * z_dim)
