"""Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; the ring half of USP): each rank
of a ring group keeps its queries and passes its key/value chunk around the ring, one hop per step, attending its
queries to every chunk in turn and merging the partial results exactly with their log-sum-exp
(``kernels.attention_lse.merge_attention``). The next chunk's send/receive (``batch_isend_irecv`` with the ring
neighbours) is posted before the current chunk is attended, so communication overlaps the compute."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ...kernels.attention_lse import merge_attention

# attend(q, k, v, chunk) -> (out, lse) fp32: q against chunk ``chunk``'s keys (the caller drops its padded keys)
AttendChunk = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def ring_attention(q: torch.Tensor, kv: torch.Tensor, group, attend: AttendChunk) -> torch.Tensor:
    """Attention of this rank's queries ``q`` over the key/value chunks of every rank of ``group``: ``kv [2, ...]``
    this rank's chunk (k then v, the same shape on every rank). Returns the merged output, fp32."""
    size, index = dist.get_world_size(group), dist.get_rank(group)
    out = lse = None
    current = kv.contiguous()
    for step in range(size):
        chunk = (index - step) % size  # whose keys this rank holds now: chunks travel to the next rank
        requests = []
        if step + 1 < size:
            incoming = torch.empty_like(current)
            requests = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, current, group=group, group_peer=(index + 1) % size),
                dist.P2POp(dist.irecv, incoming, group=group, group_peer=(index - 1) % size),
            ])
        block_out, block_lse = attend(q, current[0], current[1], chunk)
        out, lse = merge_attention(out, lse, block_out, block_lse)
        for request in requests:
            request.wait()
        if requests:
            current = incoming
    return out
