"""FSDP-sharded DiT blocks: a DiT larger than one device keeps 1/N of every block's weights on each of the N
ranks of the world, and each block is gathered whole just before it runs and freed right after.

Engine: torch's FSDP2, ``torch.distributed.fsdp.fully_shard`` (PyTorch 2.6+), one call per block with
``reshard_after_forward=True``, on a device mesh made from ``groups.world`` (NCCL on GPUs, gloo on CPU). Each
parameter is split along its first dimension (``Shard(0)``: rank r keeps rows ``[r*ceil(d0/N), (r+1)*ceil(d0/N))``,
the last share zero-padded), in its own dtype: fp8 weights stay fp8 and their scales (buffers) stay whole on every
rank. Checked on torch 2.13 with CPU tensors, gloo and ``torch.inference_mode()`` (the sampler's mode):
``tests/test_parallel_fsdp.py``. Only the blocks are sharded; everything else (patch/text/time embeddings, the
head) stays whole on every rank: it is a few percent of the weights and runs outside the blocks.

How it patches the model (the DiT's forward is unchanged): ``fully_shard`` swaps each block's parameters for
sharded ``DTensor``s and installs hooks on the block; the pre-forward hook all-gathers the block (and, with
``prefetch``, starts the next block's all-gather, overlapping it with this block's compute on a GPU), the forward
hook frees the gathered copy. Each block is its own FSDP root, so the DiT keeps its class, other transforms see
the same module tree and every entry point (``forward``, ``forward_packed``) runs the same hooks. Every rank must
run every block in the same order (the all-gathers are collective): true of the sequence-parallel patch
(``sequence.py``: ranks run each block in lockstep on their share of the tokens) and of CFG-parallel ranks (both
guidance passes run all blocks). A transform that skips blocks on some ranks only would
hang the world: step caching decides its skips identically on every rank (``sequence.py`` reduces its change
metrics over the ranks). The blocks' first gather happens at sharding time, on one token, calling the blocks
directly: it does not go through the DiT's forward, so ``shard_blocks`` and ``sequence.parallelize`` apply in either
order.

Apply after LoRA merging and instead of weight streaming (both rewrite the blocks' parameter tables). There is no
undo: FSDP2 has no public way back to plain parameters; reload the model instead.

``fsdp_weight_bytes(config, world)``: the weight bytes one rank holds for a config, from a model built on the meta
device (benchmarks/multi_gpu.py's per-GPU memory line).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ..wan_dit import WanDiT, WanDiTConfig
    from .plan import ParallelGroups


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as error:  # torch < 2.6
        raise RuntimeError(f"FSDP weight sharding needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch {torch.__version__}") from error
    return fully_shard


def is_sharded(dit: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(block, FSDPModule) for block in dit.blocks)


def shard_blocks(dit: "WanDiT", groups: "ParallelGroups", prefetch: bool = True) -> "WanDiT":
    """``dit`` with its blocks' weights sharded over ``groups.world`` (every rank calls this, collectively, on a
    DiT of the same weights on its own device); returns the same module, patched. ``prefetch``: each block's
    pre-forward starts the next block's all-gather (two blocks gathered at once at most)."""
    from torch.distributed.device_mesh import DeviceMesh

    fully_shard = _fully_shard()
    if is_sharded(dit):
        raise ValueError("this DiT's blocks are already sharded (shard_blocks runs once per loaded model)")
    devices = {t.device for block in dit.blocks for t in block.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ValueError(f"shard_blocks needs the DiT's blocks on one device with their weights loaded, got {sorted(map(str, devices))}")
    device = next(iter(devices))
    mesh = DeviceMesh.from_group(groups.world, device.type)
    for block in dit.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    _first_gather_outside_inference_mode(dit, device)
    if prefetch:
        for block, following in zip(dit.blocks, dit.blocks[1:]):
            block.set_modules_to_forward_prefetch([following])
    return dit


def _first_gather_outside_inference_mode(dit: "WanDiT", device: torch.device) -> None:
    """Run every block once on one zero token, out of inference mode. FSDP2 makes a root's communication state
    (streams) and each parameter's gather buffers on its first forward and reuses them: made under
    ``torch.inference_mode()`` (the sampler's first step), they would be inference tensors that a later call out
    of it (``no_grad``) may not write into; and a block can only be prefetched once its state exists. Blocks are
    called directly, on a plain dense layout: no step cache, no sequence-parallel patch of the DiT's forward
    is involved (every rank runs the same one-token pass, so the all-gathers match)."""
    from ..layers import rope_3d_tables
    from ..token_layouts import DenseLayout

    config = dit.config
    dtype = dit.patch_embedding.weight.dtype  # the compute dtype the DiT's forward feeds its blocks
    with torch.inference_mode(False), torch.no_grad():
        x = torch.zeros(1, 1, config.dim, dtype=dtype, device=device)  # [B=1, S=1, C]
        time_mod = torch.zeros(1, 6, config.dim, device=device)  # [1,6,C] fp32
        context = torch.zeros(1, config.text_len + (1 if config.clip_branch else 0), config.dim, dtype=dtype, device=device)
        layout = DenseLayout(dit.backend, rope_3d_tables((1, 1, 1), config.head_dim, device=device))
        for block in dit.blocks:
            block(x, time_mod, context, layout)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def held_block_bytes(dit: nn.Module) -> int:
    """Bytes of the blocks' weights this rank holds now: the storages behind its shards (padding included), or the
    whole tensors of an unsharded DiT; buffers (fp8 scales) counted whole. Between forwards that is all the block
    memory FSDP keeps (the gathered copies are freed)."""
    storages = {}
    for block in dit.blocks:
        for tensor in (*block.parameters(), *block.buffers()):
            storage = _local(tensor).untyped_storage()
            storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
    return sum(storages.values())


def fsdp_weight_bytes(config: "WanDiTConfig", world: int, dtype: torch.dtype = torch.bfloat16, gathered_blocks: int = 2) -> int:
    """Bytes of DiT weights one of ``world`` ranks holds during a sharded run of ``config`` in ``dtype``: the
    non-block weights whole, its shard of every block (``ceil(d0 / world)`` rows of each parameter, as
    ``fully_shard`` pads them) and ``gathered_blocks`` whole blocks gathered at once (2 with prefetch: the running
    one and the next). Built on the meta device: no memory, any size (``wan2.1-t2v-14b``)."""
    from ..wan_dit import WanDiT

    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world={world!r} is not allowed: it must be an integer >= 1")
    with torch.device("meta"):
        dit = WanDiT(dataclasses.replace(config, num_layers=1))  # the blocks are alike: one stands for all
    size = torch.tensor([], dtype=dtype).element_size()
    block_params = list(dit.blocks[0].parameters())
    whole_block = sum(p.numel() for p in block_params) * size
    shard = sum(math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) for p in block_params) * size
    non_block = sum(p.numel() for name, p in dit.named_parameters() if not name.startswith("blocks.")) * size
    blocks = config.num_layers
    if world == 1:
        return non_block + blocks * whole_block
    return non_block + blocks * shard + min(gathered_blocks, blocks) * whole_block
