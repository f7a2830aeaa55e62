"""Our Wan DiT against diffusers' WanTransformer3DModel: weights converted into each of the three
layouts (original, ComfyUI-prefixed, diffusers) and loaded through OUR loader give the same output,
and our real configs have exactly each layout's keys and shapes."""
import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.checkpoint import load_model
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS, WanDiT
from comfyui_spacetime.model_defs.wan_keys import convert_diffusers_dit_state_dict

SMALL = dict(num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16, text_dim=20,
             freq_dim=32, ffn_dim=80, num_layers=2, cross_attn_norm=True, eps=1e-6)


def _diffusers_kwargs(preset: str) -> dict:
    cfg = DIT_PRESETS[preset]
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = WanTransformer3DModel(**SMALL).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing we need random, but make every tensor non-trivial
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
def test_forward_matches_diffusers(reference, layout, tmp_path):
    diffusers_sd = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if layout == "diffusers":
        file_sd = diffusers_sd
    else:
        original = convert_diffusers_dit_state_dict(diffusers_sd)
        file_sd = {("model.diffusion_model." if layout == "comfyui" else "") + k: v for k, v in original.items()}
    path = tmp_path / f"{layout}.safetensors"
    # a head size of 24 is not Wan's 128, so this small model records its config like our own files do
    metadata = {"spacetime_dit_config": json.dumps(dict(
        dim=48, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=2)),
        "spacetime_latent_format": json.dumps({"channels": 16, "mean": [0.0] * 16, "std": [1.0] * 16})}
    save_file(file_sd, path, metadata=metadata)
    ours = load_model(path, torch.float32, REFERENCE).dit

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 3, 6, 10, generator=generator)  # odd grid: 3 x 3 x 5 patches
    timesteps = torch.tensor([999.0, 137.5])
    context = torch.randn(2, 9, 20, generator=generator)
    with torch.no_grad():
        expected = reference(latents, timesteps, context, return_dict=False)[0]
        actual = ours(latents, timesteps, context)
    assert actual.shape == expected.shape
    assert expected.abs().mean() > 0.1  # a real signal, not an all-zero head
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_real_config_keys_and_shapes_equal_each_layout(preset):
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in WanDiT(DIT_PRESETS[preset], REFERENCE).state_dict().items()}
        theirs = WanTransformer3DModel(**_diffusers_kwargs(preset)).state_dict()
    diffusers_shapes = {k: tuple(v.shape) for k, v in theirs.items()}
    converted = {k: tuple(v.shape) for k, v in convert_diffusers_dit_state_dict(theirs).items()}
    assert converted == ours  # original / ComfyUI layout (ComfyUI only adds a prefix)
    assert len(diffusers_shapes) == len(ours)
