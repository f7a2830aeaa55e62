"""Kernel dispatch, part 2: the loader's attention backends (auto / triton / sdpa / flash_attn /
sage_attention, and "reference", the old name of sdpa), the numerical self-check and auto's timing.

No GPU in CI: the CUDA-only parts (a device to check on, the timing) are replaced by fakes, while the
self-check's arithmetic runs for real on the CPU at a small shape (Triton interpreted), and flash-attn /
SageAttention are stand-in modules with their call conventions, computing with torch SDPA.
"""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import triton  # noqa: F401 - a missing Triton must fail this module, not skip it
from comfyui_spacetime.kernels import REFERENCE, TRITON, attention_external, dispatch, get_backend
from comfyui_spacetime.kernels.attention_varlen import attention_varlen_ref
from comfyui_spacetime.nodes.loaders import KERNEL_CHOICES, SpacetimeModelLoader


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    dispatch.clear_caches()
    yield
    dispatch.clear_caches()


def dispatch_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == dispatch.log.name and r.levelno == logging.WARNING]


def fake_flash_attn():
    """flash-attn's calling convention ([B,S,H,D] dense, [total,H,D] packed), computed with SDPA."""
    module = types.ModuleType("flash_attn")
    module.calls = []

    def flash_attn_func(q, k, v):
        module.calls.append("dense")
        assert q.stride(-1) == 1
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k):
        module.calls.append("packed")
        assert cu_q.dtype == torch.int32 and isinstance(max_q, int)
        return attention_varlen_ref(q, k, v, cu_q, cu_k, max_q, max_k)

    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


def fake_sageattention(with_varlen=True):
    module = types.ModuleType("sageattention")
    module.calls = []

    def sageattn(q, k, v, tensor_layout, is_causal):
        assert tensor_layout == "HND" and is_causal is False
        module.calls.append("dense")
        return F.scaled_dot_product_attention(q, k, v)

    def sageattn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal):
        module.calls.append("packed")
        return attention_varlen_ref(q, k, v, cu_q, cu_k, max_q, max_k)

    module.sageattn = sageattn
    if with_varlen:
        module.sageattn_varlen = sageattn_varlen
    return module


def install(monkeypatch, **modules):
    """Make ``import flash_attn`` / ``import sageattention`` give these modules (None: not installed)."""
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)  # None makes the import raise ImportError
    attention_external._import.cache_clear()


def small_self_check(monkeypatch):
    """A self-check shape the CPU interpreter runs in about a second (head dim 64, ragged lengths)."""
    monkeypatch.setattr(dispatch, "SELF_CHECK_SHAPE", (1, 2, 37, 64))
    monkeypatch.setattr(dispatch, "SELF_CHECK_PACKED", (1, 20, 16))


def test_choices_and_the_old_reference_alias():
    assert list(KERNEL_CHOICES) == ["auto", "triton", "sdpa", "flash_attn", "sage_attention", "reference"]
    assert dispatch.canonical_choice("reference") == "sdpa"
    assert get_backend("cuda:0", choice="reference") is REFERENCE  # no probe, no check: plain PyTorch
    assert get_backend("cuda:0", choice="sdpa") is REFERENCE and REFERENCE.name == "sdpa"
    with pytest.raises(ValueError, match=r"kernels='xformers' is not allowed; allowed values: \['auto', 'triton'"):
        get_backend("cuda:0", choice="xformers")


def test_loader_reference_and_sdpa_give_the_same_model_output():
    """Saved workflows with kernels=reference load the same model as sdpa (and auto on this CPU)."""
    loader = SpacetimeModelLoader()
    models = [loader.load("spacetime-builtin-tiny", "fp32", kernels)[0] for kernels in ("reference", "sdpa", "auto")]
    assert {m.dit.backend_name for m in models} == {"sdpa"}
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, models[0].dit.config.text_len, models[0].dit.config.text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [m.dit(x, torch.tensor([500.0]), ctx) for m in models]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("choice,package,hint", [("flash_attn", "flash_attn", "pip install flash-attn"),
                                                 ("sage_attention", "sageattention", "pip install sageattention")])
def test_absent_package_falls_back_with_what_to_install(monkeypatch, caplog, choice, package, hint):
    install(monkeypatch, **{package: None})
    with caplog.at_level(logging.WARNING):
        assert get_backend("cuda:0", choice=choice) is REFERENCE
        assert get_backend("cuda:0", choice=choice) is REFERENCE  # cached: one line per device
        assert get_backend("cpu", choice=choice) is REFERENCE
    messages = dispatch_warnings(caplog)
    assert len(messages) == 2 and all(hint in m for m in messages), messages
    assert "cuda:0" in messages[0] and "using sdpa" in messages[0]


def test_auto_never_asks_for_an_install(monkeypatch, caplog):
    install(monkeypatch, flash_attn=None, sageattention=None)
    monkeypatch.setattr(dispatch, "probe_triton", lambda device: None)
    monkeypatch.setattr(dispatch, "_attention_errors", lambda backend, device: (0.5, 0.5) if backend is TRITON else (1e-3, 1e-3))
    with caplog.at_level(logging.WARNING):
        assert get_backend("cuda:0") is REFERENCE
    (message,) = dispatch_warnings(caplog)  # Triton's mismatch only; nothing about flash-attn or SageAttention
    assert message.startswith("Spacetime: triton attention on cuda:0: mismatch vs SDPA") and "using sdpa" in message


def test_self_check_mismatch_or_failed_compile_gives_sdpa_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "probe_triton", lambda device: None)

    def errors(backend, device):
        if str(device) == "cuda:1":
            raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4: out of resources")
        return (0.5, 1e-3) if backend is TRITON else (1e-3, 1e-3)

    monkeypatch.setattr(dispatch, "_attention_errors", errors)
    with caplog.at_level(logging.WARNING):
        assert get_backend("cuda:0", choice="triton") is REFERENCE
        assert get_backend("cuda:1", choice="triton") is REFERENCE
    mismatch, failed = dispatch_warnings(caplog)
    assert "mismatch vs SDPA: relative error dense 0.5, packed 0.001 > 0.004" in mismatch
    assert "failed to run (RuntimeError: triton.compiler.errors.CompilationError" in failed


def test_self_check_and_timing_run_once_per_device(monkeypatch):
    install(monkeypatch, flash_attn=fake_flash_attn(), sageattention=None)
    monkeypatch.setattr(dispatch, "probe_triton", lambda device: None)
    checked, timed = [], []
    monkeypatch.setattr(dispatch, "_attention_errors", lambda backend, device: checked.append((backend.name, str(device))) or (1e-3, 1e-3))
    speed = {"triton": 2.0, "sdpa": 3.0, "flash_attn": 1.0}
    monkeypatch.setattr(dispatch, "time_attention", lambda backend, device: timed.append((backend.name, device)) or speed[backend.name])
    first = [get_backend("cuda:0") for _ in range(3)]
    assert all(b == first[0] for b in first)
    assert sorted(timed) == [("flash_attn", "cuda:0"), ("sdpa", "cuda:0"), ("triton", "cuda:0")]
    # each candidate checked once (plus SDPA's own error, the yardstick, once per candidate), then cached
    assert sorted(set(checked)) == [("flash_attn", "cuda:0"), ("sdpa", "cuda:0"), ("triton", "cuda:0")]
    count = len(checked)
    get_backend("cuda:0", choice="triton"), get_backend("cuda:0", choice="flash_attn")
    assert len(checked) == count  # explicit choices reuse auto's cached checks
    get_backend("cuda:1")
    assert ("triton", "cuda:1") in checked and len(timed) == 6


def test_auto_takes_the_fastest_passing_backend_with_triton_norms(monkeypatch):
    install(monkeypatch, flash_attn=fake_flash_attn(), sageattention=fake_sageattention())
    monkeypatch.setattr(dispatch, "probe_triton", lambda device: None)
    errors = {"triton": 1e-3, "sdpa": 1e-3, "flash_attn": 1e-3, "sage_attention": 0.5}  # sage: a mismatch
    monkeypatch.setattr(dispatch, "_attention_errors", lambda backend, device: (errors[backend.name],) * 2)
    speed = {"triton": 2.0, "sdpa": 3.0, "flash_attn": 1.0, "sage_attention": 0.1}  # the fastest fails its check
    monkeypatch.setattr(dispatch, "time_attention", lambda backend, device: speed[backend.name])
    backend = get_backend("cuda:0")
    assert backend.name == "flash_attn"
    assert backend.attention is attention_external.flash_attention
    assert backend.attention_varlen is attention_external.flash_attention_varlen
    assert backend.rms_norm_rope is TRITON.rms_norm_rope and backend.layer_norm_modulate is TRITON.layer_norm_modulate
    speed["triton"] = 0.5
    dispatch.clear_caches()
    install(monkeypatch, flash_attn=fake_flash_attn(), sageattention=fake_sageattention())
    assert get_backend("cuda:0") is TRITON


def test_real_self_check_passes_triton_and_catches_a_wrong_backend(monkeypatch, caplog):
    """The self-check's own arithmetic, run for real on the CPU (Triton interpreted): our kernels pass,
    a backend whose packed attention is 5% off fails, in the dense and in the packed path separately."""
    small_self_check(monkeypatch)
    monkeypatch.setattr(dispatch, "probe_triton", lambda device: None)
    dense, packed = dispatch._attention_errors(TRITON, torch.device("cpu"))
    sdpa_dense, sdpa_packed = dispatch._attention_errors(REFERENCE, torch.device("cpu"))
    assert 0 < sdpa_dense < 0.02 and 0 < sdpa_packed < 0.02  # bf16 vs fp32: a real, small error
    assert dispatch.self_check("triton", "cpu") is None, (dense, packed, sdpa_dense)

    wrong_packed = dispatch.replace(REFERENCE, name="flash_attn", attention_varlen=lambda *a: 1.05 * attention_varlen_ref(*a))
    monkeypatch.setitem(dispatch.EXTERNAL, "flash_attn", wrong_packed)
    install(monkeypatch, flash_attn=fake_flash_attn())
    with caplog.at_level(logging.WARNING):
        assert dispatch.self_check("flash_attn", "cpu") is not None
    (message,) = dispatch_warnings(caplog)
    assert "mismatch vs SDPA" in message


@pytest.mark.parametrize("choice,package", [("flash_attn", fake_flash_attn), ("sage_attention", fake_sageattention)])
def test_external_adapters_dense_and_packed(monkeypatch, choice, package):
    """Our layouts through each package's calling convention (stand-ins computing with SDPA): the same
    numbers as the reference, dense and packed; CPU / fp32 calls go to the reference instead."""
    module = package()
    install(monkeypatch, **{attention_external.PACKAGES[choice]: module})
    backend = dispatch.EXTERNAL[choice]
    q, k, v = (torch.randn(2, 19, 3, 64).transpose(1, 2).half() for _ in range(3))  # the model's [B,S,H,D] memory
    packed = [torch.randn(30, 3, 64).half() for _ in range(3)]
    cu = torch.tensor([0, 1, 12, 30])
    assert torch.equal(backend.attention(q, k, v), REFERENCE.attention(q, k, v))
    assert module.calls == []  # CPU tensors: the package is never called
    monkeypatch.setattr(attention_external, "_takes", lambda *args: True)  # as if on a GPU
    torch.testing.assert_close(backend.attention(q, k, v), REFERENCE.attention(q, k, v))
    torch.testing.assert_close(backend.attention_varlen(*packed, cu, cu, 18, 18), REFERENCE.attention_varlen(*packed, cu, cu, 18, 18))
    assert module.calls == ["dense", "packed"]


def test_packed_attention_through_every_backend_on_cpu():
    """Each backend's varlen entry on CPU tensors equals the reference (Triton interpreted; the packages'
    adapters route CPU tensors to the reference; the model's packed path calls exactly this entry)."""
    heads, head_dim = 2, 64
    q, k, v = (torch.randn(40, heads, head_dim) for _ in range(3))
    cu = torch.tensor([0, 1, 15, 40], dtype=torch.int32)
    expected = attention_varlen_ref(q, k, v, cu, cu, 25, 25)
    for backend in (REFERENCE, TRITON, *dispatch.EXTERNAL.values()):
        torch.testing.assert_close(backend.attention_varlen(q, k, v, cu, cu, 25, 25), expected, atol=1e-5, rtol=1e-5, msg=backend.name)


def test_gpu_check_without_cuda_exits_with_one_line():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine with one
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--quick"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "benchmarks/gpu_check.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); nothing was run."
    ]
