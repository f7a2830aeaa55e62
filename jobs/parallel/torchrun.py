"""Runs under torchrun (``torchrun --nproc-per-node N run_workflow.py ...``): every process runs the whole workflow,
the Multi-GPU node parallelizes its own DiT in place (no extra workers) in the process group torchrun's environment
describes, and only rank 0 writes files. Same seed, same steps on every rank: the ranks stay in step by construction."""
from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta

import torch

from ...model_defs.bundles import SpacetimeModel
from ...model_defs.lora import applied
from ...model_defs.parallel.plan import ParallelPlan, make_groups
from .devices import backend_for
from .worker import place_plan

log = logging.getLogger(__name__)
TIMEOUT_S = float(os.environ.get("SPACETIME_PARALLEL_TIMEOUT", 1800))


def launched_world() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) when this process is one of a torchrun world of more than one; else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ.get("LOCAL_RANK", rank)), world


def writes_files() -> bool:
    """Whether this process writes the workflow's files: rank 0 of a torchrun world, or a process on its own."""
    world = launched_world()
    return world is None or world[0] == 0


def parallelize_here(model: SpacetimeModel, devices: tuple[torch.device, ...], devices_text: str, plan: ParallelPlan) -> SpacetimeModel:
    """``model`` with its DiT(s) parallelized in this process, one rank of the torchrun world (joined here if torchrun
    did not initialise the process group). The devices name the kind of device; each rank takes its local one."""
    import torch.distributed as dist

    rank, local_rank, world = launched_world()
    if len(devices) != world:
        raise ValueError(f"devices={devices_text!r} names {len(devices)} devices but torchrun started {world} processes; "
                         f"allowed: {world} devices (e.g. '{devices[0].type} x{world}'), or run without torchrun")
    device = torch.device("cuda", local_rank) if devices[0].type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # "cuda" now means this rank's GPU, also for the sampler's device slot
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend_for(devices), init_method="env://", timeout=timedelta(seconds=TIMEOUT_S), **kwargs)
    groups = make_groups(plan, model.config.num_heads)
    log.info("Spacetime: rank %d of %d on %s: %s", rank, world, device, plan.describe())

    def place(m: SpacetimeModel) -> SpacetimeModel:
        dit = m.dit.to(device)
        if not (plan.fsdp and m.loras):
            return dataclasses.replace(m, dit=place_plan(dit, groups))
        # sharded blocks take no LoRA at run time (fsdp.py): they go in before the sharding, for the process's lifetime
        dit.parallel_loras = applied(dit, m.loras)
        dit.parallel_loras.__enter__()
        return dataclasses.replace(m, dit=place_plan(dit, groups), loras=())

    low_noise = None if model.low_noise is None else place(model.low_noise)
    return dataclasses.replace(place(model), low_noise=low_noise)


def shares_decodes() -> bool:
    """Whether VAE decodes are shared over the ranks (``vae_decode.decode_split``): in a torchrun world whose process
    group is up (the Multi-GPU node joined it), every rank decodes its tiles and gets the whole video."""
    import torch.distributed as dist

    return launched_world() is not None and dist.is_available() and dist.is_initialized()


def finish_world() -> None:
    """Leave the process group this process joined (the headless runner calls this at its end)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
