"""How a parallel run arranges its ranks: the one place for that rule.

A run of ``world_size = cfg * ring * ulysses`` processes (one per device). Rank ``r`` sits at
``(c, i, u) = (r // (ring * ulysses), (r // ulysses) % ring, r % ulysses)``: the CFG index (which guidance pass
it computes, when ``cfg == 2``), the ring index and the Ulysses index. Ulysses is the inner degree, as in
xDiT/yunchang's USP ("USP: A Unified Sequence Parallelism Approach", Fang & Zhao 2024): the all-to-all within a
Ulysses group runs first (its ranks are neighbours, on one node the fastest links), the ring passes key/value
blocks between Ulysses groups. A sequence of S tokens is cut into ``ring * ulysses`` equal shares (the last ones
padded: ``shard_size``), share ``i * ulysses + u`` on rank (c, i, u).

FSDP (``fsdp=True``) shards the DiT blocks' weights over the whole world, whatever the degrees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CFG_DEGREES = (1, 2)  # the positive and negative passes of classifier-free guidance: at most two ranks


@dataclass(frozen=True)
class ParallelPlan:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    fsdp: bool = False

    def __post_init__(self):
        for name in ("ulysses", "ring"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= 1")
        if self.cfg not in CFG_DEGREES or isinstance(self.cfg, bool):
            raise ValueError(f"cfg={self.cfg!r} is not allowed; allowed values: {list(CFG_DEGREES)}")

    @property
    def sequence_degree(self) -> int:
        """Ranks one sequence is shared over (USP degree)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(cfg index, ring index, Ulysses index) of ``rank``."""
        return rank // (self.ring * self.ulysses), (rank // self.ulysses) % self.ring, rank % self.ulysses

    def rank_of(self, cfg_index: int, ring_index: int, ulysses_index: int) -> int:
        return (cfg_index * self.ring + ring_index) * self.ulysses + ulysses_index

    def check(self, world_size: int, num_heads: int | None = None) -> None:
        """One-line ValueError naming the input when this plan does not fit ``world_size`` processes or a model of
        ``num_heads`` attention heads (Ulysses splits the heads)."""
        if self.world_size != world_size:
            raise ValueError(
                f"ulysses={self.ulysses} x ring={self.ring} x cfg={self.cfg} = {self.world_size} ranks, but the run has "
                f"{world_size} processes; allowed: degrees whose product is {world_size} ({fitting_plans(world_size, num_heads)})"
            )
        if num_heads is not None and num_heads % self.ulysses:
            allowed = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(f"ulysses={self.ulysses} does not divide the model's {num_heads} attention heads; allowed values: {allowed}")

    def describe(self) -> str:
        parts = [f"ulysses {self.ulysses}", f"ring {self.ring}", f"cfg {self.cfg}"]
        return f"{self.world_size} ranks ({', '.join(parts)}{', FSDP weights' if self.fsdp else ''})"


def fitting_plans(world_size: int, num_heads: int | None = None) -> str:
    """The (ulysses, ring, cfg) triples that fit ``world_size`` (and the head count), for error messages."""
    fits = []
    for cfg in CFG_DEGREES:
        if world_size % cfg:
            continue
        rest = world_size // cfg
        for ulysses in range(1, rest + 1):
            if rest % ulysses == 0 and (num_heads is None or num_heads % ulysses == 0):
                fits.append(f"ulysses={ulysses} ring={rest // ulysses} cfg={cfg}")
    return ", ".join(fits) or "none"


def shard_size(length: int, degree: int) -> int:
    """Tokens per share when a sequence of ``length`` tokens is cut over ``degree`` ranks (the last shares padded)."""
    return math.ceil(length / degree)


def shard_bounds(length: int, degree: int, index: int) -> tuple[int, int]:
    """[start, stop) of share ``index``'s real tokens (empty past the end of a short sequence)."""
    size = shard_size(length, degree)
    start = min(index * size, length)
    return start, min(start + size, length)


@dataclass(frozen=True, eq=False)
class ParallelGroups:
    """The process groups of a plan on this rank (made by ``make_groups``, on every rank in the same order):
    ``ulysses``, ``ring`` and ``sequence`` (ulysses x ring) share this rank's CFG index; ``cfg`` joins the ranks
    that hold the same shares of the two guidance passes; ``world`` everyone (FSDP, the VAE decode)."""

    plan: ParallelPlan
    rank: int
    ulysses: object
    ring: object
    sequence: object
    cfg: object
    world: object

    @property
    def coordinates(self) -> tuple[int, int, int]:
        return self.plan.coordinates(self.rank)

    @property
    def share_index(self) -> int:
        """Which share of every sequence this rank holds."""
        _, ring_index, ulysses_index = self.coordinates
        return ring_index * self.plan.ulysses + ulysses_index


def make_groups(plan: ParallelPlan, num_heads: int | None = None) -> ParallelGroups:
    """The groups of ``plan`` in the initialised default process group (every rank calls this, collectively)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("make_groups needs torch.distributed initialised (the parallel runtime does that)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    plan.check(world_size, num_heads)
    mine: dict[str, object] = {}
    ranks = range(world_size)
    layouts = {
        "ulysses": lambda r: plan.coordinates(r)[:2],
        "ring": lambda r: (plan.coordinates(r)[0], plan.coordinates(r)[2]),
        "sequence": lambda r: plan.coordinates(r)[0],
        "cfg": lambda r: plan.coordinates(r)[1:],
    }
    for name, key in layouts.items():  # every rank creates every group, in one order (new_group is collective)
        for value in sorted({key(r) for r in ranks}):
            members = [r for r in ranks if key(r) == value]
            group = dist.new_group(members) if len(members) < world_size else dist.group.WORLD
            if rank in members:
                mine[name] = group
    return ParallelGroups(plan, rank, mine["ulysses"], mine["ring"], mine["sequence"], mine["cfg"], dist.group.WORLD)
