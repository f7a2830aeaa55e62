"""Functions the parallel tests run on every rank of a gloo world (``parallel_procs.run_ranks``): each takes
``(rank, world_size, *args)`` and returns what the test compares."""
from __future__ import annotations

import torch
import torch.distributed as dist

from comfyui_spacetime.model_defs.parallel.plan import ParallelPlan, make_groups


def group_members(rank: int, world_size: int, ulysses: int, ring: int, cfg: int) -> dict:
    """Which ranks each of this rank's groups joins (an all-gather of the ranks over the group)."""
    groups = make_groups(ParallelPlan(ulysses=ulysses, ring=ring, cfg=cfg), num_heads=12)
    members = {}
    for name in ("ulysses", "ring", "sequence", "cfg"):
        group = getattr(groups, name)
        size = dist.get_world_size(group)
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
        dist.all_gather(gathered, torch.tensor([rank]), group=group)
        members[name] = sorted(int(t) for t in gathered)
    members["share"] = groups.share_index
    return members
