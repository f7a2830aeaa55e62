"""Which devices a parallel run uses, written as users type them, and where its ranks meet: the one place for the
devices syntax, its checks and the choice of the loopback port.

Syntax (case and spaces free): a comma-separated list of ``cpu``, ``cuda`` or ``cuda:N``, each optionally followed by
``xK`` for K of them: ``"cpu x2"`` (two CPU processes), ``"cuda x4"`` (cuda:0 to cuda:3), ``"cuda:0,cuda:2"``. One
process per device; a GPU is named once (NCCL runs one rank per GPU); CPU and CUDA devices are not mixed (one process
group backend for the world: NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import os
import re
import socket

import torch

EXAMPLES = '"cpu x2", "cuda x4", "cuda:0,cuda:1"'
MAX_PROCESSES = 64
PORT_ENV = "SPACETIME_PARALLEL_PORT"  # a fixed rendezvous port; unset: a free loopback port the OS picks
_ITEM = re.compile(r"^(cpu|cuda)(?::(\d+))?(?:\s*x\s*(\d+))?$")


def parse_devices(text: str, cuda_count: int | None = None) -> tuple[torch.device, ...]:
    """The devices ``text`` names, checked against this machine (``cuda_count`` GPUs; default: torch's count);
    ValueError naming the input and what fits."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"devices={text!r} names no device; allowed: a list such as {EXAMPLES}")
    cuda_count = torch.cuda.device_count() if cuda_count is None else cuda_count
    devices: list[torch.device] = []
    for item in text.lower().split(","):
        match = _ITEM.match(item.strip())
        if match is None:
            raise ValueError(f"devices={text!r}: {item.strip()!r} is not a device; allowed: cpu, cuda, cuda:N, each with an "
                             f"optional xK count, e.g. {EXAMPLES}")
        kind, index, count = match.group(1), match.group(2), match.group(3)
        count = 1 if count is None else int(count)
        if count < 1:
            raise ValueError(f"devices={text!r}: x{count} is not allowed; allowed: a count of 1 to {MAX_PROCESSES}")
        if kind == "cpu":
            if index is not None:
                raise ValueError(f"devices={text!r}: cpu takes no index; write 'cpu xK' for K CPU processes")
            devices += [torch.device("cpu")] * count
        elif index is not None:
            if count != 1:
                raise ValueError(f"devices={text!r}: cuda:{index} x{count} would put {count} processes on one GPU; "
                                 "allowed: one process per GPU ('cuda xK' for cuda:0 to cuda:K-1)")
            devices.append(torch.device("cuda", int(index)))
        else:
            devices += [torch.device("cuda", i) for i in range(count)]
    if len(devices) > MAX_PROCESSES:
        raise ValueError(f"devices={text!r} names {len(devices)} processes; allowed: 1 to {MAX_PROCESSES}")
    kinds = {device.type for device in devices}
    if len(kinds) > 1:
        raise ValueError(f"devices={text!r} mixes CPU and CUDA devices; allowed: all CPU (e.g. 'cpu x2') or all CUDA (e.g. 'cuda x2')")
    if kinds == {"cuda"}:
        if cuda_count == 0:
            raise ValueError(f"devices={text!r} asks for CUDA but this machine has no CUDA GPU; allowed here: CPU processes, e.g. 'cpu x2'")
        seen: set[int] = set()
        for device in devices:
            if device.index >= cuda_count:
                allowed = ", ".join(f"cuda:{i}" for i in range(cuda_count))
                raise ValueError(f"devices={text!r}: {device} does not exist, this machine has {cuda_count} CUDA "
                                 f"GPU{'s' if cuda_count > 1 else ''}; allowed: {allowed}")
            if device.index in seen:
                raise ValueError(f"devices={text!r} names {device} twice; allowed: each GPU once (one process per GPU)")
            seen.add(device.index)
    return tuple(devices)


def backend_for(devices: tuple[torch.device, ...]) -> str:
    """The process group backend of a world on ``devices``: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if devices[0].type == "cuda" else "gloo"


def free_port() -> int:
    """A loopback port no one listens on now, as the OS picks it (another program may take it before the ranks
    bind it: the runtime retries then)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fixed_port() -> int | None:
    """The port of ``$SPACETIME_PARALLEL_PORT`` after checking it is a port and free; None when unset."""
    text = os.environ.get(PORT_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or not 1024 <= int(text) <= 65535:
        raise ValueError(f"{PORT_ENV}={text!r} is not a port; allowed: 1024 to 65535, or unset it to let the OS pick a free one")
    port = int(text)
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise ValueError(f"{PORT_ENV}={port} is in use by another program; allowed: a free port, or unset it to let "
                             "the OS pick one") from None
    return port


def worker_threads(world_size: int) -> int:
    """CPU threads per process of a CPU world: the cores this process may use, shared out (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world_size)
