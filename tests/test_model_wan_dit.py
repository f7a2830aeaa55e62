"""The Wan DiT: real configs' sizes, config detection from checkpoints, loading through safetensors in
the original and ComfyUI layouts, and the shared layers."""
import math

import pytest
import torch
from safetensors.torch import save_file

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.checkpoint import load_model
from comfyui_spacetime.model_defs.wan_keys import detect_dit_config
from comfyui_spacetime.model_defs.layers import rope_3d_tables, rope_axis_dims, sinusoidal_embedding
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS, WanDiT, WanDiTConfig

SMALL = WanDiTConfig(dim=64, ffn_dim=96, freq_dim=32, text_dim=24, text_len=7, num_heads=2, num_layers=2)


def _meta_state_dict(config):
    with torch.device("meta"):
        return WanDiT(config, REFERENCE).state_dict()


@pytest.mark.parametrize("preset, billions", [("wan2.1-t2v-1.3b", 1.42), ("wan2.1-t2v-14b", 14.29), ("wan2.2-ti2v-5b", 5.00)])
def test_real_configs_have_published_sizes(preset, billions):
    params = sum(t.numel() for t in _meta_state_dict(DIT_PRESETS[preset]).values())
    assert abs(params / 1e9 - billions) < 0.01


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-ti2v-5b", "builtin-tiny"])
def test_config_is_detected_from_keys_and_shapes(preset):
    state_dict = _meta_state_dict(DIT_PRESETS[preset])
    config = detect_dit_config(state_dict)
    if preset == "builtin-tiny":  # 32-dim heads are not Wan's 128: the head count must come from metadata
        assert config.num_heads == DIT_PRESETS[preset].dim // 128 or config == DIT_PRESETS[preset]
    else:
        assert config == DIT_PRESETS[preset]


@pytest.mark.parametrize("fields, message", [
    (dict(model_type="v2v"), r"^model_type='v2v' is not allowed; allowed values: \['t2v', 'i2v', 'flf2v', 'ti2v'\]$"),
    (dict(model_type="flf2v"), r"^model_type='flf2v' needs clip_branch=True"),
    (dict(clip_branch=True), r"^clip_branch=True needs model_type 'i2v' or 'flf2v'"),
])
def test_bad_image_kinds_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        WanDiTConfig(**fields)


def test_image_channels():
    assert [DIT_PRESETS[p].image_channels for p in ("wan2.1-t2v-14b", "wan2.2-ti2v-5b", "wan2.1-i2v-14b", "wan2.2-i2v-a14b")] == [0, 0, 20, 20]


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_load_roundtrip_in_both_layouts(tmp_path, prefix):
    torch.manual_seed(0)
    model = WanDiT(SMALL, REFERENCE)
    model.init_weights(torch.Generator().manual_seed(1), zero_head=False)
    path = tmp_path / "dit.safetensors"
    metadata = {"spacetime_dit_config": __import__("json").dumps(SMALL.to_dict()),
                "spacetime_latent_format": '{"channels": 16, "mean": [0.0], "std": [1.0]}'}
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=metadata)
    loaded = load_model(path, torch.float32, REFERENCE)
    assert loaded.config == SMALL and loaded.name == "dit.safetensors"
    x, t, ctx = torch.randn(1, 16, 3, 4, 6), torch.tensor([700.0]), torch.randn(1, 7, 24)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.dit.state_dict()[key], value), key
    with torch.no_grad():  # same weights; the file's tensors may sit 8- rather than 16-byte aligned (it depends on
        # the header's length), which changes the CPU's SIMD path and so the last bit of a few sums
        torch.testing.assert_close(loaded.dit(x, t, ctx), model(x, t, ctx), rtol=0, atol=2e-6)
    bf16 = load_model(path, torch.bfloat16, REFERENCE)
    assert bf16.dit.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(bf16.dit(x, t, ctx), model(x, t, ctx), rtol=0.1, atol=0.1)


def test_forward_shape_and_dependence_on_inputs():
    model = WanDiT(SMALL, REFERENCE)
    model.init_weights(torch.Generator().manual_seed(2), zero_head=False)
    x, ctx = torch.randn(2, 16, 3, 4, 6), torch.randn(2, 7, 24)
    with torch.no_grad():
        out = model(x, torch.tensor([900.0, 10.0]), ctx)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, model(x, torch.tensor([900.0, 10.0]), ctx.flip(1)))
        assert not torch.allclose(out[0], out[1])
    zero_head = WanDiT(SMALL, REFERENCE)
    zero_head.init_weights(torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert zero_head(x, torch.tensor([5.0, 5.0]), ctx).abs().max() == 0  # adaLN-zero style output head


def test_timestep_embedding_is_cos_then_sin():
    emb = sinusoidal_embedding(torch.tensor([0.0, 3.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = 10000 ** (-torch.arange(4, dtype=torch.float64) / 4)
    torch.testing.assert_close(emb[1].double(), torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]), rtol=1e-6, atol=1e-6)


def test_rope_tables_split_like_wan():
    assert rope_axis_dims(128) == (22, 21, 21)  # Wan: d - 4*(d//6) = 44 dims for time, 42 for h and w
    cos, sin = rope_3d_tables((2, 3, 5), 12)
    assert cos.shape == (30, 6)
    t_pairs, h_pairs, _ = rope_axis_dims(12)
    token = 1 * 15 + 2 * 5 + 4  # (f=1, h=2, w=4)
    angle_t = 1.0 * 10000 ** (-(2 * torch.arange(t_pairs, dtype=torch.float64)) / (2 * t_pairs))
    torch.testing.assert_close(cos[token, :t_pairs].double(), torch.cos(angle_t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[token, t_pairs].double(), torch.sin(torch.tensor(2.0, dtype=torch.float64)), rtol=1e-6, atol=1e-6)
    assert math.isclose(float(sin[token, t_pairs + h_pairs]), math.sin(4.0), rel_tol=1e-6)


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_weights_stay_fp8_and_match_their_dequantized_model(tmp_path, scaled):
    """Plain fp8-e4m3 files and ComfyUI's scaled_fp8 files (weight/scale in fp8 plus `scale_weight`)."""
    from comfyui_spacetime.model_defs.fp8 import FP8Linear

    model = WanDiT(SMALL, REFERENCE)
    model.init_weights(torch.Generator().manual_seed(3), zero_head=False)
    state, dequantized = {}, {}
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for key, value in model.state_dict().items():
        if key in linear_weights:
            scale = value.abs().max() / 448 if scaled else torch.tensor(1.0)
            stored = (value / scale).to(torch.float8_e4m3fn)
            state[key] = stored
            dequantized[key] = stored.float() * scale
            if scaled:
                state[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            state[key] = dequantized[key] = value.contiguous()
    if scaled:
        state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "fp8.safetensors"
    save_file(state, path, metadata={"spacetime_dit_config": __import__("json").dumps(SMALL.to_dict()),
                                     "spacetime_latent_format": '{"channels": 16, "mean": [0.0], "std": [1.0]}'})
    loaded = load_model(path, torch.float32, REFERENCE).dit
    assert isinstance(loaded.blocks[0].ffn[0], FP8Linear)
    assert loaded.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    reference = WanDiT(SMALL, REFERENCE)
    reference.load_state_dict(dequantized)
    x, t, ctx = torch.randn(1, 16, 3, 4, 6), torch.tensor([400.0]), torch.randn(1, 7, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ctx), reference(x, t, ctx), rtol=1e-5, atol=1e-5)
