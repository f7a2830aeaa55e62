"""LoRA on our Wan DiT: unmerged equals merged; the DiT holds its own weights again after sampling (also when
sampling raises); LoRAs stack; strength 0 is the base model exactly; fp8 layers stay fp8 unmerged; a LoRA per
expert of a pair, active only during its expert's steps; the key spellings of one format agree; bad inputs get
one-line errors naming what is wrong. (Parity with diffusers: test_parity_lora.py.)"""
import logging
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from comfyui_spacetime.jobs.text_to_video import generate, pair_experts, stepwise_velocity
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeConditioning, SpacetimeModel
from comfyui_spacetime.model_defs.checkpoint import CheckpointError, build_dit
from comfyui_spacetime.model_defs.flow_matching import SolverSettings
from comfyui_spacetime.model_defs.fp8 import FP8Linear
from comfyui_spacetime.model_defs.lora import applied, read_lora
from comfyui_spacetime.model_defs.text_encoders import EncodedText
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.nodes.lora import SpacetimeLoadLoRA

CONFIG = WanDiTConfig(dim=48, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=2)
FORMAT = LatentFormat(16, (0.0,) * 16, (1.0,) * 16)
LAYERS = ["blocks.0.self_attn.q", "blocks.1.cross_attn.v", "blocks.0.ffn.0", "head.head"]
CPU = torch.device("cpu")


def _model(seed: int = 0, name: str = "tiny_wan.safetensors") -> SpacetimeModel:
    dit = WanDiT(CONFIG, REFERENCE).eval().requires_grad_(False)
    dit.init_weights(torch.Generator().manual_seed(seed), zero_head=False)
    return SpacetimeModel(dit, FORMAT, name)


def _lora_tensors(config: WanDiTConfig = CONFIG, seed: int = 1, layers=LAYERS, prefix: str = "diffusion_model.",
                  down: str = "lora_down", up: str = "lora_up") -> dict[str, torch.Tensor]:
    """Low-rank terms on ``layers`` (alpha / rank = 2), a bias delta and a modulation delta."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {"self_attn.q": (config.dim, config.dim), "cross_attn.v": (config.dim, config.dim),
             "ffn.0": (config.ffn_dim, config.dim), "head.head": (config.out_dim * 4, config.dim)}
    tensors = {}
    for layer in layers:
        out_features, in_features = sizes[layer.split(".", 2)[-1] if layer.startswith("blocks.") else layer]
        tensors[f"{prefix}{layer}.{down}.weight"] = torch.randn(4, in_features, generator=generator) * 0.1
        tensors[f"{prefix}{layer}.{up}.weight"] = torch.randn(out_features, 4, generator=generator) * 0.1
        tensors[f"{prefix}{layer}.alpha"] = torch.tensor(8.0)
    tensors[f"{prefix}blocks.0.ffn.0.diff_b"] = torch.randn(config.ffn_dim, generator=generator) * 0.1
    tensors[f"{prefix}blocks.1.modulation.diff"] = torch.randn(1, 6, config.dim, generator=generator) * 0.1
    return tensors


def _write(tmp_path, name: str, tensors: dict) -> str:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def _inputs(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 2, 4, 6, generator=generator), torch.tensor([700.0]), torch.randn(1, 9, 20, generator=generator)


def _state(dit) -> dict:
    return {k: v.clone() for k, v in dit.state_dict().items()}


def _identical(dit, before: dict, objects: dict) -> bool:
    """Bit-identical tensors, the very same parameter objects, and no hooks left."""
    now = dit.state_dict()
    hooks = sum(len(m._forward_hooks) for m in dit.modules())
    return (hooks == 0 and all(torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in before.items())
            and all(dit.get_parameter(k) is p for k, p in objects.items()))


def _forward(model: SpacetimeModel, loras=()) -> torch.Tensor:
    with torch.no_grad(), applied(model.dit, loras):
        return model.dit(*_inputs())


def test_unmerged_equals_merged_and_strength_scales(tmp_path):
    model = _model()
    lora = read_lora(_write(tmp_path, "a.safetensors", _lora_tensors()))
    base = _forward(model)
    unmerged = _forward(model, model.with_lora(lora, 0.7).loras)
    merged = _forward(model, model.with_lora(lora, 0.7, "merged").loras)
    error = (unmerged - merged).abs().max().item()
    print(f"unmerged vs merged: {error:.2e}, LoRA effect {(unmerged - base).abs().max().item():.3f}")
    assert (unmerged - base).abs().max() > 1e-2
    assert error <= 1e-5
    # strength 0 is the base model exactly, in either mode
    assert torch.equal(_forward(model, model.with_lora(lora, 0.0).loras), base)
    assert torch.equal(_forward(model, model.with_lora(lora, 0.0, "merged").loras), base)


def test_loras_stack(tmp_path):
    model = _model()
    a = _lora_tensors(layers=LAYERS[:2], seed=1)
    b = {k.replace("blocks.1.modulation", "blocks.0.modulation"): v for k, v in _lora_tensors(layers=LAYERS[2:], seed=2).items()}
    a.pop("diffusion_model.blocks.0.ffn.0.diff_b")  # the two files patch different layers: their union is one file
    lora_a, lora_b = read_lora(_write(tmp_path, "a.safetensors", a)), read_lora(_write(tmp_path, "b.safetensors", b))
    union = read_lora(_write(tmp_path, "ab.safetensors", {**a, **b}))
    for mode in ("unmerged", "merged"):
        stacked = _forward(model, model.with_lora(lora_a, 1.0, mode).with_lora(lora_b, 1.0, mode).loras)
        assert (stacked - _forward(model, model.with_lora(union, 1.0, mode).loras)).abs().max() <= 1e-5
    # the same layers twice: their deltas add, in either mode or both
    twice = model.with_lora(lora_a, 0.5).with_lora(lora_a, 0.5, "merged").loras
    assert (_forward(model, twice) - _forward(model, model.with_lora(lora_a, 1.0).loras)).abs().max() <= 1e-5


def _flat(key: str) -> str:
    """``diffusion_model.blocks.0.ffn.0.alpha`` -> ``lora_unet_blocks_0_ffn_0.alpha`` (ComfyUI / kohya)."""
    layer, part = re.match(r"diffusion_model\.(.+?)\.(lora_down\.weight|lora_up\.weight|alpha|diff_b|diff)$", key).groups()
    return f"lora_unet_{layer.replace('.', '_')}.{part}"


def test_key_spellings_of_one_format_agree(tmp_path):
    model = _model()
    expected = _forward(model, model.with_lora(read_lora(_write(tmp_path, "p.safetensors", _lora_tensors())), 1.0).loras)
    for name, tensors in {
        "bare": _lora_tensors(prefix=""),
        "lora_a_b": _lora_tensors(down="lora_A", up="lora_B"),
        "comfy_prefix": _lora_tensors(prefix="model.diffusion_model."),
        "kohya": {_flat(k): v for k, v in _lora_tensors().items()},
    }.items():
        lora = read_lora(_write(tmp_path, f"{name}.safetensors", tensors))
        assert torch.equal(_forward(model, model.with_lora(lora, 1.0).loras), expected), name


def _conditioning(seed: int) -> SpacetimeConditioning:
    emb = torch.randn(1, 9, 20, generator=torch.Generator().manual_seed(seed))
    return SpacetimeConditioning(EncodedText(emb, torch.ones(1, 9, dtype=torch.bool), ("p",), (False,)), "test")


def test_sampling_leaves_the_dit_bit_identical_also_when_it_raises(tmp_path):
    base = _model()
    lora = read_lora(_write(tmp_path, "a.safetensors", _lora_tensors()))
    model = base.with_lora(lora, 1.0).with_lora(lora, -0.5, "merged")
    before, objects = _state(base.dit), dict(base.dit.named_parameters())
    settings = SolverSettings(steps=2, cfg=3.0, shift=3.0, scheduler="euler")
    latent = torch.zeros(1, 16, 2, 4, 6)
    with_lora = generate(model, _conditioning(0), _conditioning(1), latent, 0, settings, CPU)
    assert _identical(base.dit, before, objects)
    plain = generate(base, _conditioning(0), _conditioning(1), latent, 0, settings, CPU)
    assert (with_lora - plain).abs().max() > 1e-3  # the branch without the LoRA shares the module, not the LoRA

    def stop(done, _total, _x0):
        assert sum(len(m._forward_hooks) for m in base.dit.modules()) > 0  # applied while sampling
        raise KeyboardInterrupt("user pressed cancel")

    with pytest.raises(KeyboardInterrupt):
        generate(model, _conditioning(0), _conditioning(1), latent, 0, settings, CPU, on_step=stop)
    assert _identical(base.dit, before, objects)


def test_fp8_layers_stay_fp8_unmerged(tmp_path):
    source = _model().dit.state_dict()
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.endswith(("self_attn.q.weight", "ffn.0.weight")) else v for k, v in source.items()}
    model = SpacetimeModel(build_dit(fp8, CONFIG, torch.float32, REFERENCE, "fp8"), FORMAT, "fp8")
    assert isinstance(model.dit.blocks[0].self_attn.q, FP8Linear)
    lora = read_lora(_write(tmp_path, "a.safetensors", _lora_tensors()))
    before, objects = _state(model.dit), dict(model.dit.named_parameters())
    unmerged_model, merged_model = model.with_lora(lora, 1.0), model.with_lora(lora, 1.0, "merged")
    with torch.no_grad():
        with applied(model.dit, unmerged_model.loras):
            assert model.dit.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
            unmerged = model.dit(*_inputs())
        with applied(model.dit, merged_model.loras):
            assert model.dit.blocks[0].self_attn.q.weight.dtype == torch.float32  # dequantized for the run
            merged = model.dit(*_inputs())
    assert (unmerged - merged).abs().max() <= 1e-5
    assert (unmerged - _forward(model)).abs().max() > 1e-2
    assert _identical(model.dit, before, objects)


def test_a_lora_per_expert_is_active_only_during_its_steps(tmp_path):
    high_lora = read_lora(_write(tmp_path, "high.safetensors", _lora_tensors(seed=1)))
    low_lora = read_lora(_write(tmp_path, "low.safetensors", _lora_tensors(seed=2, layers=LAYERS[1:])))
    high = _model(0, "wan2.2_t2v_high_noise_14B.safetensors").with_lora(high_lora, 1.0)
    low = _model(1, "wan2.2_t2v_low_noise_14B.safetensors").with_lora(low_lora, 1.0, "merged")
    pair = pair_experts(high, low, switch_step=2)
    with pytest.raises(ValueError, match="each expert before Spacetime Pair Experts") as error:
        pair.with_lora(high_lora, 1.0)
    assert "\n" not in str(error.value)

    settings = SolverSettings(steps=4, cfg=1.0, shift=3.0, scheduler="euler")
    seen = []
    high_layer, low_layer = high.dit.blocks[0].self_attn.q, low.dit.blocks[1].cross_attn.v
    low_weight = low_layer.weight

    def velocity_of(dit, cfg):
        def velocity(x, t):
            # (the high expert runs, the high expert's hooks, the low expert's merged weight in place)
            seen.append((dit is high.dit, len(high_layer._forward_hooks), low_layer.weight is not low_weight))
            return torch.zeros_like(x)

        return velocity

    with torch.no_grad(), stepwise_velocity(pair, settings.sigmas(), settings, velocity_of, None) as (velocity, step_start):
        for step in range(settings.steps):
            step_start(step)
            velocity(torch.zeros(1, 16, 2, 4, 6), torch.tensor([500.0]))
    # high-noise steps: the high expert's hooks on, the low expert's weights its own; then the other way round
    assert seen == [(True, 1, False), (True, 1, False), (False, 0, True), (False, 0, True)]
    assert len(high_layer._forward_hooks) == 0 and low_layer.weight is low_weight


# ---- bad input ----

def test_a_pickle_is_refused(tmp_path):
    path = tmp_path / "lora.pt"
    path.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle") as error:
        read_lora(path)
    assert "\n" not in str(error.value)


def test_a_lora_of_another_size_names_the_layer_and_both_shapes(tmp_path):
    other = WanDiTConfig(dim=64, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=2)
    lora = read_lora(_write(tmp_path, "big.safetensors", _lora_tensors(config=other)))
    with pytest.raises(CheckpointError) as error:
        _model().with_lora(lora, 1.0)
    message = str(error.value)
    print(message)
    # the first layer in the file's (sorted) order whose shapes differ, with both shapes
    assert "layer blocks.0.ffn.0 is [80, 64] in the LoRA but [80, 48] in the model" in message and "\n" not in message


def test_keys_matching_nothing_are_named(tmp_path, caplog):
    sd_keys = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(CheckpointError, match="none of its 2 keys match") as error:
        _model().with_lora(read_lora(_write(tmp_path, "sd15.safetensors", sd_keys)), 1.0)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in str(error.value) and "sd15.safetensors" in str(error.value)
    with caplog.at_level(logging.WARNING):
        _model().with_lora(read_lora(_write(tmp_path, "mixed.safetensors", {**_lora_tensors(), **sd_keys})), 1.0)
    assert "2 keys match no layer" in caplog.text and "proj_in" in caplog.text


def test_node_loads_and_chains_and_refuses_nan(tmp_path, monkeypatch):
    monkeypatch.setenv("SPACETIME_MODELS_DIR", str(tmp_path))
    (tmp_path / "loras").mkdir()
    _write(tmp_path / "loras", "style.safetensors", _lora_tensors())
    node = SpacetimeLoadLoRA()
    model = _model()
    (once,) = node.load(model, "style.safetensors", 1.0, "unmerged")
    (twice,) = node.load(once, "style.safetensors", 0.5, "merged")
    assert [(a.strength, a.mode) for a in twice.loras] == [(1.0, "unmerged"), (0.5, "merged")] and model.loras == ()
    problem = SpacetimeLoadLoRA.VALIDATE_INPUTS(strength=math.nan, mode="unmerged")
    assert isinstance(problem, str) and problem.startswith("strength:") and "finite" in problem
    assert "allowed values" in SpacetimeLoadLoRA.VALIDATE_INPUTS(strength=1.0, mode="fused")
    assert SpacetimeLoadLoRA.VALIDATE_INPUTS(strength=-2.5, mode="merged") is True
    with pytest.raises(ValueError, match="strength=nan is not allowed"):
        node.load(model, "style.safetensors", math.nan, "unmerged")
    with pytest.raises(FileNotFoundError, match="lora_name='missing.safetensors'"):
        node.load(model, "missing.safetensors", 1.0, "unmerged")
