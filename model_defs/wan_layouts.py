"""Key layouts of Wan DiT checkpoints: diffusers' ``WanTransformer3DModel`` names -> the original Wan
names our modules use (ComfyUI's repackaged files already use the original names, possibly under a
``model.diffusion_model.`` prefix, which the loader strips). Source of the mapping: diffusers
``WanTransformer3DModel`` and its single-file conversion, read side by side with Wan's ``model.py``."""
from __future__ import annotations

import re

import torch

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
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$|^blocks\.(\d+)\.(scale_shift_table)$")


def _rename(name: str, table: dict[str, str], full_key: str) -> str:
    if name in table:
        return table[name]
    raise KeyError(f"unknown key {full_key!r} in a diffusers-layout Wan DiT")


def convert_diffusers_dit_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``WanTransformer3DModel`` keys -> original Wan keys (tensors unchanged)."""
    converted = {}
    for key, tensor in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match and match.group(5):  # blocks.N.scale_shift_table
            new_key = f"blocks.{match.group(4)}.{_IN_BLOCK['scale_shift_table']}"
        elif match:
            index, name, kind = match.group(1), match.group(2), match.group(3)
            new_key = f"blocks.{index}.{_rename(name, _IN_BLOCK, key)}.{kind}"
        elif key == "scale_shift_table":
            new_key = _TOP_LEVEL[key]
        else:
            name, _, kind = key.rpartition(".")
            new_key = f"{_rename(name, _TOP_LEVEL, key)}.{kind}"
        converted[new_key] = tensor
    return converted
