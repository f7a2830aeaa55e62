"""A model on several devices, as one call: ``parallel_model(model, devices, plan)`` returns the same model run by
``plan`` (``model_defs.parallel.plan``) on one process per device: worker processes started here (``runtime``), or,
under torchrun, the processes torchrun started (``torchrun``). Either way every job runs unchanged on it."""
from __future__ import annotations

import torch

from ...model_defs.bundles import SpacetimeModel
from ...model_defs.parallel.plan import ParallelPlan
from ...model_defs.parallel.sequence import check_composable
from .devices import EXAMPLES, fixed_port, parse_devices
from .runtime import RemoteDiT, WorkerRuntime, start_workers
from .torchrun import finish_world, launched_world, parallelize_here, writes_files

__all__ = ["EXAMPLES", "RemoteDiT", "WorkerRuntime", "check_parallel_model", "finish_world", "launched_world",
           "make_plan", "parallel_model", "parse_devices", "start_workers", "writes_files"]


def make_plan(ulysses: int, ring: int, cfg_parallel: bool, fsdp: bool) -> ParallelPlan:
    return ParallelPlan(ulysses=ulysses, ring=ring, cfg=2 if cfg_parallel else 1, fsdp=bool(fsdp))


def check_parallel_model(model: SpacetimeModel, devices: tuple[torch.device, ...], plan: ParallelPlan) -> None:
    """One-line ValueError naming the input when ``model`` cannot run by ``plan`` on ``devices``: the degrees against
    the device count and the model's heads, and the transforms that do not reach into worker processes."""
    plan.check(len(devices), model.config.num_heads)
    for m in (model, model.low_noise):
        if m is None:
            continue
        if getattr(m.dit, "runs_in_workers", False):
            raise ValueError(f"model {m.name} already runs on Multi-GPU workers; connect the loader's model to one Spacetime Multi-GPU")
        if plan.world_size > 1:
            check_composable(m.dit)  # compiled blocks
        if m.streamer is not None:
            raise ValueError(f"model {m.name} streams its weights (gpu_budget_gb on its loader); set gpu_budget_gb to 0 for "
                             "Multi-GPU (fsdp=true spreads the weights over the GPUs instead)")
        if m.step_cache is not None and m.step_cache.active and launched_world() is None:  # torchrun: the DiT is here
            raise ValueError(f"model {m.name} caches steps (Spacetime Step Cache), which Multi-GPU worker processes do not "
                             "run yet; remove the Step Cache node (under torchrun it works)")


def parallel_model(model: SpacetimeModel, devices_text: str, plan: ParallelPlan) -> SpacetimeModel:
    """``model`` on the devices ``devices_text`` names (``devices.parse_devices``), run by ``plan``; every input
    checked before a process starts."""
    devices = parse_devices(devices_text)
    check_parallel_model(model, devices, plan)
    if launched_world() is not None:
        return parallelize_here(model, devices, devices_text, plan)
    fixed_port()  # a port given by the environment is checked now, in one line
    return start_workers(model, devices, plan)
