"""Sequence- and CFG-parallel DiT forward: ``parallelize(dit, groups)`` patches a loaded ``WanDiT`` so that every
rank of a parallel run (``plan.ParallelPlan``) computes its part of each forward and returns the whole result.

How a forward is shared (the seam is ``WanDiT._transformer``: when ``dit.parallel`` is set it hands the embedded
tokens to ``DiTParallel.transformer``, which calls the DiT's own block loop and head on this rank's part):
- CFG parallel (``plan.cfg == 2``): a batch whose rows divide by 2 (dense samples, or packed sequences: guidance
  puts the positive rows first, the negative ones after) is halved; this rank keeps the half of its CFG index
  (rows of x, timesteps per sample or per latent frame, text, CLIP tokens) and the halves' results are
  all-gathered over ``groups.cfg``. A batch that does not divide (cfg 1 sampling: one pass) runs whole on both.
- Sequence parallel (USP degree ``ulysses * ring``): every sample's (dense) or every packed sequence's tokens are
  cut into ``sequence_degree`` shares (``plan.shard_bounds``: the last ones padded to ``shard_size``, so every rank
  has the same local shapes); this rank keeps share ``groups.share_index``, with its RoPE rows and per-token
  modulation rows. Self-attention: Ulysses all-to-all over heads within ``groups.ulysses`` (``ulysses.py``), then
  ring attention over ``groups.ring`` (``ring.py``), the inverse all-to-all after. Real tokens are a prefix of
  every share, so the chunk a Ulysses group gathers holds its real tokens first and padded keys are sliced off,
  never attended. Cross-attention stays local (the keys are the whole text). After the head the shares are
  all-gathered over ``groups.sequence`` and the padding dropped: every rank returns the full velocity, so the
  sampler runs replicated on all ranks, identically.
The blocks are unchanged: the sharded layouts implement ``token_layouts.TokenLayout`` over the rank's tokens.

Composition: LoRA, weight streaming (block hooks) and the step cache work on the rank's part as on the whole
(the step cache's change metrics are reduced over the ranks, ``relative_change``, so every rank decides exactly
as one process would); ``torch.compile`` of the blocks is refused at run time with one line (a compiled block would
trace the collectives; a compile failure falls back to eager mid-forward and would desynchronise the ranks).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..token_layouts import DenseLayout, Pack, PackedLayout, PackedText
from .plan import ParallelGroups, shard_size
from .ring import ring_attention
from .ulysses import gather_heads, scatter_heads

log = logging.getLogger(__name__)

RunBlocks = Callable[..., torch.Tensor]  # WanDiT._run_blocks(x, timesteps, context, layout, image_context)


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(_group_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _max_over(value: float, group, device: torch.device) -> float:
    """The largest ``value`` of the ranks of ``group`` (every rank gets the same float); ``device``: where the
    group's backend takes tensors (NCCL: the GPU)."""
    if _group_size(group) == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, dist.ReduceOp.MAX, group=group)
    return float(tensor)


class _ShardedAttention:
    """What the two sharded layouts share: the Ulysses + ring self-attention and the step cache's metric."""

    groups: ParallelGroups
    real: torch.Tensor  # [s] or [T_loc] bool: which local tokens are real (not padding)
    total_real: torch.Tensor  # [rows] real tokens of each row of x over all shares

    def _attend_chunks(self, received: torch.Tensor) -> torch.Tensor:
        """``received [u, 3, B, s, h, D]`` (each source rank's tokens, this rank's heads) -> ``[u, B, s, h, D]``."""
        raise NotImplementedError  # each layout orders its chunk

    def _self_attention(self, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        """``qkv [3, B, s, H, D]`` -> attention output ``[B, s, H, D]`` of this rank's tokens over all tokens."""
        plan = self.groups.plan
        received = scatter_heads(qkv, plan.ulysses, self.groups.ulysses)  # [u, 3, B, s, h, D]
        out = self._attend_chunks(received)  # [u, B, s, h, D]: each source rank's tokens
        return gather_heads(out, plan.ulysses, self.groups.ulysses)  # [B, s, H, D]

    def _ring(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend, attend_lse) -> torch.Tensor:
        """This rank's chunk attention: the backend's kernel over the real keys (ring 1), or the ring."""
        if self.groups.plan.ring == 1:
            return attend(q, k, v)
        return ring_attention(q, torch.stack([k, v]), self.groups.ring, attend_lse).to(q.dtype)

    def relative_change(self, new: torch.Tensor, old: torch.Tensor, tokens: bool) -> float:
        """``step_cache.relative_l1`` of the whole batch, the same float on every rank: the largest per-row
        ``mean|new - old| / mean|old|``. ``tokens``: new/old are this rank's tokens ``[rows, s, C]`` (means over the
        real tokens of all shares); else rows complete on every rank of the sequence group (time modulation)."""
        new, old = new.float(), old.float()
        if tokens:
            mask = self.real.to(new.dtype)[None, :, None]  # [1,s,1]
            sums = torch.stack([((new - old).abs() * mask).sum((1, 2)), (old.abs() * mask).sum((1, 2))])  # [2, rows]
            if _group_size(self.groups.sequence) > 1:
                dist.all_reduce(sums, group=self.groups.sequence)
            count = (self.total_real * new.shape[-1]).to(sums.dtype)  # [rows]
            change = (sums[0] / count) / (sums[1] / count).clamp_min(1e-12)
        else:
            new, old = new.flatten(1), old.flatten(1)
            change = (new - old).abs().mean(1) / old.abs().mean(1).clamp_min(1e-12)
        return _max_over(float(change.max()), self.groups.cfg, new.device)


@dataclass(frozen=True, eq=False)
class ShardedDenseLayout(_ShardedAttention):
    """This rank's share of a dense batch: x ``[B, s, C]`` of B samples of ``length`` tokens each
    (``s = shard_size(length, degree)``)."""

    base: DenseLayout
    groups: ParallelGroups
    length: int
    share: int
    rope: tuple[torch.Tensor, torch.Tensor]  # [s, D/2]
    frame_index: torch.Tensor | None  # [s] latent frame of each local token, per-frame modulation only
    real: torch.Tensor  # [s] bool
    total_real: torch.Tensor  # [B]

    @classmethod
    def build(cls, base: DenseLayout, groups: ParallelGroups, length: int, batch: int) -> "ShardedDenseLayout":
        degree, index = groups.plan.sequence_degree, groups.share_index
        share = shard_size(length, degree)
        positions = torch.arange(index * share, (index + 1) * share, device=base.rope[0].device)  # [s]
        clamped = positions.clamp(max=length - 1)  # padding reads the last real token's rows: finite, then dropped
        rope = tuple(table.index_select(0, clamped) for table in base.rope)  # [s, D/2]
        frame_index = None
        if base.frame_grid is not None:
            _, height, width = base.frame_grid
            frame_index = clamped // (height * width)  # [s]
        total = torch.full((batch,), length, device=positions.device)
        return cls(base, groups, length, share, rope, frame_index, positions < length, total)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, C]`` -> this rank's ``[B, s, C]``."""
        degree, index = self.groups.plan.sequence_degree, self.groups.share_index
        padded = F.pad(x, (0, 0, 0, degree * self.share - self.length))  # [B, degree*s, C]
        return padded[:, index * self.share : (index + 1) * self.share]

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """This rank's ``[B, s, P]`` -> the whole ``[B, S, P]`` on every rank of the sequence group."""
        if _group_size(self.groups.sequence) == 1:
            return out[:, : self.length]
        return torch.cat(_all_gather(out, self.groups.sequence), dim=1)[:, : self.length]

    def per_token(self, rows: torch.Tensor) -> torch.Tensor:
        if self.frame_index is None:
            return rows[:, None, :]  # [B,C] -> [B,1,C]
        frames = self.base.frame_grid[0]
        return rows.unflatten(0, (-1, frames)).index_select(1, self.frame_index)  # [B*F',C] -> [B,s,C]

    def _attend_chunks(self, received: torch.Tensor) -> torch.Tensor:
        degree, three, batch, share, heads, head_dim = received.shape
        q, k, v = received.permute(1, 2, 4, 0, 3, 5).reshape(three, batch, heads, degree * share, head_dim)  # [B,h,c,D] each
        chunk = degree * share  # tokens of a Ulysses group's chunk; the real ones first

        def keys(j: int) -> int:  # real keys of ring chunk j
            return min(max(self.length - j * chunk, 0), chunk)

        def attend(q_, k_, v_):
            return self.base.backend.attention(q_, k_[:, :, : keys(0)], v_[:, :, : keys(0)])

        def attend_lse(q_, k_, v_, j):
            return self.base.backend.attention_lse(q_, k_[:, :, : keys(j)], v_[:, :, : keys(j)])

        out = self._ring(q, k, v, attend, attend_lse)  # [B,h,c,D]
        return out.unflatten(2, (degree, share)).permute(2, 0, 3, 1, 4)  # [u,B,s,h,D]

    def self_attention(self, q, k, v, heads: int) -> torch.Tensor:
        qkv = torch.stack([q, k, v]).unflatten(-1, (heads, -1))  # [3,B,s,H,D]
        return self._self_attention(qkv, heads).flatten(2)  # [B,s,C]

    def cross_attention(self, q, k, v, heads: int) -> torch.Tensor:
        return self.base.cross_attention(q, k, v, heads)  # the whole text for the local queries


def _cumulative(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)  # [N+1]


@dataclass(frozen=True, eq=False)
class ShardedPackedLayout(_ShardedAttention):
    """This rank's share of every sequence of a pack, end to end: x ``[1, T_loc, C]``, sequence i contributing
    ``shard_size(L_i, degree)`` tokens (its real ones first, then padding), so every rank has the same shapes."""

    base: PackedLayout
    groups: ParallelGroups
    source: torch.Tensor  # [T_loc] long: the packed token each local token is (padding: its sequence's last)
    real: torch.Tensor  # [T_loc] bool
    total_real: torch.Tensor  # [1]: one row, every sequence's tokens
    local_cu: torch.Tensor  # [N+1] int32 cumulative local lengths
    local_max: int
    rope: tuple[torch.Tensor, torch.Tensor]  # [T_loc, D/2]
    chunk_order: torch.Tensor  # [u*T_loc] long: received tokens (source rank major) -> chunk order (sequence major)
    chunk_cu: torch.Tensor  # [N+1] int32
    chunk_max: int
    chunk_keys: tuple[tuple[torch.Tensor, torch.Tensor, int], ...]  # per ring chunk: (real key index, cu_k, max_k)
    gather_index: torch.Tensor  # [T] long: gathered shares (rank major) -> packed order

    @classmethod
    def build(cls, base: PackedLayout, groups: ParallelGroups) -> "ShardedPackedLayout":
        plan, index = groups.plan, groups.share_index
        degree, ulysses = plan.sequence_degree, plan.ulysses
        pack = base.pack
        device = pack.cu_seqlens.device
        starts = [int(i) for i in pack.cu_seqlens.tolist()[:-1]]
        lengths = pack.lengths
        shares = [shard_size(length, degree) for length in lengths]
        local_starts = [0, *accumulate(shares)]
        local_total = local_starts[-1]
        source, real, order, gather = [], [], [], []
        for start, length, share, local in zip(starts, lengths, shares, local_starts):
            positions = torch.arange(index * share, (index + 1) * share, device=device)
            source.append(start + positions.clamp(max=length - 1))
            real.append(positions < length)
            for rank in range(ulysses):  # chunk order: the sequence's tokens of each rank of the group in turn
                order.append(rank * local_total + local + torch.arange(share, device=device))
            p = torch.arange(length, device=device)
            gather.append((p // share) * local_total + local + p % share)
        chunk = [ulysses * share for share in shares]
        chunk_starts = [0, *accumulate(chunk)]
        chunk_keys = []
        for j in range(plan.ring):  # ring chunk j: each sequence's real keys are a prefix of its part
            counts = [min(max(length - j * size, 0), size) for length, size in zip(lengths, chunk)]
            key_index = torch.cat([s + torch.arange(n, device=device) for s, n in zip(chunk_starts, counts)])
            chunk_keys.append((key_index, _cumulative(counts, device), max(counts)))
        source = torch.cat(source)
        rope = tuple(table.index_select(0, source) for table in pack.rope)
        return cls(
            base, groups, source, torch.cat(real), torch.tensor([sum(lengths)], device=device),
            _cumulative(shares, device), max(shares), rope, torch.cat(order), _cumulative(chunk, device), max(chunk),
            tuple(chunk_keys), torch.cat(gather),
        )

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.source)  # [1,T,C] -> [1,T_loc,C]

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """``[1, T_loc, P]`` -> ``[1, T, P]`` on every rank of the sequence group."""
        parts = _all_gather(out, self.groups.sequence) if _group_size(self.groups.sequence) > 1 else [out]
        return torch.cat(parts, dim=1).index_select(1, self.gather_index)

    def per_token(self, rows: torch.Tensor) -> torch.Tensor:
        owner = self.base.pack.token_frame if self.base.per_frame else self.base.pack.token_sequence  # [T]
        return rows.index_select(0, owner.index_select(0, self.source))[None]  # [N,C] -> [1,T_loc,C]

    def _attend_chunks(self, received: torch.Tensor) -> torch.Tensor:
        degree, three, _, local, heads, head_dim = received.shape
        flat = received.permute(1, 0, 2, 3, 4, 5).reshape(three, degree * local, heads, head_dim)  # [3, u*T_loc, h, D]
        q, k, v = flat.index_select(1, self.chunk_order)  # [T_c, h, D] each, sequence by sequence
        backend = self.base.backend

        def attend(q_, k_, v_):
            index, cu_k, max_k = self.chunk_keys[0]
            return backend.attention_varlen(q_, k_[index], v_[index], self.chunk_cu, cu_k, self.chunk_max, max_k)

        def attend_lse(q_, k_, v_, j):
            index, cu_k, max_k = self.chunk_keys[j]
            return backend.attention_varlen_lse(q_, k_[index], v_[index], self.chunk_cu, cu_k, self.chunk_max, max_k)

        out = self._ring(q, k, v, attend, attend_lse)  # [T_c, h, D]
        back = torch.empty_like(out).index_copy_(0, self.chunk_order, out)  # source rank major again
        return back.view(degree, 1, local, heads, head_dim)  # [u,1,T_loc,h,D]

    def self_attention(self, q, k, v, heads: int) -> torch.Tensor:
        qkv = torch.stack([q, k, v]).unflatten(-1, (heads, -1))  # [3,1,T_loc,H,D]
        return self._self_attention(qkv, heads).flatten(2)  # [1,T_loc,C]

    def cross_attention(self, q, k, v, heads: int) -> torch.Tensor:
        text = self.base.text
        q, k, v = (t[0].unflatten(-1, (heads, -1)) for t in (q, k, v))  # [T_loc or Tk, H, D]
        out = self.base.backend.attention_varlen(q, k, v, self.local_cu, text.cu_seqlens, self.local_max, text.max_seqlen)
        return out.flatten(1)[None]  # [1,T_loc,C]


def _sub_pack(layout: PackedLayout, first: int, stop: int) -> PackedLayout:
    """The layout of sequences ``first:stop`` of ``layout``'s pack (and their texts), numbered from 0."""
    pack, text = layout.pack, layout.text
    t0, t1 = int(pack.cu_seqlens[first]), int(pack.cu_seqlens[stop])
    frame0 = sum(grid[0] for grid in pack.grids[:first])
    grids = pack.grids[first:stop]
    sub = Pack(
        grids, pack.cu_seqlens[first : stop + 1] - t0, max(f * h * w for f, h, w in grids),
        pack.token_sequence[t0:t1] - first, pack.token_frame[t0:t1] - frame0, tuple(table[t0:t1] for table in pack.rope),
    )
    k0, k1 = int(text.cu_seqlens[first]), int(text.cu_seqlens[stop])
    lengths = (text.cu_seqlens[first + 1 : stop + 1] - text.cu_seqlens[first:stop]).tolist()
    sub_text = PackedText(text.tokens[k0:k1], text.cu_seqlens[first : stop + 1] - k0, max(lengths))
    return PackedLayout(layout.backend, sub, sub_text, layout.per_frame)


class DiTParallel:
    """What ``dit.parallel`` holds: the groups, and the forward's split and gather around the DiT's own blocks."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups
        self._told_whole = False

    def describe(self) -> str:
        return f"rank {self.groups.rank} of {self.groups.plan.describe()}"

    def transformer(self, run_blocks: RunBlocks, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                    layout, image_context: torch.Tensor | None) -> torch.Tensor:
        """``WanDiT._transformer`` on this rank's part: embedded ``x`` (``[B,S,C]`` or ``[1,T,C]``), timesteps
        ``[N]`` (modulation rows), raw text ``context``, the base layout -> the whole ``[.., P]`` head output."""
        check_composable(run_blocks.__self__)
        half = self._cfg_half(x, layout)
        if half is not None:
            x, timesteps, context, layout, image_context, sizes = self._take_half(half, x, timesteps, context, layout, image_context)
        if isinstance(layout, DenseLayout):
            sharded = ShardedDenseLayout.build(layout, self.groups, x.shape[1], x.shape[0])
        elif isinstance(layout, PackedLayout):
            sharded = ShardedPackedLayout.build(layout, self.groups)
        else:
            raise TypeError(f"a parallel DiT runs DenseLayout or PackedLayout tokens, got {type(layout).__name__}")
        out = sharded.gather(run_blocks(sharded.shard(x), timesteps, context, sharded, image_context))
        if half is None:
            return out
        widest = max(sizes)  # the halves' token counts may differ (packed): pad to the longer, cut after
        parts = _all_gather(F.pad(out, (0, 0, 0, widest - out.shape[1])), self.groups.cfg)
        return torch.cat([part[:, :size] for part, size in zip(parts, sizes)], dim=0 if isinstance(layout, DenseLayout) else 1)

    def _cfg_half(self, x: torch.Tensor, layout) -> int | None:
        """This rank's CFG index when the batch is split over the two CFG ranks, else None."""
        if self.groups.plan.cfg == 1:
            return None
        rows = layout.pack.num_sequences if isinstance(layout, PackedLayout) else x.shape[0]
        if rows % 2:
            if not self._told_whole:
                log.debug("Spacetime parallel: a batch of %d rows does not halve over the CFG ranks; both compute it whole", rows)
                self._told_whole = True
            return None
        return self.groups.coordinates[0]

    @staticmethod
    def _take_half(half: int, x, timesteps, context, layout, image_context):
        if isinstance(layout, DenseLayout):
            take = lambda t: None if t is None else t.chunk(2)[half]  # noqa: E731 - rows: samples (and their frames)
            return take(x), take(timesteps), take(context), layout, take(image_context), (x.shape[1], x.shape[1])
        pack = layout.pack
        count = pack.num_sequences // 2
        first, stop = half * count, (half + 1) * count
        sub = _sub_pack(layout, first, stop)
        t0, t1 = int(pack.cu_seqlens[first]), int(pack.cu_seqlens[stop])
        if layout.per_frame:
            f0 = sum(grid[0] for grid in pack.grids[:first])
            timesteps = timesteps[f0 : f0 + sub.pack.num_frames]
        else:
            timesteps = timesteps[first:stop]
        k0, k1 = int(layout.text.cu_seqlens[first]), int(layout.text.cu_seqlens[stop])
        cut = int(pack.cu_seqlens[count])
        sizes = (cut, int(pack.cu_seqlens[-1]) - cut)
        return x[:, t0:t1], timesteps, context[:, k0:k1], sub, image_context, sizes


def parallelize(dit, groups: ParallelGroups):
    """Patch ``dit`` (a ``WanDiT``) to run its forwards as this rank's part of ``groups``' plan and return it;
    ``unparallelize`` (or ``dit.parallel = None``) undoes it. Every rank of the run must parallelize its DiT
    (same weights) with its own groups and then call it with the same inputs. One-line ValueError when Ulysses does
    not divide the model's heads."""
    plan = groups.plan
    plan.check(plan.world_size, dit.config.num_heads)  # the heads rule, in the plan's words
    dit.parallel = DiTParallel(groups)
    return dit


def unparallelize(dit):
    """``dit`` computing every forward whole again."""
    dit.parallel = None
    return dit


def check_composable(dit) -> None:
    """One-line error for a transform that cannot run under ``dit.parallel`` (checked as a run starts)."""
    if any(getattr(block.forward, "spacetime_compiled", False) for block in dit.blocks):
        raise ValueError("compile='on' is not allowed with multi-GPU (parallel) runs; allowed: compile='off' when the "
                         "DiT is parallelized (its blocks would trace the collectives)")


__all__ = ["DiTParallel", "ShardedDenseLayout", "ShardedPackedLayout", "check_composable", "parallelize", "unparallelize"]
