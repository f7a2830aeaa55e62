"""One worker process of the multi-process runtime (``runtime``): it joins the process group, builds the DiT(s) it is
sent on its device, applies the parallel plan and serves forward requests until told to stop.

Messages from the host (one queue per worker): ``("build", seq, BuildSpec)``, ``("call", seq, expert, method, args,
kwargs)``, ``("stats", seq)``, ``("stop", seq)``. Replies (one queue for all): ``(rank, seq, ok, value)``: rank 0's
value is the result, the others' None; ``ok`` False carries the last line of the worker's exception, and the worker
then exits (its peers' state is unknown; the host ends them all). A worker also exits when its parent dies.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from ...kernels import get_backend
from ...model_defs.checkpoint import build_dit
from ...model_defs.compiled import compile_blocks
from ...model_defs.lora import AppliedLora, applied
from ...model_defs.parallel.fsdp import shard_blocks
from ...model_defs.parallel.plan import ParallelGroups, ParallelPlan, make_groups
from ...model_defs.parallel.sequence import parallelize
from ...model_defs.wan_dit import WanDiT, WanDiTConfig
from .shipping import FlatTensors, to_device

log = logging.getLogger(__name__)
PARENT_POLL_S = 0.5


@dataclass(frozen=True, eq=False)
class ExpertSpec:
    """One DiT to build: its config, its weights (``FlatTensors`` in shared memory), compute dtype, the LoRAs the
    model carried (applied for the workers' lifetime, as the sampler applies them for a run) and whether its blocks
    were compiled on the host."""

    name: str
    config: WanDiTConfig
    weights: FlatTensors
    dtype: torch.dtype
    loras: tuple[AppliedLora, ...] = ()
    compile: bool = False


@dataclass(frozen=True, eq=False)
class BuildSpec:
    world_size: int
    devices: tuple[str, ...]
    port: int
    backend: str  # "gloo" or "nccl"
    plan: ParallelPlan
    kernels: str
    timeout_s: float
    threads: int
    experts: tuple[ExpertSpec, ...] = field(default_factory=tuple)


def place_plan(dit: WanDiT, groups: ParallelGroups) -> WanDiT:
    """``dit`` patched for ``groups``' plan: sequence (Ulysses/ring/USP) and CFG parallel attention
    (``parallel.sequence.parallelize``), then its blocks' weights sharded over the world when the plan says so
    (``parallel.fsdp.shard_blocks``, after the LoRAs are in). Every rank's DiT then returns the full result."""
    if groups.plan.world_size > 1:
        dit = parallelize(dit, groups)
    if groups.plan.fsdp:
        dit = shard_blocks(dit, groups)
    return dit


class _Worker:
    def __init__(self, rank: int, spec: BuildSpec):
        self.rank = rank
        self.spec = spec
        self.device = torch.device(spec.devices[rank])
        self.builds = 0
        self.calls = 0
        self._loras = contextlib.ExitStack()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(spec.threads)
        import torch.distributed as dist

        kwargs = {"device_id": self.device} if self.device.type == "cuda" else {}
        dist.init_process_group(spec.backend, init_method=f"tcp://127.0.0.1:{spec.port}", rank=rank,
                                world_size=spec.world_size, timeout=timedelta(seconds=spec.timeout_s), **kwargs)
        self.groups = make_groups(spec.plan, spec.experts[0].config.num_heads)
        self.dits = [self._build(expert) for expert in spec.experts]

    def _build(self, expert: ExpertSpec) -> WanDiT:
        backend = get_backend(self.device, choice=self.spec.kernels)
        dit = build_dit(expert.weights.tensors(), expert.config, expert.dtype, backend, expert.name).to(self.device)
        self._loras.enter_context(applied(dit, expert.loras))  # for the workers' lifetime: their DiTs serve one model
        if expert.compile and self.spec.world_size == 1:  # a parallel DiT refuses compiled blocks (the node says so first)
            compile_blocks(dit, expert.name)
        dit = place_plan(dit, self.groups)
        self.builds += 1
        return dit

    def call(self, expert: int, method: str, args: tuple, kwargs: dict):
        args, kwargs = to_device((args, kwargs), self.device)
        with torch.inference_mode():
            out = getattr(self.dits[expert], method)(*args, **kwargs)
        self.calls += 1
        return to_device(out, torch.device("cpu")) if self.rank == 0 else None

    def stats(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device), "builds": self.builds, "calls": self.calls}

    def close(self) -> None:
        import torch.distributed as dist

        self._loras.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (killed, crashed): a worker never outlives the process that drives it."""

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=watch, name="spacetime-parent-watch", daemon=True).start()


def last_line(exc: BaseException) -> str:
    lines = [line for line in traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def serve(rank: int, requests, replies, parent_pid: int) -> None:
    """The worker's loop (``worker_boot`` calls it in the new process)."""
    _watch_parent(parent_pid)
    worker: _Worker | None = None
    failed = False
    try:
        while True:
            message = requests.get()
            kind, seq = message[0], message[1]
            if kind == "stop":
                break
            try:
                if kind == "build":
                    worker = _Worker(rank, message[2])
                    value = None
                elif kind == "call":
                    value = worker.call(*message[2:])
                else:  # "stats"
                    value = worker.stats()
            except BaseException as exc:  # reported to the host, which ends the run with it in one line
                replies.put((rank, seq, False, last_line(exc)))
                failed = True
                break
            replies.put((rank, seq, True, value))
            del value
    finally:
        if worker is not None and not failed:
            with contextlib.suppress(Exception):
                worker.close()
        replies.close()
        replies.join_thread()  # the reply is on its way before the process exits
    if failed:
        os._exit(1)  # peers may be stuck in a collective with this rank: no clean shutdown to wait for
