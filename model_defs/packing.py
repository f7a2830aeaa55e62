"""Packed DiT forward (NaViT's "patch n' pack", Dehghani et al. 2023): the spacetime patches of several
videos of different sizes laid end to end as one sequence and run through a ``WanDiT``'s own modules,
weights and kernels at once, each video's result the same as running it alone.

How each part of a Wan block sees the pack (N sequences, T = sum of their token counts):
- self-attention is block-diagonal through the backend's varlen attention (``cu_seqlens``): no token
  attends across videos, no work on padding. Each video carries the 3D RoPE positions of its own grid,
  so its tokens have the positions they would have alone.
- cross-attention is varlen too: the tokens of sequence i attend to the text tokens of sequence i only
  (queries cut by the video ``cu_seqlens``, keys by the packed text's ``cu_seqlens``); a context mask
  drops masked text tokens from the pack, which is what masking them out does.
- AdaLN modulation and gates are computed per sequence ``[N, 6, C]`` and gathered to that sequence's
  tokens ``[1, T, C]`` one chunk at a time (the kernels take per-token shift/scale/gate), so the extra
  memory is two fp32 activations at most, never the six.
- patchify is one linear over patch vectors of all videos in ``(pt ph pw c)`` order - the patch
  embedding's Conv3d weight rearranged, the same numbers - and that is also the order of the head's
  output, so sampling can keep its state as packed tokens and never unpatchify between steps.

Shapes: T packed video tokens; P = pt*ph*pw*channels (a patch vector); Tk packed text tokens; C model
width; H heads, D head dim. The ``WanBlock`` op order is mirrored in ``_packed_block`` (the dense
block serves ``[B, S, C]`` with per-sample modulation); tests/test_packed.py pins the two equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .layers import rope_3d_tables, sinusoidal_embedding
from .wan_dit import WanAttention, WanBlock, WanDiT


@dataclass(frozen=True, eq=False)
class Pack:
    """Where each video sequence of a pack lives: sequence i owns tokens ``cu_seqlens[i]:cu_seqlens[i+1]``
    in (f, h, w) raster order of its patch grid ``grids[i]``."""

    grids: tuple[tuple[int, int, int], ...]
    cu_seqlens: torch.Tensor  # [N+1] int32
    max_seqlen: int
    token_sequence: torch.Tensor  # [T] long: the sequence each token belongs to
    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [T, D/2] fp32, each sequence's own positions

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(f * h * w for f, h, w in self.grids)

    @property
    def num_sequences(self) -> int:
        return len(self.grids)


@dataclass(frozen=True, eq=False)
class PackedText:
    """Every sequence's text context end to end: sequence i's keys are ``tokens[cu_seqlens[i]:cu_seqlens[i+1]]``."""

    tokens: torch.Tensor  # [Tk, text_dim]
    cu_seqlens: torch.Tensor  # [N+1] int32
    max_seqlen: int


def _cumulative(lengths: Sequence[int], device) -> torch.Tensor:
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + int(length))
    return torch.tensor(bounds, dtype=torch.int32, device=device)  # [N+1]


def make_pack(grids: Sequence[tuple[int, int, int]], head_dim: int, device: torch.device | str) -> Pack:
    """The layout of sequences with patch grids ``grids`` (F', H', W'), in that order."""
    grids = tuple(tuple(int(n) for n in grid) for grid in grids)
    if not grids or any(min(grid) < 1 for grid in grids):
        raise ValueError(f"a pack needs at least one sequence, each with a non-empty patch grid; got {list(grids)}")
    lengths = [f * h * w for f, h, w in grids]
    device = torch.device(device)
    tables = [rope_3d_tables(grid, head_dim, device=device) for grid in grids]  # cached per grid, as the dense forward's
    cos = torch.cat([table[0] for table in tables])  # [T, D/2]
    sin = torch.cat([table[1] for table in tables])  # [T, D/2]
    counts = torch.tensor(lengths, device=device)
    token_sequence = torch.repeat_interleave(torch.arange(len(grids), device=device), counts, output_size=sum(lengths))  # [T]
    return Pack(grids, _cumulative(lengths, device), max(lengths), token_sequence, (cos, sin))


def pack_text(contexts: torch.Tensor, masks: torch.Tensor | None = None) -> PackedText:
    """contexts ``[N, L, text_dim]`` (one row per sequence), masks ``[N, L]`` bool or None (all kept) ->
    the kept tokens of every row end to end."""
    if contexts.ndim != 3:
        raise ValueError(f"contexts must be [N, L, text_dim], got shape {tuple(contexts.shape)}")
    count, length = contexts.shape[:2]
    if masks is None:
        return PackedText(contexts.reshape(count * length, -1), _cumulative([length] * count, contexts.device), length)
    if masks.shape != contexts.shape[:2]:
        raise ValueError(f"context masks must be [N, L] = {tuple(contexts.shape[:2])}, got {tuple(masks.shape)}")
    masks = masks.to(device=contexts.device, dtype=torch.bool)
    lengths = [int(n) for n in masks.sum(dim=1).tolist()]
    if min(lengths) == 0:
        raise ValueError(f"context mask of sequence {lengths.index(0)} keeps no text token; keep at least one")
    return PackedText(contexts[masks], _cumulative(lengths, contexts.device), max(lengths))  # [Tk, text_dim]


def patchify(latent: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """latent ``[Cin, F, H, W]`` -> patch vectors ``[F'*H'*W', pt*ph*pw*Cin]`` in (f, h, w) raster order."""
    pt, ph, pw = patch_size
    return rearrange(latent, "c (f p) (h q) (w r) -> (f h w) (p q r c)", p=pt, q=ph, r=pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """patch vectors ``[F'*H'*W', pt*ph*pw*C]`` -> ``[C, F, H, W]`` (the inverse of ``patchify``)."""
    pt, ph, pw = patch_size
    f, h, w = grid
    return rearrange(tokens, "(f h w) (p q r c) -> c (f p) (h q) (w r)", f=f, h=h, w=w, p=pt, q=ph, r=pw)


def patch_grid(latent_shape: Sequence[int], patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """(F', H', W') of a latent ``[..., F, H, W]``; an error if a side is not a multiple of the patch."""
    frames, height, width = (int(n) for n in latent_shape[-3:])
    pt, ph, pw = patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"latent size {frames}x{height}x{width} (frames x height x width) is not a multiple of the patch {patch_size}")
    return frames // pt, height // ph, width // pw


def _per_token(per_sequence: torch.Tensor, pack: Pack) -> torch.Tensor:
    """``[N, C]`` -> ``[1, T, C]``: each sequence's row repeated over its tokens."""
    return per_sequence.index_select(0, pack.token_sequence)[None]


def _packed_attention(
    attn: WanAttention,
    attention_varlen,
    x: torch.Tensor,
    source: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """``WanAttention`` over a pack. x ``[1,T,C]``; source ``[1,Tk,C]`` (x itself for self-attention)."""
    heads = attn.num_heads
    q = rearrange(attn.norm_q(attn.q(x)), "b t (h d) -> (b t) h d", h=heads)  # [T,H,D]
    k = rearrange(attn.norm_k(attn.k(source)), "b t (h d) -> (b t) h d", h=heads)  # [Tk,H,D]
    v = rearrange(attn.v(source), "b t (h d) -> (b t) h d", h=heads)  # [Tk,H,D]
    out = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rope)  # [T,H,D]
    return attn.o(rearrange(out, "t h d -> 1 t (h d)"))  # [1,T,C]


def _packed_block(
    block: WanBlock, dit: WanDiT, x: torch.Tensor, time_mod: torch.Tensor, ctx: torch.Tensor, pack: Pack, text: PackedText
) -> torch.Tensor:
    """``WanBlock.forward`` op for op, on a pack: x ``[1,T,C]``; time_mod ``[N,6,C]`` fp32; ctx ``[1,Tk,C]``."""
    kernels = dit.backend
    mod = block.modulation.float()[0] + time_mod  # [N,6,C]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)  # [N,C] each
    h = kernels.layer_norm_modulate(x, _per_token(shift_msa, pack), _per_token(scale_msa, pack), block.eps)  # [1,T,C]
    y = _packed_attention(
        block.self_attn, kernels.attention_varlen, h, h,
        pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen, pack.rope,
    )  # [1,T,C]
    x = kernels.gated_residual(x, y, _per_token(gate_msa, pack))  # [1,T,C]
    y = _packed_attention(
        block.cross_attn, kernels.attention_varlen, block.norm3(x), ctx,
        pack.cu_seqlens, text.cu_seqlens, pack.max_seqlen, text.max_seqlen, None,
    )  # [1,T,C]
    x = x + y  # [1,T,C]
    h = kernels.layer_norm_modulate(x, _per_token(shift_mlp, pack), _per_token(scale_mlp, pack), block.eps)  # [1,T,C]
    return kernels.gated_residual(x, block.ffn(h), _per_token(gate_mlp, pack))  # [1,T,C]


def forward_pack(dit: WanDiT, pack: Pack, tokens: torch.Tensor, timesteps: torch.Tensor, text: PackedText) -> torch.Tensor:
    """The DiT on a pack: tokens ``[T, pt*ph*pw*in_dim]`` (``patchify`` order), timesteps ``[N]`` (0..1000,
    one per sequence), text ``[Tk, text_dim]`` packed -> velocity patch vectors ``[T, pt*ph*pw*out_dim]`` fp32."""
    cfg = dit.config
    total = sum(pack.lengths)
    if tokens.ndim != 2 or tokens.shape[0] != total:
        raise ValueError(f"tokens must be [{total}, P] for this pack, got {tuple(tokens.shape)}")
    if timesteps.shape != (pack.num_sequences,) or text.cu_seqlens.shape != pack.cu_seqlens.shape:
        raise ValueError(
            f"a pack of {pack.num_sequences} sequences needs {pack.num_sequences} timesteps and contexts, "
            f"got timesteps {tuple(timesteps.shape)} and {text.cu_seqlens.numel() - 1} contexts"
        )
    dtype = dit.patch_embedding.weight.dtype
    embed_weight = rearrange(dit.patch_embedding.weight, "d c p q r -> d (p q r c)")  # [C, P] (the Conv3d, as a linear)
    x = F.linear(tokens.to(dtype), embed_weight, dit.patch_embedding.bias)[None]  # [1,T,C]
    time_emb = dit.time_embedding(sinusoidal_embedding(timesteps, cfg.freq_dim).to(dtype)).float()  # [N,C]
    time_mod = dit.time_projection(time_emb.to(dtype)).float().unflatten(1, (6, cfg.dim))  # [N,6,C]
    ctx = dit.text_embedding(text.tokens.to(dtype))[None]  # [1,Tk,C]
    for block in dit.blocks:
        x = _packed_block(block, dit, x, time_mod, ctx, pack, text)  # [1,T,C]
    head = dit.head
    shift, scale = (head.modulation.float()[0] + time_emb[:, None, :]).unbind(1)  # [N,C] each
    x = dit.backend.layer_norm_modulate(x, _per_token(shift, pack), _per_token(scale, pack), head.eps)  # [1,T,C]
    return head.head(x)[0].float()  # [T, pt*ph*pw*out_dim]


def packed_forward(
    dit: WanDiT,
    latents: Sequence[torch.Tensor],
    timesteps: torch.Tensor,
    contexts: torch.Tensor,
    context_masks: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``WanDiT.forward`` on N videos of different sizes in one packed pass.

    latents: N tensors ``[in_dim, F_i, H_i, W_i]``; timesteps ``[N]``; contexts ``[N, L, text_dim]``;
    context_masks ``[N, L]`` bool or None. Returns N velocities ``[out_dim, F_i, H_i, W_i]`` fp32, each what
    ``dit(latents[i][None], timesteps[i:i+1], contexts[i:i+1], context_masks[i:i+1])[0]`` gives."""
    if len(latents) != timesteps.shape[0] or len(latents) != contexts.shape[0]:
        raise ValueError(f"{len(latents)} latents need as many timesteps and contexts, got {timesteps.shape[0]} and {contexts.shape[0]}")
    patch = dit.config.patch_size
    device = latents[0].device
    grids = [patch_grid(latent.shape, patch) for latent in latents]
    pack = make_pack(grids, dit.config.head_dim, device)
    tokens = torch.cat([patchify(latent, patch) for latent in latents])  # [T,P]
    out = forward_pack(dit, pack, tokens, timesteps, pack_text(contexts, context_masks))  # [T,P']
    return [unpatchify(part, grid, patch) for part, grid in zip(out.split(pack.lengths), grids)]
