"""torch.compile of the DiT's blocks: the compiled DiT computes what the eager one does (also streamed and with
LoRAs, through the jobs), traced as one graph that every block reuses; a compiler that fails falls back to eager
with one log line and never fails the run; the loader's compile input.

The tests compile with the "aot_eager" backend: Dynamo captures each block's graph and AOTAutograd runs it through
the ATen ops, so what can break in compiling our forward (tracing it, guards, recompiles, swapped weights) is
tested; inductor's code generation adds only a C++ build, ~60 s on this CPU, which is out of a unit test's budget
(its outputs against eager are in BENCHMARKS.md, measured by benchmarks/compile.py). Tolerance 1e-6: the graph may
decompose ops and reorder float sums."""
import dataclasses
import functools
import logging

import pytest
import torch
from torch._dynamo.utils import counters

from comfyui_spacetime.jobs.text_to_video import generate
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeConditioning, SpacetimeModel
from comfyui_spacetime.model_defs.compiled import compile_blocks
from comfyui_spacetime.model_defs.flow_matching import SolverSettings
from comfyui_spacetime.model_defs.lora import read_lora
from comfyui_spacetime.model_defs.text_encoders import EncodedText
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.model_defs.weight_streaming import BlockStreamer, plan_for_blocks
from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader

CONFIG = WanDiTConfig(dim=48, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=4)
FORMAT = LatentFormat(16, (0.0,) * 16, (1.0,) * 16)
AOT_EAGER = functools.partial(torch.compile, backend="aot_eager")
TOLERANCE = 1e-6


def _model(seed: int = 0) -> SpacetimeModel:
    dit = WanDiT(CONFIG, REFERENCE).eval().requires_grad_(False)
    dit.init_weights(torch.Generator().manual_seed(seed), zero_head=False)
    return SpacetimeModel(dit, FORMAT, "tiny_wan.safetensors")


def _inputs(seed: int = 3, frames: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, frames, 4, 6, generator=generator), torch.tensor([700.0, 310.0]), torch.randn(2, 9, 20, generator=generator)


def test_compiled_blocks_match_eager_and_share_one_graph():
    model = _model()
    with torch.inference_mode():
        expected = [model.dit(*_inputs()), model.dit(*_inputs(4, frames=2))]
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model.dit, model.name, AOT_EAGER)
    with torch.inference_mode():
        first = model.dit(*_inputs())
        assert counters["stats"]["unique_graphs"] == 1  # one graph for the 4 blocks
        again = model.dit(*_inputs())
        other_size = model.dit(*_inputs(4, frames=2))
    assert counters["stats"]["unique_graphs"] == 2  # a new size: one recompile (dynamic shapes), not one per block
    for got, want in ((first, expected[0]), (again, expected[0]), (other_size, expected[1])):
        assert (got - want).abs().max() <= TOLERANCE


def _conditioning(seed: int) -> SpacetimeConditioning:
    emb = torch.randn(1, 9, 20, generator=torch.Generator().manual_seed(seed))
    return SpacetimeConditioning(EncodedText(emb, torch.ones(1, 9, dtype=torch.bool), ("p",), (False,)), "test")


def test_compiled_and_streamed_with_a_lora_through_the_jobs(tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    save_file({
        "diffusion_model.blocks.1.self_attn.q.lora_down.weight": torch.randn(4, 48, generator=generator) * 0.1,
        "diffusion_model.blocks.1.self_attn.q.lora_up.weight": torch.randn(48, 4, generator=generator) * 0.1,
        "diffusion_model.blocks.0.modulation.diff": torch.randn(1, 6, 48, generator=generator) * 0.1,
    }, tmp_path / "lora.safetensors")
    model = _model().with_lora(read_lora(tmp_path / "lora.safetensors"), 1.0)
    settings = SolverSettings(steps=2, cfg=3.0, shift=3.0, scheduler="euler")
    run = lambda m: generate(m, _conditioning(0), _conditioning(1), torch.zeros(1, 16, 2, 4, 6), 0, settings, torch.device("cpu"))  # noqa: E731
    expected = run(model)
    compile_blocks(model.dit, model.name, AOT_EAGER)
    streamed = dataclasses.replace(model, streamer=BlockStreamer(model.dit, plan_for_blocks(model.dit, 0), pin=False))
    assert (run(streamed) - expected).abs().max() <= TOLERANCE


class _BrokenCompiler:
    """Stands in for a compiler that fails at the first call (as inductor does without a working C++ compiler)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        def compiled(*args, **kwargs):
            self.calls += 1
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\ncommand: g++ ...")

        return compiled


def test_a_failing_compiler_falls_back_to_eager_with_one_log_line(caplog):
    model = _model()
    with torch.inference_mode():
        expected = model.dit(*_inputs())
    broken = _BrokenCompiler()
    compile_blocks(model.dit, model.name, broken)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        first, second = model.dit(*_inputs()), model.dit(*_inputs())
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert broken.calls == 1  # given up after the first failure, for every block
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert lines == ["Spacetime: torch.compile does not work here for tiny_wan.safetensors (RuntimeError: InductorError: "
                     "CppCompileError: C++ compile error); running it without compiling"]


def test_a_compiler_refusing_at_once_and_the_callers_own_errors(caplog):
    model = _model()

    def refuses(fn):
        raise RuntimeError("Dynamo is not supported on this Python version")

    with caplog.at_level(logging.WARNING):
        compile_blocks(model.dit, model.name, refuses)
    assert len([r for r in caplog.records if "torch.compile does not work" in r.getMessage()]) == 1
    with torch.inference_mode():
        model.dit(*_inputs())  # runs eagerly
    broken = _model()
    compile_blocks(broken.dit, broken.name, _BrokenCompiler())
    x, t, context = _inputs()
    with pytest.raises(ValueError, match="timesteps must be"):  # a real error of the input is not swallowed
        broken.dit(x, t[:1].expand(3), context)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"), torch.inference_mode():
        broken.dit(x, t, context[..., :7])  # fails in eager too: the caller's error, raised as eager raises it


def test_the_loader_compile_input():
    (model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "default", "reference", compile="on")
    assert all(getattr(block.forward, "spacetime_compiled", False) for block in model.dit.blocks)
    values = {"model_name": BUILTIN_MODEL, "weight_dtype": "default", "kernels": "auto", "compile": "yes"}
    assert SpacetimeModelLoader.VALIDATE_INPUTS(**values) == "compile: value 'yes' is not allowed; allowed values: ['off', 'on']"
    with pytest.raises(ValueError, match=r"^compile='yes' is not allowed; allowed values: \['off', 'on'\]$"):
        SpacetimeModelLoader().load(BUILTIN_MODEL, compile="yes")
