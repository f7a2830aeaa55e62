"""Functions the FSDP and split-VAE tests run on every rank of a gloo world (``parallel_procs.run_ranks``): each
takes ``(rank, world_size, *args)`` and returns plain values (numbers, lists: a tensor sent back shares memory with a
process that exits) for the test to compare."""
from __future__ import annotations

import functools

import torch

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.fp8 import cast_for_compute, prepare_fp8
from comfyui_spacetime.model_defs.parallel.fsdp import held_block_bytes, shard_blocks
from comfyui_spacetime.model_defs.parallel.plan import ParallelPlan, make_groups
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig

# Tiny, with sizes that do not divide by 2 or 4 (padded last shards): 3 heads of 12, an FFN of 50, 3 blocks
FSDP_CONFIG = WanDiTConfig(dim=36, ffn_dim=50, freq_dim=16, text_dim=20, text_len=5, num_heads=3, num_layers=3)


def _dit(dtype: torch.dtype = torch.float32, fp8_ffn: bool = False) -> WanDiT:
    """The same seeded DiT on every rank; ``fp8_ffn``: its FFN weights stored as float8_e4m3fn (``FP8Linear``),
    loaded as the checkpoint loader does."""
    torch.manual_seed(0)
    dit = WanDiT(FSDP_CONFIG, REFERENCE)
    dit.init_weights(torch.Generator().manual_seed(1), zero_head=False)
    if dtype != torch.float32 or fp8_ffn:
        state = {k: (v.to(torch.float8_e4m3fn) if fp8_ffn and ".ffn." in k and k.endswith("weight") else v) for k, v in dit.state_dict().items()}
        state = prepare_fp8(dit, state)
        dit.load_state_dict(cast_for_compute(state, dtype), assign=True)
    return dit.eval().requires_grad_(False)


def _inputs(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, FSDP_CONFIG.in_dim, 3, 6, 10, generator=generator)  # odd grid: 3 x 3 x 5 patches
    timesteps = torch.tensor([900.0, 250.0])
    context = torch.randn(2, FSDP_CONFIG.text_len, FSDP_CONFIG.text_dim, generator=generator).to(dtype)
    return latents.to(dtype), timesteps, context


def _gathered_while_running(dit: WanDiT) -> list:
    """Hooks on each block's self-attention (inside the block's forward) that record which blocks hold whole,
    gathered weights at that moment (a plain tensor where the shards are DTensors)."""
    seen = []

    def record(module, args):
        seen.append([index for index, block in enumerate(dit.blocks) if not hasattr(block.ffn[0].weight, "to_local")])

    return seen, [block.self_attn.register_forward_pre_hook(record) for block in dit.blocks]


def fsdp_checks(rank: int, world_size: int, groups=None) -> dict:
    """The sharded DiT against the unsharded one on this rank: fp32 (dense twice, packed, then out of inference mode;
    prefetch on, and once off) and bf16 with fp8 FFN weights; bytes held per rank; which blocks hold gathered
    weights while each block runs."""
    groups = groups or make_groups(ParallelPlan(ring=world_size, fsdp=True), num_heads=FSDP_CONFIG.num_heads)
    out: dict = {}
    for name, dtype, fp8_ffn, prefetch in (("fp32", torch.float32, False, True), ("fp32_no_prefetch", torch.float32, False, False),
                                            ("fp8", torch.bfloat16, True, True)):
        dit = _dit(dtype, fp8_ffn)
        latents, timesteps, context = _inputs(dtype)
        videos = [latents[0], latents[1, :, :1, :4]]  # a packed pair of different sizes
        full = name == "fp32"
        with torch.inference_mode():
            expected = dit(latents, timesteps, context)
            expected_packed = dit.forward_videos(videos, timesteps, context) if full else []
        whole = held_block_bytes(dit)
        dtypes = {n: p.dtype for n, p in dit.blocks.named_parameters()}
        shard_blocks(dit, groups, prefetch=prefetch)
        held = held_block_bytes(dit)
        seen, handles = _gathered_while_running(dit)
        with torch.inference_mode():
            outputs = [dit(latents, timesteps, context) for _ in range(2 if full else 1)]  # the second reuses buffers
            packed = dit.forward_videos(videos, timesteps, context) if full else []
        for handle in handles:
            handle.remove()
        if full:
            with torch.no_grad():  # after inference mode, out of it (other callers than the sampler)
                outputs.append(dit(latents, timesteps, context))
        out[name] = {
            "error": max((output - expected).abs().max().item() for output in outputs),
            "packed_error": max([(a - b).abs().max().item() for a, b in zip(packed, expected_packed)], default=0.0),
            "whole_bytes": whole, "held_bytes": held, "held_after": held_block_bytes(dit),
            "dtypes_kept": all(_local_dtype(p) == dtypes[n] for n, p in dit.blocks.named_parameters()),
            "dtypes": sorted({str(dtype) for dtype in dtypes.values()}),
            "gathered": seen[: len(dit.blocks)],
            "output": outputs[0][0, 0, 0, 0, :3].tolist(),
        }
    try:
        shard_blocks(dit, groups)
    except ValueError as error:
        out["again"] = str(error)
    return out


def fsdp_with_sequence_parallel(rank: int, world_size: int) -> dict:
    """FSDP under the sequence- and CFG-parallel patch (``sequence.parallelize``, applied first as the runtime does):
    CFG over 2 ranks, ring attention over the rest; the whole result on every rank against the single process."""
    from comfyui_spacetime.model_defs.parallel.sequence import parallelize

    groups = make_groups(ParallelPlan(ring=world_size // 2, cfg=2, fsdp=True), num_heads=FSDP_CONFIG.num_heads)
    dit = _dit()
    latents, timesteps, context = _inputs(torch.float32)
    videos = [latents[0], latents[1, :, :1, :4]]
    with torch.inference_mode():
        expected = dit(latents, timesteps, context)
        expected_packed = dit.forward_videos(videos, timesteps, context)
    shard_blocks(parallelize(dit, groups), groups)
    with torch.inference_mode():
        dense = dit(latents, timesteps, context)
        packed = dit.forward_videos(videos, timesteps, context)
    return {"error": (dense - expected).abs().max().item(),
            "packed_error": max((a - b).abs().max().item() for a, b in zip(packed, expected_packed)),
            "held_bytes": held_block_bytes(dit)}


def _local_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.to_local().dtype if hasattr(tensor, "to_local") else tensor.dtype


def vae_checks(rank: int, world_size: int, latent: torch.Tensor, groups=None) -> dict:
    """The split decode of ``latent`` (the test's, ``[1,16,T',h,w]``) by the built-in VAE on this rank, in 64-px tiles:
    the result on every rank; of a crop with fewer tiles than ranks (``narrow``): on every rank, on rank 0 only
    (``dst``); untiled (a 32x32 crop);
    this rank's chunk counts; one-line errors for a bad tile size and dst. Videos come back as numpy arrays (copied,
    not shared)."""
    from comfyui_spacetime.model_defs.builtin import builtin_vae
    from comfyui_spacetime.model_defs.parallel.vae_decode import decode_split

    groups = groups or make_groups(ParallelPlan(ring=world_size))
    vae, latents = builtin_vae().vae, {"wide": latent, "narrow": latent[..., :8, :12]}
    out: dict = {}
    with torch.inference_mode():
        chunks = []
        out["wide"] = decode_split(vae, latents["wide"], groups, 64, on_chunk=lambda done, total: chunks.append((done, total))).numpy()
        out["chunks"] = chunks
        at_zero = decode_split(vae, latents["narrow"], groups, 64, dst=0)
        out["dst0"] = None if at_zero is None else at_zero.numpy()
        out["narrow"] = decode_split(vae, latents["narrow"], groups, 64).numpy()
        out["untiled"] = decode_split(vae, latents["narrow"][..., :4, :4], groups, 0).numpy()
    for name, kwargs in (("bad_tile", dict(tile_size=12)), ("bad_dst", dict(tile_size=64, dst=world_size))):
        try:
            decode_split(vae, latents["wide"], groups, **kwargs)
        except ValueError as error:
            out[name] = str(error)
    return out


def weight_checks(rank: int, world_size: int, latent: torch.Tensor) -> dict:
    """Both modules' checks in one world: starting the processes (importing torch in each) is most of the time."""
    groups = make_groups(ParallelPlan(ring=world_size, fsdp=True), num_heads=FSDP_CONFIG.num_heads)
    return {"fsdp": fsdp_checks(rank, world_size, groups), "vae": vae_checks(rank, world_size, latent, groups),
            "fsdp_sequence": fsdp_with_sequence_parallel(rank, world_size)}


@functools.cache
def clip_latent() -> torch.Tensor:
    """(In the test process) the built-in VAE's latent ``[1,16,2,12,20]`` of tests/test_jobs_vae_tiles.py's 160x96
    clip of moving discs, whose tiled-decode tolerance is measured there."""
    from comfyui_spacetime.model_defs.builtin import builtin_vae
    from test_jobs_vae_tiles import moving_discs

    with torch.inference_mode():
        return builtin_vae().vae.encode(moving_discs().permute(3, 0, 1, 2)[None].mul(2).sub(1))


@functools.cache
def world_results(world_size: int) -> list[dict]:
    """(In the test process) ``weight_checks`` on a world of ``world_size`` ranks, spawned once for all the test
    modules that ask (test_parallel_fsdp.py, test_parallel_vae.py)."""
    from parallel_procs import run_ranks

    return run_ranks(world_size, "parallel_weight_checks:weight_checks", clip_latent())
