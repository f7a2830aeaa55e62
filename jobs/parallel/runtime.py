"""The multi-process runtime: one worker process per device (torch.multiprocessing, spawn), joined in a process group
(NCCL between GPUs, gloo between CPU processes) on a loopback port, holding the DiT's weights between runs, and a proxy
DiT in the host that sends every forward to all workers and returns rank 0's result. The host keeps driving the
sampler (progress, previews, the interrupt between steps), so every job runs unchanged on a parallel model.

Failure: a worker that dies or raises ends the request in flight with a one-line RuntimeError naming it (rank, device,
exit code or its exception's last line); the other workers are killed at once, and the next request starts a fresh set
(weights shipped again from the host's model). Shutdown: when the proxies are garbage-collected and at interpreter exit
the workers are told to stop, then killed if they linger. Workers exit on their own when the host dies."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.machinery
import itertools
import logging
import os
import queue
import runpy
import signal
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ...model_defs.bundles import SpacetimeModel
from ...model_defs.parallel.plan import ParallelPlan
from .devices import backend_for, fixed_port, free_port, worker_threads
from .shipping import FlatTensors, to_device
from .worker import BuildSpec, ExpertSpec

log = logging.getLogger(__name__)

BOOT_SCRIPT = Path(__file__).with_name("worker_boot.py")
PACKAGE = __name__.rsplit(".jobs.parallel.", 1)[0]  # the host's name for the pack, whatever ComfyUI called it
ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.2  # how often a wait checks that every worker is still alive
GRACE_S = 1.0  # after the first sign of a failure: time for the other workers' reports to arrive (to name the cause)
STOP_S = 5.0  # how long stopping workers may take before they are killed
REQUEST_TIMEOUT_S = float(os.environ.get("SPACETIME_PARALLEL_TIMEOUT", 1800))  # one forward; also the collectives' timeout
START_TIMEOUT_S = float(os.environ.get("SPACETIME_PARALLEL_START_TIMEOUT", 1800))  # start, join and build (weights shipped)


@contextlib.contextmanager
def _main_not_reimported():
    """Spawned children re-run the parent's main script unless its module names itself ``__main__`` by spec: ComfyUI's
    ``main.py`` (or ``run_workflow.py``, whose imports need the root on the path) must not run again in a worker."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = None


def _stop_processes(processes: list, requests: list, replies) -> None:
    """Tell every worker to stop, wait a little, kill the rest; never blocks on a queue (a finalizer calls this)."""
    for q in requests:
        with contextlib.suppress(Exception):
            q.put(("stop", -1))
    deadline = time.monotonic() + STOP_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join(timeout=STOP_S)
    for q in [*requests, replies]:
        q.cancel_join_thread()
        q.close()


def _exit_description(code: int | None) -> str:
    if code is None:
        return "is not answering"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
    return f"exited with code {code}"


class WorkerRuntime:
    """The workers of one parallel model. ``request(expert, method, args, kwargs)`` runs ``dit.method`` on every
    worker and returns rank 0's result; one request at a time."""

    def __init__(self, model: SpacetimeModel, devices: tuple[torch.device, ...], plan: ParallelPlan,
                 timeout_s: float = REQUEST_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S):
        self.devices = devices
        self.plan = plan
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.starts = 0  # how many times workers were started (and the weights shipped)
        self._source = model  # the host's model: what the workers are built from, again after a failure
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._processes: list = []
        self._requests: list = []
        self._replies = None
        self._finalizer = None
        self.failure: str | None = None
        self._start()

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def _start(self) -> None:
        port = fixed_port() or free_port()
        context = mp.get_context("spawn")
        self._replies = context.Queue()
        self._requests = [context.Queue() for _ in self.devices]
        self._processes = []
        self.failure = None
        with _main_not_reimported():
            for rank, requests in enumerate(self._requests):
                init_globals = {"SPACETIME_ROOT": str(ROOT), "SPACETIME_PACKAGE": PACKAGE, "SPACETIME_RANK": rank,
                                "SPACETIME_REQUESTS": requests, "SPACETIME_REPLIES": self._replies,
                                "SPACETIME_PARENT_PID": os.getpid()}
                process = context.Process(target=runpy.run_path, args=(str(BOOT_SCRIPT),), name=f"spacetime-worker-{rank}",
                                          kwargs={"init_globals": init_globals, "run_name": "__spacetime_worker__"}, daemon=True)
                process.start()
                self._processes.append(process)
        self._finalizer = weakref.finalize(self, _stop_processes, self._processes, self._requests, self._replies)
        self.starts += 1
        spec = BuildSpec(self.world_size, tuple(str(d) for d in self.devices), port, backend_for(self.devices), self.plan,
                         self._source.dit.backend_name, self.timeout_s, worker_threads(self.world_size), _experts(self._source))
        log.info("Spacetime: starting %d workers on %s (%s), port %d", self.world_size,
                 ", ".join(map(str, self.devices)), self.plan.describe(), port)
        self._exchange(("build", spec), self.start_timeout_s, "starting")
        del spec

    def _exchange(self, message: tuple, timeout_s: float, doing: str) -> dict[int, object]:
        """Send ``message`` to every worker and wait for every reply: {rank: value}. A dead or failed worker, or no
        answer within ``timeout_s``, stops all workers and raises the one-line RuntimeError."""
        seq = next(self._seq)
        for q in self._requests:
            q.put((message[0], seq, *message[1:]))
        return self._collect(seq, timeout_s, doing)

    def _collect(self, seq: int, timeout_s: float, doing: str) -> dict[int, object]:
        values: dict[int, object] = {}
        deadline = time.monotonic() + timeout_s
        while len(values) < self.world_size:
            try:
                rank, got, ok, value = self._replies.get(timeout=POLL_S)
            except queue.Empty:
                if any(p.exitcode is not None for p in self._processes):
                    self._fail({}, doing)
                if time.monotonic() > deadline:
                    self._fail({}, doing, f"did not answer within {timeout_s:.0f} s (SPACETIME_PARALLEL_TIMEOUT)")
                continue
            if got != seq:
                continue  # a reply to an earlier, abandoned request
            if not ok:
                self._fail({rank: value}, doing)
            values[rank] = value
        return values

    def _fail(self, reports: dict[int, str], doing: str, silence: str | None = None):
        """Name the worker that failed first (a killed or crashed process before a peer that lost its connection to
        it), stop them all, raise."""
        end = time.monotonic() + GRACE_S
        while time.monotonic() < end:
            with contextlib.suppress(queue.Empty, Exception):
                rank, _, ok, value = self._replies.get(timeout=POLL_S)
                if not ok:
                    reports.setdefault(rank, value)
        codes = {rank: p.exitcode for rank, p in enumerate(self._processes)}
        crashed = [r for r, code in codes.items() if code is not None and r not in reports]
        if crashed:
            rank = min(crashed, key=lambda r: (codes[r] >= 0, r))  # killed by a signal first
            what = _exit_description(codes[rank])
        elif reports:
            rank = min(reports)
            what = f"failed: {reports[rank]}"
        else:
            rank, what = 0, silence or "stopped answering"
        self.failure = (f"Spacetime Multi-GPU: worker rank {rank} ({self.devices[rank]}) {what} while {doing}; the other "
                        "workers were stopped (the next run starts new ones)")
        self.close()
        raise RuntimeError(self.failure)

    def request(self, expert: int, method: str, args: tuple, kwargs: dict):
        """``dit.method(*args, **kwargs)`` on every worker (tensors sent as CPU copies); rank 0's result (CPU)."""
        with self._lock:
            if not self.alive:
                log.warning("%s; starting new workers", self.failure or "Spacetime Multi-GPU: the workers were stopped")
                self._start()
            payload = to_device((args, kwargs), torch.device("cpu"), copy=True)
            return self._exchange(("call", expert, method, *payload), self.timeout_s, f"running {method}")[0]

    def stats(self) -> list[dict]:
        """Per rank: pid, device, how many DiTs it built and how many requests it served."""
        with self._lock:
            values = self._exchange(("stats",), self.timeout_s, "reporting")
        return [values[rank] for rank in range(self.world_size)]

    @property
    def alive(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive and all(p.exitcode is None for p in self._processes)

    def close(self) -> None:
        """Stop the workers now (also done when the runtime is garbage-collected, and at exit)."""
        if self._finalizer is not None:
            self._finalizer()


def _experts(model: SpacetimeModel) -> tuple[ExpertSpec, ...]:
    """What the workers build: the model's DiT, and an expert pair's low-noise one."""
    models = [model] if model.low_noise is None else [model, model.low_noise]
    return tuple(
        ExpertSpec(m.name, m.config, FlatTensors.pack(m.dit.state_dict()), m.dtype, tuple(m.loras),
                   any(getattr(b.forward, "spacetime_compiled", False) for b in m.dit.blocks))
        for m in models
    )


class _ComputeDtype(torch.nn.Module):
    """What the sampler reads of a DiT it does not run itself: the dtype it computes in (``patch_embedding.weight``)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)


class RemoteDiT(torch.nn.Module):
    """The WanDiT call surface the jobs use (``forward``, ``forward_packed``, ``forward_videos``, ``config``,
    ``backend_name``), computed by the runtime's workers: each call goes to all of them, rank 0's result comes back
    on the device of the call's inputs. It holds no weights: moving it moves nothing."""

    runs_in_workers = True  # the model transforms (LoRA, step cache, ...) refuse a DiT they cannot reach

    def __init__(self, runtime: WorkerRuntime, expert: int, source: SpacetimeModel):
        super().__init__()
        self.runtime = runtime
        self.expert = expert
        self.config = source.config
        self.backend_name = source.dit.backend_name
        self.patch_embedding = _ComputeDtype(source.dtype)
        self.step_cache = None

    def _call(self, method: str, *args, **kwargs):
        device = next((t.device for t in _tensors((args, kwargs))), torch.device("cpu"))
        return to_device(self.runtime.request(self.expert, method, args, kwargs), device)

    def forward(self, latents, timesteps, context, image_context=None):
        return self._call("forward", latents, timesteps, context, image_context=image_context)

    def forward_packed(self, pack, tokens, timesteps, text):
        return self._call("forward_packed", pack, tokens, timesteps, text)

    def forward_videos(self, latents, timesteps, contexts):
        return self._call("forward_videos", latents, timesteps, contexts)

    def extra_repr(self) -> str:
        return f"{self.runtime.world_size} workers on {', '.join(map(str, self.runtime.devices))}, {self.runtime.plan.describe()}"


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))


def start_workers(model: SpacetimeModel, devices: tuple[torch.device, ...], plan: ParallelPlan,
                  timeout_s: float = REQUEST_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S) -> SpacetimeModel:
    """``model`` (an expert pair: both experts) on one worker process per device, run by ``plan``: the same model
    (name, latent format, preset, switch) whose DiT is a ``RemoteDiT``. Its LoRAs travel with the weights (applied in
    the workers); the returned model carries none (its DiT has no layers to bind more to)."""
    runtime = WorkerRuntime(model, devices, plan, timeout_s, start_timeout_s)
    low_noise = None
    if model.low_noise is not None:
        low_noise = dataclasses.replace(model.low_noise, dit=RemoteDiT(runtime, 1, model.low_noise), loras=())
    return dataclasses.replace(model, dit=RemoteDiT(runtime, 0, model), loras=(), low_noise=low_noise)
