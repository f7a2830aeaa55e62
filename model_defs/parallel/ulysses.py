"""DeepSpeed-Ulysses' all-to-all (Jacobs et al. 2023, "DeepSpeed Ulysses"; the USP arrangement of xDiT/yunchang):
before self-attention every rank of a Ulysses group holds a share of the tokens for all heads; one all-to-all
gives each rank all the group's tokens for ``heads / ulysses`` of the heads, and after attention the inverse
all-to-all gives the tokens back. One ``all_to_all_single`` over the group each way (NCCL and gloo both have it;
checked on gloo in torch 2.13), q, k and v stacked into one message.

Layout on the wire: the leading axis of the tensor sent is the destination rank (its head group), of the tensor
received the source rank (its share of the tokens), so the receiver's tokens come out in share order."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_to_all(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor [W, ...]``: row j goes to rank j of ``group``; the result's row j came from rank j."""
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor)
    dist.all_to_all_single(received, tensor, group=group)
    return received


def scatter_heads(qkv: torch.Tensor, degree: int, group) -> torch.Tensor:
    """``qkv [3, B, s, H, D]`` (this rank's s tokens, all heads) -> ``[degree, 3, B, s, H/degree, D]``: for each
    rank j of the group (axis 0, in group order) its s tokens of this rank's head group."""
    three, batch, tokens, heads, head_dim = qkv.shape
    outgoing = qkv.view(three, batch, tokens, degree, heads // degree, head_dim).permute(3, 0, 1, 2, 4, 5)  # [u,3,B,s,h,D]
    return all_to_all(outgoing, group) if degree > 1 else outgoing


def gather_heads(out: torch.Tensor, degree: int, group) -> torch.Tensor:
    """Inverse of ``scatter_heads`` for the attention output: ``out [degree, B, s, h, D]`` (axis 0: the rank whose
    tokens these are) -> ``[B, s, degree*h, D]``: this rank's tokens for every head, heads in order."""
    received = all_to_all(out, group) if degree > 1 else out  # [u (head group), B, s, h, D]
    return received.permute(1, 2, 0, 3, 4).flatten(2, 3)  # [B,s,H,D]
