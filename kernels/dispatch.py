"""Which implementation of every fused op a model runs: the one place the backend rules live.

``get_backend(device, force_reference=False, choice="auto")`` returns a frozen ``KernelBackend`` of
callables that model code resolves at construction. ``choice`` is the loader's ``kernels`` input:

- ``"sdpa"``: the pure-PyTorch references (attention = torch SDPA in the input dtype). The old name
  ``"reference"`` is an alias kept for saved workflows. Also what every choice gives off CUDA, and what
  ``force_reference`` / ``SPACETIME_FORCE_REFERENCE=1`` force.
- ``"triton"``: our Triton kernels (attention, packed attention, RMSNorm+RoPE, RMSNorm, AdaLN).
- ``"flash_attn"`` / ``"sage_attention"``: that package's attention, when it imports (``attention_external``).
- ``"auto"``: per CUDA device, the fastest of those that pass the self-check, timed once.

On CUDA every choice but "sdpa" must first pass a one-time numerical self-check on that device at a
realistic shape (``SELF_CHECK_SHAPE``: head dim 128, a few thousand tokens, bf16): its error against
an fp32 SDPA oracle may be at most ``ERROR_FACTOR`` times the error of bf16 SDPA itself (so the bar
follows the GPU's own arithmetic), on the dense and the packed path, with Triton's fused q/k RMSNorm+RoPE
in the loop. "Triton" also needs the probe kernel to pass first (``triton_works``: Triton missing, no C
compiler, an old driver). A failure of any kind - not installed, no compile, an exception, a mismatch -
costs one log line naming why and what to install, and gives SDPA: never an error. Results are cached
per device per process. The norm/AdaLN ops are Triton's whenever Triton passed its self-check on the
device ("sdpa" aside), the references otherwise; each Triton callable also routes the calls it cannot
take (CPU tensors, other head dims, odd dtypes) to the reference.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import statistics
from dataclasses import dataclass, replace
from typing import Callable

import torch

from . import _triton, attention_external
from .adaln import gated_residual, gated_residual_ref, layer_norm_modulate, layer_norm_modulate_ref
from .attention import attention, attention_ref
from .attention_lse import attention_lse, attention_lse_ref, attention_varlen_lse, attention_varlen_lse_ref
from .attention_varlen import attention_varlen, attention_varlen_ref
from .rms_norm_rope import rms_norm_rope, rms_norm_rope_ref
from .rmsnorm import rms_norm, rms_norm_ref

log = logging.getLogger(__name__)

FORCE_REFERENCE_ENV = "SPACETIME_FORCE_REFERENCE"
ATTENTION_CHOICES = ("triton", "sdpa", "flash_attn", "sage_attention")
KERNEL_ALIASES = {"reference": "sdpa"}  # the loader's old value, in saved workflows
KERNEL_CHOICES = ("auto", *ATTENTION_CHOICES, *KERNEL_ALIASES)
INSTALL = {"triton": "pip install triton (triton-windows on Windows)", **attention_external.INSTALL}

SELF_CHECK_SHAPE = (1, 12, 4100, 128)  # B, H, S, D: Wan-1.3B heads at head dim 128; 4100 leaves a ragged tile
SELF_CHECK_PACKED = (1, 2051, 2048)  # sequence lengths of the packed check (a 1-token sequence included)
SELF_CHECK_DTYPE = torch.bfloat16
# allowed error vs the fp32 oracle, as a multiple of bf16 SDPA's own: exact-softmax kernels differ from SDPA
# only in summation order and rounding points; SageAttention quantizes q and k to INT8 (its paper: cosine
# similarity ~0.999+), a few times more error by design
ERROR_FACTOR = {"triton": 4.0, "flash_attn": 4.0, "sage_attention": 40.0}
ERROR_FLOOR = 1e-4  # relative L1 below which every backend passes (a GPU whose bf16 SDPA is near exact)
TIMING_REPS = 5


@dataclass(frozen=True)
class KernelBackend:
    name: str
    attention: Callable[..., torch.Tensor]
    layer_norm_modulate: Callable[..., torch.Tensor]
    gated_residual: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    attention_varlen: Callable[..., torch.Tensor] = attention_varlen_ref
    rms_norm_rope: Callable[..., torch.Tensor] = rms_norm_rope_ref
    # attention with each query row's log-sum-exp (ring attention, ``model_defs/parallel/ring.py``): Triton's
    # kernel whenever Triton's ops are in the backend, the references otherwise
    attention_lse: Callable[..., tuple[torch.Tensor, torch.Tensor]] = attention_lse_ref
    attention_varlen_lse: Callable[..., tuple[torch.Tensor, torch.Tensor]] = attention_varlen_lse_ref


REFERENCE = KernelBackend(
    name="sdpa",
    attention=attention_ref,
    layer_norm_modulate=layer_norm_modulate_ref,
    gated_residual=gated_residual_ref,
    rms_norm=rms_norm_ref,
    attention_varlen=attention_varlen_ref,
    rms_norm_rope=rms_norm_rope_ref,
)
SDPA = REFERENCE

TRITON = KernelBackend(
    name="triton",
    attention=attention,
    layer_norm_modulate=layer_norm_modulate,
    gated_residual=gated_residual,
    rms_norm=rms_norm,
    attention_varlen=attention_varlen,
    rms_norm_rope=rms_norm_rope,
    attention_lse=attention_lse,
    attention_varlen_lse=attention_varlen_lse,
)

# attention of the optional packages; their other ops are set per device (``_backend_for``)
EXTERNAL = {
    "flash_attn": replace(
        REFERENCE, name="flash_attn", attention=attention_external.flash_attention,
        attention_varlen=attention_external.flash_attention_varlen),
    "sage_attention": replace(
        REFERENCE, name="sage_attention", attention=attention_external.sage_attention,
        attention_varlen=attention_external.sage_attention_varlen),
}  # fmt: skip


def reference_forced() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def canonical_choice(choice: str) -> str:
    """``choice`` with aliases resolved; raises naming the allowed values for anything else."""
    choice = KERNEL_ALIASES.get(choice, choice)
    if choice != "auto" and choice not in ATTENTION_CHOICES:
        raise ValueError(f"kernels={choice!r} is not allowed; allowed values: {list(KERNEL_CHOICES)}")
    return choice


def probe_triton(device: torch.device) -> None:
    """Run the probe kernel on ``device``; raises what went wrong. (Separate so tests can replace it.)"""
    _triton.probe(device)


def _cause(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]


@functools.lru_cache(maxsize=None)
def triton_works(device: str) -> bool:
    """Whether the probe kernel passes on ``device`` (e.g. ``"cuda:0"``); probed once, then cached.
    A failure logs one warning naming the cause and is never raised."""
    try:
        probe_triton(torch.device(device))
        return True
    except Exception as error:  # noqa: BLE001 - any failure means "use the reference", never a user error
        log.warning(
            "Spacetime: Triton kernels unavailable on %s (%s); using the PyTorch reference kernels, which are "
            "correct but slower. Set %s=1 or choose kernels=sdpa to skip this check.",
            device, _cause(error), FORCE_REFERENCE_ENV,
        )  # fmt: skip
        return False


def _candidate(choice: str) -> KernelBackend:
    """The backend checked and timed for ``choice`` (its attention; Triton's norms only for "triton")."""
    return {"triton": TRITON, "sdpa": REFERENCE, **EXTERNAL}[choice]


def _relative_l1(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.float() - exact).abs().mean() / exact.abs().mean().clamp_min(1e-30)).item()


def _self_check_inputs(device: torch.device):
    """Seeded bf16 q/k (pre-norm) and v, RMSNorm weights and RoPE tables at ``SELF_CHECK_SHAPE``."""
    batch, heads, tokens, head_dim = SELF_CHECK_SHAPE
    gen = torch.Generator(device=device).manual_seed(0)
    width = heads * head_dim
    xq, xk, v = (torch.randn(batch, tokens, width, generator=gen, device=device) for _ in range(3))
    weights = [1.0 + 0.1 * torch.randn(width, generator=gen, device=device) for _ in range(2)]
    angles = torch.rand(tokens, head_dim // 2, generator=gen, device=device) * 2 * math.pi
    return xq, xk, v, weights, (angles.cos(), angles.sin())


def _attention_errors(backend: KernelBackend, device: torch.device) -> tuple[float, float]:
    """Relative L1 errors vs an fp32 oracle of ``backend`` (q/k RMSNorm+RoPE, then attention) on the dense
    and the packed self-check inputs, in bf16."""
    heads, head_dim = SELF_CHECK_SHAPE[1], SELF_CHECK_SHAPE[3]
    xq, xk, v, (wq, wk), (cos, sin) = _self_check_inputs(device)

    def heads_first(t):  # [B,S,(H D)] -> [B,H,S,D]
        return t.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    def run(be: KernelBackend, dtype: torch.dtype):
        q = heads_first(be.rms_norm_rope(xq.to(dtype), wq, cos, sin, 1e-6))
        k = heads_first(be.rms_norm_rope(xk.to(dtype), wk, cos, sin, 1e-6))
        values = heads_first(v.to(dtype))
        dense = be.attention(q, k, values)  # [B,H,S,D]
        packed_args = [t[0].transpose(0, 1) for t in (q, k, values)]  # [S,H,D]
        cu = torch.tensor([0, *torch.tensor(SELF_CHECK_PACKED).cumsum(0).tolist()], device=device, dtype=torch.int32)
        longest = max(SELF_CHECK_PACKED)
        packed = be.attention_varlen(*packed_args, cu, cu, longest, longest)  # [S,H,D]
        return dense, packed

    with torch.no_grad():
        exact_dense, exact_packed = run(REFERENCE, torch.float32)
        dense, packed = run(backend, SELF_CHECK_DTYPE)
    return _relative_l1(dense, exact_dense), _relative_l1(packed, exact_packed)


PROBE_FAILED = "the Triton probe kernel failed"  # already logged by ``triton_works``, with its cause


def _unavailable(choice: str, device: str) -> str | None:
    """Why ``choice`` cannot run at all on ``device`` (before any numbers), or None."""
    if choice == "triton":
        return None if triton_works(device) else PROBE_FAILED
    if choice in EXTERNAL and (reason := attention_external.unavailable(choice)):
        return f"not importable ({reason}); install it with: {INSTALL[choice]}"
    return None


@functools.lru_cache(maxsize=None)
def self_check(choice: str, device: str) -> str | None:
    """None when ``choice`` passes the numerical self-check on the CUDA ``device``, else why not (logged
    once, as one line). "sdpa" is the yardstick and always passes. Cached per device per process."""
    if choice == "sdpa":
        return None
    reason = _unavailable(choice, device)
    if reason is None:
        try:
            errors = _attention_errors(_candidate(choice), torch.device(device))
            budget = max(ERROR_FACTOR[choice] * max(_attention_errors(REFERENCE, torch.device(device))), ERROR_FLOOR)
            if not all(math.isfinite(e) and e <= budget for e in errors):
                reason = f"mismatch vs SDPA: relative error dense {errors[0]:.3g}, packed {errors[1]:.3g} > {budget:.3g}"
        except Exception as error:  # noqa: BLE001 - a failed compile or launch means "use SDPA", never an error
            reason = f"failed to run ({_cause(error)})"
    if reason is not None and reason != PROBE_FAILED:
        log.warning("Spacetime: %s attention on %s: %s; using sdpa.", choice, device, reason)
    return reason


def time_attention(backend: KernelBackend, device: str) -> float:
    """Median milliseconds of ``backend``'s dense attention at ``SELF_CHECK_SHAPE`` in bf16 on ``device``
    (the first calls - compilation, autotuning - are not timed)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(SELF_CHECK_SHAPE, generator=gen, device=dev, dtype=SELF_CHECK_DTYPE) for _ in range(3))
    times = []
    with torch.no_grad(), torch.cuda.device(dev):
        for _ in range(2):
            backend.attention(q, k, v)
        torch.cuda.synchronize(dev)
        for _ in range(TIMING_REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            backend.attention(q, k, v)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def auto_choice(device: str) -> str:
    """The fastest choice that passes the self-check on the CUDA ``device``, timed once (cached). Packages
    that are not installed are skipped without a message: "auto" never asks for an install."""
    passing = [
        choice for choice in ATTENTION_CHOICES
        if not (choice in EXTERNAL and attention_external.unavailable(choice)) and self_check(choice, device) is None
    ]  # fmt: skip
    if passing == ["sdpa"]:
        return "sdpa"  # nothing to race
    timings = {}
    for choice in passing:
        try:
            timings[choice] = time_attention(_candidate(choice), device)
        except Exception as error:  # noqa: BLE001 - passed the check but failed timing: skip it
            log.warning("Spacetime: %s attention on %s failed while timed (%s); skipping it.", choice, device, _cause(error))
    if not timings:
        return "sdpa"
    best = min(timings, key=timings.get)
    summary = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(timings.items(), key=lambda item: item[1]))
    log.info("Spacetime: kernels=auto on %s takes %s attention (%s at B,H,S,D=%s bf16).", device, best, summary, SELF_CHECK_SHAPE)
    return best


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # one cache entry per physical device: "cuda" means the current one
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def _backend_for(choice: str, device: str) -> KernelBackend:
    """The backend of a choice that passed its self-check on ``device``: its attention, plus Triton's
    norm/AdaLN ops when Triton passed its own check there."""
    if choice in ("sdpa", "triton"):
        return _candidate(choice)
    attention_only = _candidate(choice)
    if self_check("triton", device) is not None:
        return attention_only
    return replace(TRITON, name=choice, attention=attention_only.attention, attention_varlen=attention_only.attention_varlen)


def get_backend(
    device: torch.device | str | None = None, force_reference: bool = False, choice: str = "auto"
) -> KernelBackend:
    """The backend for ``choice`` on ``device`` (default: the current CUDA device if any, else CPU), by the
    rules in the module docstring. Raises only for a ``choice`` that is not one of ``KERNEL_CHOICES``."""
    choice = canonical_choice(choice)
    if force_reference or reference_forced() or choice == "sdpa":
        return REFERENCE
    resolved = _resolve_device(device)
    if resolved.type != "cuda":
        if choice != "auto":
            missing = choice in EXTERNAL and attention_external.unavailable(choice)
            why = f"is not installed ({INSTALL[choice]})" if missing else "needs a CUDA GPU"
            log.warning("Spacetime: kernels=%s %s; using sdpa on %s.", choice, why, resolved)
        return REFERENCE
    key = str(resolved)
    if choice == "auto":
        choice = auto_choice(key)
    elif self_check(choice, key) is not None:
        return REFERENCE
    return _backend_for(choice, key)


def clear_caches() -> None:
    """Forget every probe, self-check and timing (tests; a process that swapped drivers)."""
    for cached in (triton_works, self_check, auto_choice):
        cached.cache_clear()
    attention_external._import.cache_clear()
