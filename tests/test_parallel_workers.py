"""The multi-process runtime behind Spacetime Multi-GPU, on the built-in model with CPU worker processes (gloo): the same
samples as one process, workers kept between runs, a killed worker ending the run in one line with no process left
behind (also when the host itself dies), and every bad input refused in one line before any process starts."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from comfyui_spacetime.jobs.packed import PackedItem, generate_packed
from comfyui_spacetime.jobs.parallel import RemoteDiT, parse_devices
from comfyui_spacetime.jobs.text_to_video import generate
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.builtin import BUILTIN_LORAS, builtin_lora_path, builtin_model
from comfyui_spacetime.model_defs.compiled import compile_blocks
from comfyui_spacetime.model_defs.bundles import SpacetimeConditioning
from comfyui_spacetime.model_defs.experts import ExpertSwitch
from comfyui_spacetime.model_defs.flow_matching import SolverSettings
from comfyui_spacetime.model_defs.lora import applied, read_lora
from comfyui_spacetime.model_defs.step_cache import StepCacheSettings
from comfyui_spacetime.model_defs.text_encoders import EncodedText
from comfyui_spacetime.nodes.parallel import SpacetimeMultiGPU

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
LATENT = torch.zeros(1, 16, 3, 6, 10)  # 3 latent frames of 3x5 patches: odd, non-power-of-two lengths
SETTINGS = SolverSettings(steps=4, cfg=5.0, shift=3.0, scheduler="unipc")
FEWSTEP = SolverSettings(steps=4, cfg=1.0, shift=3.0, scheduler="euler_distill")  # the built-in few-step LoRA's settings


def _cond(seed: int, tokens: int = 7) -> SpacetimeConditioning:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.zeros(1, 12, 384)
    embeddings[:, :tokens] = torch.randn(1, tokens, 384, generator=generator)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, :tokens] = True
    return SpacetimeConditioning(EncodedText(embeddings, mask, ("x",), (False,)), "test-encoder")


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (the container's init may not reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.fixture(scope="module")
def with_lora(tiny_model):
    """The built-in model with its few-step LoRA at 0.7, unmerged: what the host computes for a run."""
    return tiny_model.with_lora(read_lora(builtin_lora_path(next(iter(BUILTIN_LORAS)))), 0.7)


@pytest.fixture(scope="module")
def workers(with_lora):
    """``with_lora`` on two CPU worker processes (ring degree 2, the blocks' weights FSDP-sharded over both), started
    once for the module: its LoRA travels with the weights."""
    model = SpacetimeMultiGPU().apply(with_lora, "cpu x2", ulysses=1, ring=2, cfg_parallel=False, fsdp=True)[0]
    yield model
    pids = model.dit.runtime.pids
    model.dit.runtime.close()
    assert all(_gone(pid) for pid in pids)


def test_the_node_returns_the_same_model_on_workers(workers, tiny_model):
    assert isinstance(workers.dit, RemoteDiT) and len(workers.dit.runtime.pids) == 2
    assert workers.loras == ()  # applied in the workers
    assert workers.name == tiny_model.name and workers.latent_format is tiny_model.latent_format
    assert workers.config == tiny_model.config and workers.dtype == tiny_model.dtype


def test_forward_generate_and_packed_equal_one_process(workers, with_lora):
    """Ring attention over 2 ranks reorders the attention sums: one forward, and a run at the LoRA's own settings (cfg 1),
    equal the single process within 1e-5; a guided run within 5e-5, as cfg 5 scales each pass's rounding by up to
    2 * cfg - 1 = 9 on every step (measured: 2e-5 for UniPC, 3e-5 for Euler, on values up to 3.6)."""
    tiny_model = with_lora  # the reference: one process, the LoRA applied by the sampler
    generator = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(2, 16, 3, 6, 10, generator=generator), torch.tensor([900.0, 300.0]), torch.randn(2, 32, 384, generator=generator)
    with torch.inference_mode(), applied(tiny_model.dit, tiny_model.loras):
        expected = tiny_model.dit(x, t, ctx)
    with torch.inference_mode():
        assert (workers.dit(x, t, ctx) - expected).abs().max().item() <= 1e-5 and expected.abs().max() > 1.0
    pos, neg = _cond(1), _cond(2, tokens=3)
    steps = []
    ours = generate(workers, pos, neg, LATENT, 7, FEWSTEP, CPU, on_step=lambda done, total, x0: steps.append(done))
    reference = generate(tiny_model, pos, neg, LATENT, 7, FEWSTEP, CPU)
    assert steps == [1, 2, 3, 4]  # the host drives the sampler: its progress, step by step
    assert (ours - reference).abs().max().item() <= 1e-5 and reference.abs().max() > 0.1
    guided = generate(workers, pos, neg, LATENT, 7, SETTINGS, CPU)
    assert (guided - generate(tiny_model, pos, neg, LATENT, 7, SETTINGS, CPU)).abs().max().item() <= 5e-5
    items = [PackedItem(pos, neg, (1, 16, 2, 4, 6), 3, "a"), PackedItem(neg, pos, (1, 16, 1, 6, 4), 4, "b")]
    for settings, tolerance in ((FEWSTEP, 1e-5), (SolverSettings(2, 4.0, 3.0, "euler"), 5e-5)):
        packed = generate_packed(workers, items, settings, CPU, max_tokens=10_000)
        expected = generate_packed(tiny_model, items, settings, CPU, max_tokens=10_000)
        assert all((a - b).abs().max().item() <= tolerance for a, b in zip(packed, expected))


def test_a_second_run_reuses_the_workers(workers):
    runtime = workers.dit.runtime
    before = runtime.stats()
    generate(workers, _cond(3), _cond(4), LATENT, 1, SolverSettings(2, 1.0, 3.0, "euler"), CPU)
    after = runtime.stats()
    assert [s["pid"] for s in after] == [s["pid"] for s in before] == runtime.pids
    assert [s["builds"] for s in after] == [1, 1] and runtime.starts == 1  # weights shipped once
    assert all(a["calls"] == b["calls"] + 2 for a, b in zip(after, before))  # 2 steps at cfg 1: one call each


def test_a_killed_worker_ends_the_run_in_one_line_and_the_next_run_restarts(workers, with_lora):
    runtime = workers.dit.runtime
    old = list(runtime.pids)

    def kill_at_step(done, total, x0):
        if done == 1:
            os.kill(old[1], signal.SIGKILL)

    started = time.monotonic()
    with pytest.raises(RuntimeError) as caught:
        generate(workers, _cond(1), _cond(2), LATENT, 7, FEWSTEP, CPU, on_step=kill_at_step)
    message = str(caught.value)
    assert "\n" not in message and time.monotonic() - started < 30
    assert "worker rank 1 (cpu) was killed by SIGKILL" in message, message
    assert all(_gone(pid) for pid in old) and not runtime.alive  # the other worker was stopped too: no orphan
    ours = generate(workers, _cond(1), _cond(2), LATENT, 7, FEWSTEP, CPU)  # a dead runtime is not reused: it restarts
    assert runtime.starts == 2 and set(runtime.pids).isdisjoint(old)
    assert (ours - generate(with_lora, _cond(1), _cond(2), LATENT, 7, FEWSTEP, CPU)).abs().max().item() <= 1e-5


def test_workers_exit_when_their_host_dies():
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from spacetime_bootstrap import load_package
        load_package()
        from comfyui_spacetime.kernels import REFERENCE
        from comfyui_spacetime.model_defs.builtin import builtin_model
        from comfyui_spacetime.jobs.parallel import make_plan, parallel_model
        model = parallel_model(builtin_model(REFERENCE), "cpu x2", make_plan(1, 2, False, False))
        print(*model.dit.runtime.pids, flush=True)
        time.sleep(120)
    """)
    host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        pids = [int(p) for p in host.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
    finally:
        host.kill()
        host.wait()
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids)


# --- bad inputs: one line each, naming the input and what fits, before any process starts -----------------------

@pytest.mark.parametrize("values, expected", [
    ({"devices": "gpu x2"}, "devices='gpu x2': 'gpu x2' is not a device; allowed: cpu, cuda, cuda:N"),
    ({"devices": "cpu x0"}, "x0 is not allowed; allowed: a count of 1 to 64"),
    ({"devices": "cpu, cuda:0"}, "mixes CPU and CUDA devices"),
    ({"devices": "cpu x4", "ulysses": 1, "ring": 2, "cfg_parallel": False, "fsdp": False},
     "ulysses=1 x ring=2 x cfg=1 = 2 ranks, but the run has 4 processes; allowed: degrees whose product is 4"),
    ({"devices": "cpu x2", "ulysses": 0}, "ulysses: 0 is out of range; allowed: 1 to 64"),
])
def test_validate_inputs_names_the_input(values, expected):
    result = SpacetimeMultiGPU.VALIDATE_INPUTS(**values)
    assert isinstance(result, str) and expected in result and "\n" not in result, result


def test_cuda_devices_are_checked_against_the_machine():
    with pytest.raises(ValueError, match=r"asks for CUDA but this machine has no CUDA GPU; allowed here: CPU processes"):
        parse_devices("cuda:0,cuda:1", cuda_count=0)
    with pytest.raises(ValueError, match=r"cuda:3 does not exist, this machine has 2 CUDA GPUs; allowed: cuda:0, cuda:1$"):
        parse_devices("cuda:0, cuda:3", cuda_count=2)
    with pytest.raises(ValueError, match=r"names cuda:1 twice; allowed: each GPU once"):
        parse_devices("cuda x2, cuda:1", cuda_count=4)
    assert parse_devices(" CUDA x2 ", cuda_count=2) == (torch.device("cuda", 0), torch.device("cuda", 1))
    assert parse_devices("cpu x3") == (CPU,) * 3


def _apply(model, devices="cpu x2", ulysses=1, ring=2, cfg_parallel=False, fsdp=False):
    return SpacetimeMultiGPU().apply(model, devices, ulysses, ring, cfg_parallel, fsdp)[0]


def test_bad_inputs_fail_before_any_process_starts(tiny_model, monkeypatch):
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^ulysses=2 does not divide the model's 3 attention heads; allowed values: \[1, 3\]$"):
        _apply(tiny_model, ulysses=2, ring=1)
    if torch.cuda.device_count() == 0:
        with pytest.raises(ValueError, match="asks for CUDA but this machine has no CUDA GPU"):
            _apply(tiny_model, devices="cuda x2")
    compiled = builtin_model(REFERENCE)
    compile_blocks(compiled.dit, compiled.name, compiler=lambda forward: forward)  # marked compiled, nothing traced
    with pytest.raises(ValueError, match=r"^compile='on' is not allowed with multi-GPU \(parallel\) runs; allowed: compile='off'"):
        _apply(compiled)
    cached = tiny_model.with_step_cache(StepCacheSettings("teacache", 0.25))
    with pytest.raises(ValueError, match="caches steps .*which Multi-GPU worker processes do not run yet; remove the Step Cache node"):
        _apply(cached)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("SPACETIME_PARALLEL_PORT", str(port))
        with pytest.raises(ValueError, match=rf"^SPACETIME_PARALLEL_PORT={port} is in use by another program; allowed: a free port"):
            _apply(tiny_model)
    monkeypatch.delenv("SPACETIME_PARALLEL_PORT")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"devices='cpu x2' names 2 devices but torchrun started 4 processes; allowed: 4 devices"):
        _apply(tiny_model)
    assert time.monotonic() - started < 5  # no worker was started for any of them


def test_transforms_after_the_node_say_to_connect_them_before(workers, tiny_model):
    lora = read_lora(builtin_lora_path(next(iter(BUILTIN_LORAS))))
    with pytest.raises(ValueError, match=r"already runs on Multi-GPU workers, where Spacetime Load LoRA cannot reach its DiT; "
                                         r"connect Spacetime Load LoRA before Spacetime Multi-GPU$"):
        workers.with_lora(lora)
    with pytest.raises(ValueError, match=r"do not cache steps yet; remove Spacetime Step Cache"):
        workers.with_step_cache(StepCacheSettings("teacache", 0.25))
    with pytest.raises(ValueError, match=r"^high_noise_model .* connect Spacetime Pair Experts before Spacetime Multi-GPU$"):
        workers.with_low_noise_expert(tiny_model, ExpertSwitch(0.875))
    with pytest.raises(ValueError, match=r"already runs on Multi-GPU workers; connect the loader's model to one Spacetime Multi-GPU"):
        _apply(workers)
