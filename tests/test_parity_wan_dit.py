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


def test_per_frame_timesteps_match_diffusers_per_token(tmp_path):
    """Wan 2.2 TI2V's per-token timesteps (diffusers: timestep ``[B, seq_len]``) against ours per latent
    frame ``[B, F']``, on a 48-channel config like the 5B's: a held first frame at 0, the rest at t."""
    torch.manual_seed(2)
    reference = WanTransformer3DModel(**{**SMALL, "in_channels": 48, "out_channels": 48}).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    original = convert_diffusers_dit_state_dict({k: v.contiguous() for k, v in reference.state_dict().items()})
    path = tmp_path / "ti2v.safetensors"
    metadata = {"spacetime_dit_config": json.dumps(dict(
        dim=48, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=2, in_dim=48, out_dim=48)),
        "spacetime_latent_format": json.dumps({"channels": 48, "mean": [0.0] * 48, "std": [1.0] * 48})}
    save_file(original, path, metadata=metadata)
    ours = load_model(path, torch.float32, REFERENCE).dit

    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 48, 3, 6, 10, generator=generator)  # 3 x 3 x 5 patches
    per_frame = torch.tensor([[0.0, 700.0, 700.0], [0.0, 250.0, 250.0]])  # [B, F']
    per_token = per_frame.repeat_interleave(15, dim=1)  # [B, S]: each frame's 3 x 5 tokens
    context = torch.randn(2, 9, 20, generator=generator)
    with torch.no_grad():
        expected = reference(latents, per_token, context, return_dict=False)[0]
        actual = ours(latents, per_frame, context)
        uniform = ours(latents, per_frame[:, 1], context)
    error = (actual - expected).abs().max().item()
    assert expected.abs().mean() > 0.1
    print(f"per-frame timesteps vs diffusers per-token: {error:.2e}")
    assert error <= 1e-5, error
    assert (actual - uniform).abs().max() > 1e-3  # the held frame's timestep changes the prediction


def test_per_frame_timesteps_packed_equal_dense():
    torch.manual_seed(4)
    config = DIT_PRESETS["builtin-tiny"]
    dit = WanDiT(config, REFERENCE).eval()
    dit.init_weights(torch.Generator().manual_seed(0), zero_head=False)
    generator = torch.Generator().manual_seed(5)
    videos = [torch.randn(16, 3, 4, 6, generator=generator), torch.randn(16, 2, 6, 4, generator=generator)]
    per_frame = [torch.tensor([0.0, 500.0, 500.0]), torch.tensor([900.0, 0.0])]
    contexts = torch.randn(2, config.text_len, config.text_dim, generator=generator)
    with torch.no_grad():
        packed = dit.forward_videos(videos, torch.cat(per_frame), contexts)
        for i, video in enumerate(videos):
            dense = dit(video[None], per_frame[i][None], contexts[i: i + 1])[0]
            assert (packed[i] - dense).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="one per latent frame"):
        dit(videos[0][None], torch.zeros(1, 2), contexts[:1])
