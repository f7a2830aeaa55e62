"""The one place kernels/ touches Triton: a lazy, guarded import, the interpreter switch, and registration
of launchers as torch.library ops so ``torch.compile`` can trace through them.

Importing this package never imports Triton (slow, and on a broken install it can fail or crash): a
kernel file decorates its kernels with ``jit`` below, which returns a ``LazyKernel``; Triton is imported
at the first launch or by dispatch's probe. Kernel bodies name ``tl`` as usual: each kernel file imports
the placeholder ``tl`` from here, and the first ``LazyKernel`` to resolve binds that module's ``tl`` to
``triton.language`` (the Triton compiler and interpreter read a kernel's globals at compile time).

``TRITON_INTERPRET=1`` runs kernels in Triton's CPU interpreter (the tests). Triton decides
compiled-vs-interpreted when ``@triton.jit`` decorates and when ``triton.language`` is imported;
``launchable`` reads the variable at each launch instead, so setting it after Triton was imported works.
Kernels call no other ``@jit`` function (a compiled helper cannot be called from an interpreted kernel).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator

import torch

tl: Any = None  # placeholder bound to triton.language in each kernel module by LazyKernel.compiled

try:
    from torch.library import triton_op, wrap_triton
except ImportError:  # torch < 2.6: launch directly (eager works; torch.compile graph-breaks on the launch)
    triton_op = None
    wrap_triton = None


@functools.lru_cache(maxsize=1)
def _import_triton() -> tuple[Any, BaseException | None]:
    try:
        import triton
        import triton.language  # noqa: F401

        return triton, None
    except Exception as error:  # noqa: BLE001 - a broken install can raise anything at import, not only ImportError
        return None, error


def load_triton() -> Any:
    """The ``triton`` module, imported once; raises ``ImportError`` naming the cause when it cannot be."""
    triton, error = _import_triton()
    if triton is None:
        raise ImportError(f"Triton is not importable: {error!r}") from error
    return triton


def triton_available() -> bool:
    return _import_triton()[0] is not None


class LazyKernel:
    """A kernel body to be ``triton.jit``-compiled on first use (``compiled``); ``fn`` is the Python body."""

    def __init__(self, fn: Callable):
        self.fn = fn
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def compiled(self) -> Any:
        triton = load_triton()
        from triton.runtime.jit import JITFunction

        self.fn.__globals__["tl"] = triton.language
        # JITFunction, not triton.jit: that would give an interpreted kernel for good if TRITON_INTERPRET
        # happened to be set now; launchable picks compiled or interpreted at each launch instead
        return JITFunction(self.fn)


def jit(fn: Callable) -> LazyKernel:
    """``@triton.jit``, deferred to the first launch (see the module docstring)."""
    return LazyKernel(fn)


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


def can_launch(tensor: torch.Tensor) -> bool:
    """Whether a kernel can run on ``tensor``'s device now: CUDA or the interpreter, and Triton importable
    (not re-checked while torch.compile traces: Triton was loaded by the eager run or the probe)."""
    return (tensor.is_cuda or interpreting()) and (torch.compiler.is_compiling() or triton_available())


def require_triton() -> None:
    """Raise ``ImportError`` naming the cause when Triton is missing or broken (not while torch.compile
    traces, as in ``can_launch``)."""
    if not torch.compiler.is_compiling():
        load_triton()


@functools.lru_cache(maxsize=None)
def _interpreted(fn: Callable) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


@contextlib.contextmanager
def _interpretable_language() -> Iterator[None]:
    """While an interpreted kernel runs, swap triton.language's own compiled ``@jit`` helpers (``tl.zeros``,
    ``tl.sum``, their combine functions, ...) for interpreted twins, as if Triton had been imported with
    ``TRITON_INTERPRET=1``; restored afterwards. A no-op when it was imported that way."""
    from triton.runtime.jit import JITFunction

    tl = load_triton().language
    swapped = []
    for module in (tl, tl.core, tl.standard, tl.math):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                swapped.append((module, name, value))
                setattr(module, name, _interpreted(value.fn))
    try:
        yield
    finally:
        for module, name, value in swapped:
            setattr(module, name, value)


class _InterpretedLaunch:
    """``kernel[grid](*args)`` for an interpreted kernel, with ``_interpretable_language`` around the run."""

    def __init__(self, kernel: Any):
        self.kernel = kernel

    def __getitem__(self, grid: Any) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            if any(isinstance(arg, torch.Tensor) and type(arg) not in (torch.Tensor, torch.nn.Parameter) for arg in args):
                # a tracing wrapper (FakeTensor, FunctionalTensor: torch.compile, opcheck) has no data:
                # the op's output is already allocated, there is nothing to compute
                return None
            with _interpretable_language():
                return self.kernel[grid](*args, **kwargs)

        return run


def launchable(kernel: Any) -> Any:
    """The kernel to launch now, from a ``LazyKernel``, a ``triton.jit`` function or an autotuner: compiled
    (through ``wrap_triton``, so a launch inside a ``triton_op`` is visible to ``torch.compile``), or an
    interpreted twin when ``TRITON_INTERPRET=1`` (whenever Triton was imported)."""
    if isinstance(kernel, LazyKernel):
        kernel = kernel.compiled
    if interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        interpreted = kernel if isinstance(kernel, InterpretedFunction) else _interpreted(kernel.fn)
        return _InterpretedLaunch(interpreted)
    return wrap_triton(kernel) if wrap_triton is not None else kernel


class LazyOp:
    """``launcher`` as the functional torch.library op ``qualname``, registered at the first call
    (registration imports Triton, which importing this package must not)."""

    def __init__(self, qualname: str, launcher: Callable):
        self.qualname = qualname
        self.launcher = launcher
        self.op: Callable | None = None

    def registered(self) -> Callable:
        if self.op is None:
            self.op = triton_op(self.qualname, self.launcher, mutates_args=()) if triton_op is not None else self.launcher
        return self.op

    def __call__(self, *args: Any) -> Any:
        if interpreting():
            # the interpreter's launch is plain Python, invisible to wrap_triton: under torch.compile the
            # op's traced body would lose it, so interpreted runs (the CPU tests) call the launcher directly,
            # outside any graph
            return torch.compiler.disable(self.launcher)(*args)
        device = args[0].device
        if device.type == "cuda" and not torch.compiler.is_compiling() and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # Triton launches on the current device, not the tensors'
                return self.registered()(*args)
        return self.registered()(*args)


def register_op(qualname: str, launcher: Callable) -> LazyOp:
    """``launcher`` (allocates and returns its output) as the torch.library op ``qualname``, lazily."""
    return LazyOp(qualname, launcher)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def check_out(op: str, out: torch.Tensor, like: torch.Tensor) -> None:
    """A caller-supplied output must be contiguous with ``like``'s shape, dtype and device."""
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(
            f"{op}: out must be contiguous {like.dtype} {tuple(like.shape)} on {like.device}, "
            f"got {'contiguous' if out.is_contiguous() else 'strided'} {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def dtype_supported(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16, torch.float32)


def dtype_unsupported(name: str, t: torch.Tensor) -> str | None:
    """Why a kernel cannot take ``t``'s dtype (named ``name`` in the reason), or None when it can."""
    return None if dtype_supported(t.dtype) else f"{name} dtype must be fp16, bf16 or fp32, got {t.dtype}"


def check_supported(op: str, reason: str | None) -> None:
    """Raise ``ValueError("<op>: <reason>")`` when an op's rule found a reason its kernel cannot take the
    inputs. Each op writes which inputs its kernel takes once, as ``_unsupported(...) -> str | None``: its
    ``*_triton`` launcher refuses through this, and its dispatcher takes the kernel only when the rule
    returns None (and ``can_launch``), the reference otherwise."""
    if reason is not None:
        raise ValueError(f"{op}: {reason}")


def autotuned(kernel: LazyKernel, configs: list, key: list[str], prune: Callable | None = None) -> Any:
    """``triton.autotune`` over ``configs`` keyed on sizes only; ``prune(configs, named_args, **kwargs)``
    drops configs that cannot fit or cannot help before any is timed."""
    prune_by = {"early_config_prune": prune} if prune is not None else None
    return load_triton().autotune(configs=configs, key=key, prune_configs_by=prune_by)(kernel.compiled)


def row_configs() -> list:
    """Configs for one-row-per-program kernels (norms): only the warp count varies."""
    return [load_triton().Config({}, num_warps=warps) for warps in (1, 2, 4, 8, 16)]


def prune_row_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Keep warp counts that give every thread 1..32 elements of a ``BLOCK_C``-wide row: fewer leaves
    lanes idle, more spills registers."""
    block = kwargs.get("BLOCK_C", named_args.get("BLOCK_C"))
    kept = [c for c in configs if 1 <= block // (32 * c.num_warps) <= 32]
    return kept or [min(configs, key=lambda c: abs(block // 32 - c.num_warps))]


@jit
def _probe_kernel(a_ptr, b_ptr, out_ptr, SIZE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # one tensor-core dot and an elementwise op: enough to prove compiler, driver and launch
    rows = tl.arange(0, SIZE)
    offsets = rows[:, None] * SIZE + rows[None, :]
    a = tl.load(a_ptr + offsets)
    b = tl.load(b_ptr + offsets)
    if UPCAST_DOT:  # the interpreter cannot dot bf16 (numpy has none); see attention.py
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    tl.store(out_ptr + offsets, tl.dot(a, b) + 1.0)


def probe(device: torch.device) -> None:
    """Compile and run a tiny kernel on ``device`` in fp16 and bf16 (the kernels' dtypes) and check its
    result; raise whatever went wrong (import, compile, driver, launch, wrong numbers)."""
    load_triton()
    import triton as _  # noqa: F401 - fails here when the install was removed or is shadowed since import

    size = 16
    for dtype in (torch.float16, torch.bfloat16):
        a = torch.eye(size, device=device).to(dtype)
        b = torch.arange(size * size, device=device, dtype=torch.float32).div(size * size).view(size, size).to(dtype)
        out = torch.full((size, size), float("nan"), device=device)
        upcast = interpreting() and dtype == torch.bfloat16
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            launchable(_probe_kernel)[(1,)](a, b, out, SIZE=size, UPCAST_DOT=upcast)
        expected = b.float() + 1.0
        if not torch.allclose(out, expected, atol=1e-2):
            error = (out - expected).abs().max().item()
            raise RuntimeError(f"probe kernel ran but returned wrong values in {dtype} (max error {error})")
