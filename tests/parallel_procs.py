"""Run a function on N CPU processes joined by torch.distributed (gloo), as the parallel tests do: a world of
real processes on this machine, each rank's return value handed back to the test.

``run_ranks(world_size, "module:function", *args)`` spawns ``world_size`` processes; each loads the pack as
``comfyui_spacetime`` (``spacetime_bootstrap``), joins a gloo group on a free loopback port, imports ``module``
(a module of the pack, e.g. ``comfyui_spacetime.model_defs.parallel.checks``, or a helper module in tests/) and
returns ``function(rank, world_size, *args)``. Results come back in rank order (tensors are fine). A rank that
raises fails the call with its traceback; a world that does not finish within ``timeout`` seconds is killed, so a
test never hangs and leaves no process behind. Spawn a world once per test module (a fixture) and check several
things in it: starting processes is the slow part (about a second and a half each on two cores)."""
from __future__ import annotations

import importlib
import os
import queue
import socket
import sys
import traceback
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    # not the runtime's jobs.parallel.devices.free_port: spawned ranks import this module before the pack is loaded
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, target: str, args: tuple, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)  # N processes on a few cores: one thread each keeps them from fighting
        sys.path.insert(0, str(ROOT))
        from spacetime_bootstrap import load_package

        load_package()
        import torch.distributed as dist
        from datetime import timedelta

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
        module_name, function_name = target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        value = function(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # reported to the parent, which fails the test with it
        results.put((rank, False, traceback.format_exc()))


def run_ranks(world_size: int, target: str, *args, timeout: float = 240.0) -> list:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(rank, world_size, port, target, args, results), daemon=True)
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    values: dict[int, object] = {}
    failures: list[str] = []
    try:
        while len(values) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{target} on {world_size} ranks did not finish within {timeout:.0f} s") from None
            if ok:
                values[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
                break  # the other ranks may wait forever on the failed one
    finally:
        for process in processes:
            process.join(timeout=5 if not failures else 0.5)
            if process.is_alive():
                process.kill()
                process.join()
    if failures:
        raise AssertionError(f"{target} failed on {world_size} ranks:\n" + "\n".join(failures))
    return [values[rank] for rank in range(world_size)]
