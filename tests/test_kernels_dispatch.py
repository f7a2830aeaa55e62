"""Kernel dispatch, part 1: the Triton probe. Triton only on a CUDA device where the probe kernel passed
(once per device), the references otherwise, one warning line for a broken Triton and never an error.
(The loader's backend choices, the self-check and "auto" are in test_kernels_backends.py.)

There is no GPU in CI, so the probe is run for real on the CPU under Triton's interpreter, and the CUDA
decisions are tested with the probe replaced: by a simulated missing Triton (``import triton`` fails),
a kernel that does not compile, a driver error, a wrong result, and a pass.
Triton must be installed: these tests fail, not skip, without it.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import triton  # noqa: F401 - a missing Triton must fail this module, not skip it
import triton.language as tl
from comfyui_spacetime.kernels import REFERENCE, TRITON, KernelBackend, _triton, dispatch, get_backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """Each test starts with no cached probe results, the interpreter on and no forced reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    dispatch.clear_caches()
    yield
    dispatch.clear_caches()


def warnings_from_dispatch(caplog):
    return [r for r in caplog.records if r.name == dispatch.log.name and r.levelno == logging.WARNING]


def test_probe_kernel_runs_on_cpu_under_the_interpreter():
    _triton.probe(torch.device("cpu"))  # raises on any failure
    assert dispatch.triton_works("cpu")


def test_missing_triton_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now raises ImportError
    with caplog.at_level(logging.WARNING):
        assert dispatch.triton_works("cpu") is False
        assert get_backend("cuda:0") is REFERENCE
        assert get_backend("cuda:0") is REFERENCE  # probed once per device: no second warning
    records = warnings_from_dispatch(caplog)
    assert len(records) == 2  # one for "cpu", one for "cuda:0"
    message = records[0].getMessage()
    assert "Triton kernels unavailable on cpu" in message and "ModuleNotFoundError" in message
    assert "SPACETIME_FORCE_REFERENCE=1" in message


def test_kernel_that_does_not_compile_falls_back(monkeypatch, caplog):
    @triton.jit
    def broken_probe(a_ptr, b_ptr, out_ptr, SIZE: tl.constexpr, UPCAST_DOT: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, SIZE), tl.no_such_builtin(a_ptr))

    monkeypatch.setattr(_triton, "_probe_kernel", broken_probe)
    with caplog.at_level(logging.WARNING):
        assert dispatch.triton_works("cpu") is False
    (record,) = warnings_from_dispatch(caplog)
    assert "no_such_builtin" in record.getMessage()


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("CUDA driver version is insufficient for CUDA runtime version"),
        OSError("failed to find C compiler. Please specify via CC environment variable."),
    ],
)
def test_driver_or_compiler_error_falls_back_once_per_device(monkeypatch, caplog, failure):
    calls = []

    def failing_probe(device):
        calls.append(str(device))
        raise failure

    monkeypatch.setattr(dispatch, "probe_triton", failing_probe)
    with caplog.at_level(logging.WARNING):
        backends = [get_backend("cuda:0"), get_backend(torch.device("cuda", 0)), get_backend("cuda:1")]
    assert all(backend is REFERENCE for backend in backends)
    assert calls == ["cuda:0", "cuda:1"]
    records = warnings_from_dispatch(caplog)
    assert len(records) == 2 and str(failure) in records[0].getMessage()


def test_probe_with_wrong_numbers_falls_back(monkeypatch, caplog):
    real_launchable = _triton.launchable

    def corrupting(kernel):
        launch = real_launchable(kernel)

        class Corrupt:
            def __getitem__(self, grid):
                def run(a, b, out, **meta):
                    launch[grid](a, b, out, **meta)
                    out.add_(1.0)  # a miscompiled kernel: runs, wrong answer

                return run

        return Corrupt()

    monkeypatch.setattr(_triton, "launchable", corrupting)
    with caplog.at_level(logging.WARNING):
        assert dispatch.triton_works("cpu") is False
    (record,) = warnings_from_dispatch(caplog)
    assert "wrong values" in record.getMessage()


def test_passing_probe_and_self_check_on_cuda_gives_triton_backend(monkeypatch):
    monkeypatch.setattr(dispatch, "probe_triton", lambda device: None)
    monkeypatch.setattr(dispatch, "_attention_errors", lambda backend, device: (1e-3, 1e-3))
    backend = get_backend("cuda:0", choice="triton")
    assert backend is TRITON and backend.name == "triton"


def test_forced_reference_and_cpu_never_probe(monkeypatch, caplog):
    def must_not_run(device):
        raise AssertionError("probe ran")

    monkeypatch.setattr(dispatch, "probe_triton", must_not_run)
    with caplog.at_level(logging.WARNING):
        assert get_backend("cuda:0", force_reference=True) is REFERENCE
        assert get_backend("cpu") is REFERENCE
        assert get_backend() is REFERENCE  # no CUDA here: the CPU
        monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
        assert get_backend("cuda:0") is REFERENCE
    assert warnings_from_dispatch(caplog) == []


def test_triton_backend_on_cpu_tensors_outside_interpreter_uses_references(monkeypatch):
    """A model built for a GPU and then run on the CPU still works: each call routes to the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 2, 5, 64) for _ in range(3))
    x, shift, scale = torch.randn(1, 5, 16), torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    assert torch.equal(TRITON.attention(q, k, v), REFERENCE.attention(q, k, v))
    assert torch.equal(TRITON.layer_norm_modulate(x, shift, scale, 1e-6), REFERENCE.layer_norm_modulate(x, shift, scale, 1e-6))
    assert torch.equal(TRITON.gated_residual(x, x, shift), REFERENCE.gated_residual(x, x, shift))
    assert torch.equal(TRITON.rms_norm(x, scale[0, 0], 1e-6), REFERENCE.rms_norm(x, scale[0, 0], 1e-6))


def test_each_op_takes_its_kernel_exactly_where_its_launcher_does(monkeypatch):
    """One rule per op decides both: the backend's op takes the kernel for every input its ``*_triton``
    launcher accepts, and the reference for every input the launcher refuses (kernel limits, and
    shapes the kernel cannot read, which the reference computes by broadcasting or reports)."""
    from comfyui_spacetime.kernels import adaln, attention, attention_varlen, rms_norm_rope, rmsnorm

    taken = []
    for module, op in ((adaln, "layer_norm_modulate"), (adaln, "gated_residual"), (rmsnorm, "rms_norm"),
                       (attention, "attention"), (attention_varlen, "attention_varlen"),
                       (rms_norm_rope, "rms_norm_rope")):  # fmt: skip
        real = getattr(module, f"{op}_ref")
        monkeypatch.setattr(module, f"{op}_ref", lambda *args, real=real: taken.append("reference") or real(*args))
    x, q = torch.randn(2, 3, 8), torch.randn(1, 2, 4, 64)
    packed, cu = torch.randn(7, 2, 64), torch.tensor([0, 3, 7])
    cos, sin = torch.randn(3, 32), torch.randn(3, 32)
    cases = [
        (adaln, "layer_norm_modulate", (x, torch.randn(2, 1, 8), torch.randn(2, 3, 8))),
        (adaln, "layer_norm_modulate", (x, torch.randn(2, 3, 1), torch.randn(2, 1, 8))),  # a per-token scalar shift
        (adaln, "layer_norm_modulate", (x.double(), torch.randn(2, 1, 8), torch.randn(2, 1, 8))),
        (adaln, "gated_residual", (x, x, torch.randn(1, 1, 8))),
        (adaln, "gated_residual", (x, torch.randn(2, 1, 8), torch.randn(2, 1, 8))),  # y broadcast over tokens
        (rmsnorm, "rms_norm", (x, torch.randn(8))),
        (rmsnorm, "rms_norm", (x, torch.randn(1, 8))),
        (attention, "attention", (q, q, q)),
        (attention, "attention", (q[..., :32], q[..., :32], q[..., :32])),
        (attention_varlen, "attention_varlen", (packed, packed, packed, cu, cu, 4, 4)),
        (rms_norm_rope, "rms_norm_rope", (x[:, :, None].expand(2, 3, 64, 8).flatten(2)[:, :, :64], torch.randn(64), cos, sin)),
        (rms_norm_rope, "rms_norm_rope", (torch.randn(2, 3, 64), torch.randn(64), cos, sin[:1])),  # a table the reference broadcasts
        (attention_varlen, "attention_varlen", (packed, packed, packed, cu.float(), cu, 4, 4)),  # float cu_seqlens
    ]
    for module, op, args in cases:
        try:
            getattr(module, f"{op}_triton")(*args)
            accepted = True
        except ValueError:
            accepted = False
        taken.clear()
        getattr(module, op)(*args)
        assert taken == ([] if accepted else ["reference"]), (op, [tuple(a.shape) for a in args if torch.is_tensor(a)])


def test_backends_keep_the_model_call_signatures():
    fields = [f for f in KernelBackend.__dataclass_fields__]
    assert fields[:5] == ["name", "attention", "layer_norm_modulate", "gated_residual", "rms_norm"]
    custom = KernelBackend("custom", *(getattr(REFERENCE, f) for f in fields[1:5]))  # positional, as before
    assert custom.attention_varlen is REFERENCE.attention_varlen and custom.rms_norm_rope is REFERENCE.rms_norm_rope


def test_ops_register_with_torch_library_for_torch_compile():
    """Each launcher registers as a torch.library op whose schema is valid and whose output shape and
    strides propagate under fake tensors: what torch.compile needs to trace a model through the kernels.
    (Compiling the kernels themselves needs a GPU.)"""
    from comfyui_spacetime.kernels import adaln, attention, attention_varlen, rms_norm_rope, rmsnorm

    x, weight, gate = torch.randn(2, 5, 64), torch.randn(64), torch.randn(2, 5, 64).expand(2, 5, 64)
    q, rope = torch.randn(1, 2, 7, 64), (torch.randn(5, 32), torch.randn(5, 32))
    packed, cu = torch.randn(7, 2, 64), torch.tensor([0, 3, 7], dtype=torch.int32)
    cases = [
        (rmsnorm._rms_norm_op, (x, weight, 1e-6)),
        (adaln._layer_norm_modulate_op, (x, gate, gate, 1e-6)),
        (adaln._gated_residual_op, (x, x, gate)),
        (attention._attention_op, (q, q, q)),
        (attention_varlen._attention_varlen_op, (packed, packed, packed, cu, cu, 4, 4)),
        (rms_norm_rope._rms_norm_rope_op, (x, weight, *rope, 1e-6)),
    ]
    for lazy_op, args in cases:
        result = torch.library.opcheck(lazy_op.registered(), args, test_utils=("test_schema", "test_faketensor"))
        assert set(result.values()) == {"SUCCESS"}, (lazy_op.qualname, result)


def test_package_imports_and_runs_without_triton():
    """With Triton unimportable the kernels package imports, picks the reference and computes."""
    script = f"""
import importlib.util, sys
sys.modules["triton"] = None
spec = importlib.util.spec_from_file_location(
    "kernels_only", {str(ROOT / "kernels" / "__init__.py")!r}, submodule_search_locations=[{str(ROOT / "kernels")!r}])
kernels = importlib.util.module_from_spec(spec); sys.modules["kernels_only"] = kernels; spec.loader.exec_module(kernels)
import torch
from kernels_only import _triton
assert not _triton.triton_available() and kernels.get_backend("cuda:0") is kernels.REFERENCE
q = torch.randn(1, 1, 3, 64)
assert torch.equal(kernels.TRITON.attention(q, q, q), kernels.attention_ref(q, q, q))
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
    assert "Triton kernels unavailable on cuda:0" in result.stderr  # the one warning line, to stderr
