"""Weight streaming on the CPU (the same code path as on a GPU, without the side stream): a streamed DiT computes
bit-identical outputs (also with fp8 weights, with LoRAs, and an expert pair through the jobs); the parameter bytes
on the compute device, counted by hooks inside every block, stay within the plan's budget and show blocks really
moving in and out; the DiT holds its own tensors again after a run (also one that raises); the budget rules."""
import dataclasses
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from comfyui_spacetime.jobs.text_to_video import generate, pair_experts
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeConditioning, SpacetimeModel
from comfyui_spacetime.model_defs.checkpoint import build_dit
from comfyui_spacetime.model_defs.flow_matching import SolverSettings
from comfyui_spacetime.model_defs.lora import read_lora
from comfyui_spacetime.model_defs.text_encoders import EncodedText
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.model_defs.weight_streaming import (
    GIB, BlockStreamer, PinnedArena, module_bytes, plan_for_blocks, plan_streaming, stream_weights, tensor_bytes,
)

# 5 blocks (odd), dims that are not powers of two
CONFIG = WanDiTConfig(dim=48, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=5)
FORMAT = LatentFormat(16, (0.0,) * 16, (1.0,) * 16)
CPU = torch.device("cpu")


def _model(seed: int = 0, name: str = "tiny_wan.safetensors", fp8: bool = False) -> SpacetimeModel:
    dit = WanDiT(CONFIG, REFERENCE).eval().requires_grad_(False)
    dit.init_weights(torch.Generator().manual_seed(seed), zero_head=False)
    if fp8:  # the Linear weights of the blocks stored fp8, as an fp8 checkpoint loads
        state = {k: v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and k.endswith("q.weight") or "ffn.0.weight" in k else v
                 for k, v in dit.state_dict().items()}
        dit = build_dit(state, CONFIG, torch.float32, REFERENCE, name)
    return SpacetimeModel(dit, FORMAT, name)


def _streamed(model: SpacetimeModel, resident_blocks: int) -> SpacetimeModel:
    """The same DiT, streamed with ``resident_blocks`` blocks resident (the loader goes by a budget instead)."""
    return dataclasses.replace(model, streamer=BlockStreamer(model.dit, plan_for_blocks(model.dit, resident_blocks), pin=False))


def _inputs(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 3, 4, 6, generator=generator), torch.tensor([700.0, 310.0]), torch.randn(2, 9, 20, generator=generator)


def _device_bytes(dit: torch.nn.Module, streamer: BlockStreamer) -> int:
    """Bytes of the distinct tensors on the compute device: in the DiT's own tables, or moved in by the streamer
    (placed or prefetched). Meta placeholders of blocks moved out hold nothing."""
    tensors = [t for m in dit.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    distinct = {(t.data_ptr(), t.dtype, tuple(t.shape)): tensor_bytes(t) for t in tensors + streamer.moved_in() if t.device.type != "meta"}
    return sum(distinct.values())


def _measure_inside_blocks(model: SpacetimeModel, seen: list) -> list:
    """A pre-hook on every Linear inside the blocks (they run while their block computes) recording the device bytes
    and the dtype of the weight the layer computes with."""
    handles = []
    for block in model.dit.blocks:
        for layer in block.modules():
            if hasattr(layer, "weight") and layer.weight is not None and layer.weight.ndim == 2:
                handles.append(layer.register_forward_pre_hook(
                    lambda m, args: seen.append((_device_bytes(model.dit, model.streamer), m.weight.dtype, m.weight.device.type))))
    return handles


def _state(dit) -> tuple[dict, dict]:
    return {k: v.clone() for k, v in dit.state_dict().items()}, dict(dit.named_parameters())


def _holds_its_own(dit, before: tuple[dict, dict]) -> bool:
    """Bit-identical tensors, the very same parameter objects, nothing on meta and no hooks left."""
    values, objects = before
    now = dit.state_dict()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in dit.modules())
    return (hooks == 0 and all(torch.equal(now[k], v) and now[k].dtype == v.dtype and now[k].device.type == "cpu" for k, v in values.items())
            and all(dit.get_parameter(k) is p for k, p in objects.items()))


@pytest.mark.parametrize("resident_blocks, fp8", [(0, False), (1, False), (2, True)])
def test_streamed_forward_is_identical_and_stays_within_the_budget(resident_blocks, fp8):
    model = _model(fp8=fp8)
    with torch.no_grad():
        expected = model.dit(*_inputs())
    streamed = _streamed(model, resident_blocks)
    plan = streamed.streamer.plan
    block = module_bytes(model.dit.blocks[0])
    assert len(plan.streamed) == CONFIG.num_layers - resident_blocks and plan.in_flight == min(2, len(plan.streamed)) * block
    before = _state(model.dit)
    seen = []
    handles = _measure_inside_blocks(streamed, seen)
    with torch.no_grad(), streamed.streamer.streaming():
        outside = _device_bytes(model.dit, streamed.streamer)  # between calls: the resident part (+ a prefetched block)
        first, second = model.dit(*_inputs()), model.dit(*_inputs())  # the second call starts with a prefetched block
    for handle in handles:
        handle.remove()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    counts = [count for count, _, _ in seen]
    assert max(counts) <= plan.device_bytes < module_bytes(model.dit)  # within the budget, less than the whole model
    assert min(counts) >= plan.resident + block  # the block computing is always there
    assert outside == plan.resident  # before the first call nothing streamed is in
    if fp8:
        assert {dtype for _, dtype, _ in seen} == {torch.float8_e4m3fn, torch.float32}  # fp8 weights moved as stored
    assert _holds_its_own(model.dit, before)


def test_the_dit_holds_its_own_tensors_after_a_run_that_raises():
    model = _streamed(_model(), 1)
    before = _state(model.dit)

    def stop(module, args):
        assert module.self_attn.q.weight.device.type == "cpu"  # moved in
        assert model.dit.blocks[0].self_attn.q.weight.device.type == "meta"  # a streamed block not running: out
        raise KeyboardInterrupt("user pressed cancel")

    handle = model.dit.blocks[2].register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), model.streamer.streaming():
        model.dit(*_inputs())
    handle.remove()
    assert _holds_its_own(model.dit, before)
    with pytest.raises(RuntimeError, match="already streaming"), model.streamer.streaming(), model.streamer.streaming():
        pass


def _conditioning(seed: int) -> SpacetimeConditioning:
    emb = torch.randn(1, 9, 20, generator=torch.Generator().manual_seed(seed))
    return SpacetimeConditioning(EncodedText(emb, torch.ones(1, 9, dtype=torch.bool), ("p",), (False,)), "test")


def _lora(tmp_path, seed: int, name: str):
    """Low-rank terms in two blocks and the head, a bias delta and a modulation delta of a block."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (out_features, in_features) in {"blocks.0.self_attn.q": (48, 48), "blocks.3.ffn.0": (80, 48), "head.head": (64, 48)}.items():
        tensors[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(4, in_features, generator=generator) * 0.1
        tensors[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.1
        tensors[f"diffusion_model.{layer}.alpha"] = torch.tensor(8.0)
    tensors["diffusion_model.blocks.3.ffn.0.diff_b"] = torch.randn(80, generator=generator) * 0.1
    tensors["diffusion_model.blocks.2.modulation.diff"] = torch.randn(1, 6, 48, generator=generator) * 0.1
    save_file(tensors, tmp_path / name)
    return read_lora(tmp_path / name)


SETTINGS = SolverSettings(steps=3, cfg=3.0, shift=3.0, scheduler="euler")
LATENT = torch.zeros(1, 16, 2, 4, 6)


def _generate(model: SpacetimeModel, use=None) -> torch.Tensor:
    return generate(model, _conditioning(0), _conditioning(1), LATENT, 0, SETTINGS, CPU, use=use)


def test_loras_unmerged_and_merged_on_a_streamed_dit(tmp_path):
    base = _model()
    lora = _lora(tmp_path, 1, "a.safetensors")
    with_loras = base.with_lora(lora, 1.0).with_lora(_lora(tmp_path, 2, "b.safetensors"), 0.7, "merged")
    expected = _generate(with_loras)
    assert (expected - _generate(base)).abs().max() > 1e-3  # the LoRAs change the result
    streamed = _streamed(with_loras, 2)
    assert streamed.streamer.plan.streamed == (0, 2, 4)  # LoRA'd blocks streamed (0; 2's modulation) and resident (3)
    before = _state(base.dit)
    assert torch.equal(_generate(streamed), expected)
    assert _holds_its_own(base.dit, before)


def test_an_expert_pair_streams_each_expert_through_the_jobs():
    high, low = _model(0, "wan2.2_t2v_high_noise_14B.safetensors"), _model(1, "wan2.2_t2v_low_noise_14B.safetensors")
    settings = SolverSettings(steps=4, cfg=3.0, shift=3.0, scheduler="euler")
    run = lambda pair, use=None: generate(pair, _conditioning(0), _conditioning(1), LATENT, 0, settings, CPU, use=use)  # noqa: E731
    expected = run(pair_experts(high, low, switch_step=2))
    streamed_high, streamed_low = _streamed(high, 1), _streamed(low, 3)
    pair = pair_experts(streamed_high, streamed_low, switch_step=2)
    assert pair.streamer is streamed_high.streamer and pair.low_noise.streamer is streamed_low.streamer
    placed = []
    assert torch.equal(run(pair, placed.append), expected)
    # each expert's resident part is what gets placed, in turn
    assert placed == [streamed_high.streamer.resident, streamed_low.streamer.resident]
    assert module_bytes(placed[0]) == streamed_high.streamer.plan.resident < module_bytes(high.dit)


# ---- budget rules ----

def test_the_budget_keeps_as_many_blocks_as_fit():
    dit = _model().dit
    for resident_blocks in range(CONFIG.num_layers - 2):  # 3 resident + 2 in flight: the whole model
        exact = plan_for_blocks(dit, resident_blocks)
        plan = plan_streaming(dit, exact.device_bytes / GIB, CPU)
        assert plan == exact
        if resident_blocks:  # a byte less: one block fewer
            assert plan_streaming(dit, (exact.device_bytes - 1) / GIB, CPU) == plan_for_blocks(dit, resident_blocks - 1)
        else:
            with pytest.raises(ValueError, match="too small"):
                plan_streaming(dit, (exact.device_bytes - 1) / GIB, CPU)
    assert plan_streaming(dit, 0.0, CPU) is None  # off
    assert plan_streaming(dit, module_bytes(dit) / GIB, CPU) is None  # all fits


@pytest.mark.parametrize("budget", [-1.0, math.nan, math.inf, "2"])
def test_a_negative_or_nan_budget_is_refused_naming_the_input(budget):
    with pytest.raises(ValueError, match=r"^gpu_budget_gb=.* is not allowed: it must be a finite number >= 0") as error:
        stream_weights(_model(), budget, CPU)
    assert "\n" not in str(error.value)


def test_a_budget_too_small_names_the_smallest_allowed():
    model = _model()
    need = plan_for_blocks(model.dit, 0).device_bytes / GIB
    with pytest.raises(ValueError, match=r"too small for tiny_wan.safetensors: .* allowed: 0 \(off\) or at least (\d+\.\d\d)$") as error:
        stream_weights(model, need / 2, CPU)
    smallest = float(error.value.args[0].rsplit(" ", 1)[-1])
    assert need <= smallest < need + 0.01


def test_a_budget_larger_than_the_gpu_uses_what_fits_and_says_so(monkeypatch, caplog):
    dit = _model().dit
    room = plan_for_blocks(dit, 2).device_bytes  # a "GPU" whose weight share holds 2 blocks
    gpu = SimpleNamespace(total_memory=math.ceil(room / 0.9))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Test GPU")
    with caplog.at_level(logging.INFO):
        plan = plan_streaming(dit, 1000.0, torch.device("cuda"))
    assert plan == plan_for_blocks(dit, 2)
    lines = [r.getMessage() for r in caplog.records if "gpu_budget_gb" in r.getMessage()]
    assert len(lines) == 1 and "gpu_budget_gb=1000 is more than Test GPU can hold" in lines[0]


def test_a_model_is_streamed_once():
    model = stream_weights(_model(), plan_for_blocks(_model().dit, 1).device_bytes / GIB, CPU)
    assert model.streamer is not None and len(model.streamer.plan.streamed) == CONFIG.num_layers - 1
    with pytest.raises(ValueError, match="already streamed; set gpu_budget_gb once, on its loader"):
        stream_weights(model, 1.0, CPU)


@pytest.mark.parametrize("chunk", [2**17, 2**13])  # 8 KiB: the fp32 attention weights (9 KiB) get buffers of their own
def test_pinned_blocks_are_packed_into_few_buffers(monkeypatch, chunk):
    """The pinned path on the CPU with a plain allocator: streamed tensors copied into a few power-of-two buffers
    (not one rounded-up allocation each, as PyTorch's pinned allocator would make), the output unchanged."""
    model = _model(fp8=True)
    with torch.no_grad():
        expected = model.dit(*_inputs())
    buffers = []

    def allocate(count):
        buffers.append(torch.zeros(count, dtype=torch.uint8))
        return buffers[-1]

    monkeypatch.setattr(PinnedArena, "CHUNK", chunk)  # a block spans buffers, as a 14B block spans GiB buffers
    plan = plan_for_blocks(model.dit, 2)
    streamer = BlockStreamer(model.dit, plan, pin=True, allocate=allocate)
    stored = [t for i in plan.streamed for t in model.dit.blocks[i].state_dict().values()]
    total = sum(PinnedArena.padded(t) for t in stored)
    inside = lambda t, b: b.data_ptr() <= t.data_ptr() < b.data_ptr() + b.numel()  # noqa: E731
    assert all(any(inside(t, b) for b in buffers) for t in stored)
    base = lambda t: next(b.data_ptr() for b in buffers if inside(t, b))  # noqa: E731
    assert all((t.data_ptr() - base(t)) % PinnedArena.ALIGN == 0 for t in stored)  # (pinned buffers are page-aligned)
    one_each = sum(1 << (tensor_bytes(t) - 1).bit_length() for t in stored)  # the pinned allocator's rounding
    assert streamer.arena.allocated == sum(b.numel() for b in buffers) <= 1.1 * total < one_each
    with torch.no_grad(), streamer.streaming():
        assert torch.equal(model.dit(*_inputs()), expected)


@pytest.mark.parametrize("method", ["teacache", "fbcache"])
def test_a_step_cache_on_a_streamed_dit_skips_the_same_steps_and_gives_the_same_result(method):
    """Skipped steps run no block (no streaming hook fires); the next computed step must still find its blocks."""
    from comfyui_spacetime.model_defs.step_cache import StepCacheSettings

    settings = SolverSettings(steps=8, cfg=3.0, shift=3.0, scheduler="euler")
    cache = StepCacheSettings(method, 0.3 if method == "teacache" else 0.2, coefficients="wan2.1-t2v-1.3b")
    cached = _model().with_step_cache(cache)
    computed = []
    handle = cached.dit.blocks[-1].register_forward_hook(lambda *a: computed.append(1))
    try:
        expected = generate(cached, _conditioning(0), _conditioning(1), LATENT, 0, settings, CPU)
        plain_count, computed[:] = len(computed), []
        streamed = _streamed(cached, 2)
        assert torch.equal(generate(streamed, _conditioning(0), _conditioning(1), LATENT, 0, settings, CPU), expected)
    finally:
        handle.remove()
    assert len(computed) == plain_count < settings.steps  # the cache skipped steps, the same ones
