"""Rank functions of the parallel DiT tests (``parallel_procs.run_ranks``): each rank builds the same tiny random
DiT and inputs, computes the single-process result itself, then the parallel one under each plan, and returns
``{case: max |parallel - single|}`` (and whatever else the test compares)."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.parallel.plan import ParallelPlan, make_groups
from comfyui_spacetime.model_defs.parallel.sequence import parallelize, unparallelize
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig

# 4 heads (Ulysses 2 and 4), head dim 12; odd latent grids so no token count divides the degrees
CONFIG = WanDiTConfig(dim=48, ffn_dim=64, freq_dim=32, text_dim=24, text_len=7, num_heads=4, num_layers=2)
CLIP_CONFIG = dataclasses.replace(CONFIG, in_dim=36, model_type="i2v", clip_branch=True, image_dim=16)
DENSE_LATENT = (2, 16, 3, 6, 10)  # patch grid (3, 3, 5): 45 tokens
VIDEOS = [(16, 3, 4, 6), (16, 1, 2, 2), (16, 2, 2, 10)]  # 18, 1 (shorter than any degree), 10 tokens
CFG_VIDEOS = [(16, 3, 4, 6), (16, 1, 2, 2), (16, 2, 2, 10), (16, 2, 2, 10)]  # halves of 19 and 20 tokens

PLANS = {  # world size -> plans, by name
    2: {"ulysses2": (2, 1, 1), "ring2": (1, 2, 1), "cfg2": (1, 1, 2)},
    4: {"ulysses4": (4, 1, 1), "ring4": (1, 4, 1), "usp2x2": (2, 2, 1), "cfg2_ulysses2": (2, 1, 2), "cfg2_ring2": (1, 2, 2)},
}


def tiny_dit(config: WanDiTConfig = CONFIG, seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    dit = WanDiT(config, REFERENCE)
    dit.init_weights(torch.Generator().manual_seed(seed), zero_head=False)  # a random head: outputs depend on inputs
    return dit.eval()


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, frames = DENSE_LATENT[0], DENSE_LATENT[2]
    return {
        "latents": torch.randn(DENSE_LATENT, generator=g),
        "clip_latents": torch.randn(batch, 36, *DENSE_LATENT[2:], generator=g),
        "image_context": torch.randn(batch, 257, 16, generator=g),
        "t_sample": torch.rand(batch, generator=g) * 1000,
        "t_frame": torch.rand(batch, frames, generator=g) * 1000,
        "context": torch.randn(batch, CONFIG.text_len, CONFIG.text_dim, generator=g),
        "videos": [torch.randn(shape, generator=g) for shape in VIDEOS],
        "cfg_videos": [torch.randn(shape, generator=g) for shape in CFG_VIDEOS],
        "contexts": torch.randn(len(CFG_VIDEOS), CONFIG.text_len, CONFIG.text_dim, generator=g),
        "t_videos": torch.rand(len(CFG_VIDEOS), generator=g) * 1000,
        "t_video_frames": torch.rand(sum(shape[1] for shape in CFG_VIDEOS), generator=g) * 1000,
    }


def _cases(dit: WanDiT, clip: WanDiT, i: dict) -> dict:
    """Every forward the tests compare, by name."""
    frames_3 = sum(shape[1] for shape in VIDEOS)
    return {
        "dense": lambda: dit(i["latents"], i["t_sample"], i["context"]),
        "dense_per_frame": lambda: dit(i["latents"], i["t_frame"], i["context"]),
        "dense_one_sample": lambda: dit(i["latents"][:1], i["t_sample"][:1], i["context"][:1]),  # odd batch: cfg whole
        "clip": lambda: clip(i["clip_latents"], i["t_sample"], i["context"], image_context=i["image_context"]),
        "packed": lambda: dit.forward_videos(i["videos"], i["t_videos"][:3], i["contexts"][:3]),
        "packed_per_frame": lambda: dit.forward_videos(i["videos"], i["t_video_frames"][:frames_3], i["contexts"][:3]),
        "packed_even": lambda: dit.forward_videos(i["cfg_videos"], i["t_videos"], i["contexts"]),
        "packed_even_per_frame": lambda: dit.forward_videos(i["cfg_videos"], i["t_video_frames"], i["contexts"]),
    }


def _max_error(got, want) -> float:
    if isinstance(want, list):
        return max(_max_error(g, w) for g, w in zip(got, want))
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got - want).abs().max())


def forward_errors(rank: int, world_size: int) -> dict:
    """``{plan: {case: max error}}`` for every plan of this world size."""
    dit, clip, inputs = tiny_dit(), tiny_dit(CLIP_CONFIG, seed=3), _inputs()
    with torch.no_grad():
        single = {name: run() for name, run in _cases(dit, clip, inputs).items()}
        errors = {}
        for plan_name, (ulysses, ring, cfg) in PLANS[world_size].items():
            groups = make_groups(ParallelPlan(ulysses=ulysses, ring=ring, cfg=cfg), CONFIG.num_heads)
            parallelize(dit, groups), parallelize(clip, groups)
            errors[plan_name] = {name: _max_error(run(), single[name]) for name, run in _cases(dit, clip, inputs).items()}
            unparallelize(dit), unparallelize(clip)
            dist.barrier()
    return errors


def streamed_and_compiled(rank: int, world_size: int) -> dict:
    """A weight-streamed DiT under a plan equals the single-process result; a compiled one is refused (one line,
    on every rank alike, before any collective)."""
    from comfyui_spacetime.model_defs.compiled import compile_blocks
    from comfyui_spacetime.model_defs.weight_streaming import BlockStreamer, plan_for_blocks

    dit, inputs = tiny_dit(), _inputs()
    groups = make_groups(ParallelPlan(ulysses=2, ring=world_size // 2), CONFIG.num_heads)
    with torch.no_grad():
        single = dit(inputs["latents"], inputs["t_sample"], inputs["context"])
        streamer = BlockStreamer(dit, plan_for_blocks(dit, 0), pin=False)
        parallelize(dit, groups)
        with streamer.streaming():
            streamed = dit(inputs["latents"], inputs["t_sample"], inputs["context"])
        compile_blocks(dit, compiler=lambda forward: forward)  # marks the blocks compiled, compiles nothing
        try:
            dit(inputs["latents"], inputs["t_sample"], inputs["context"])
            refused = ""
        except ValueError as error:
            refused = str(error)
    return {"streamed": _max_error(streamed, single), "compile": refused}


SAMPLING_PLANS = {"cfg2_ulysses2": (2, 1, 2), "usp2x2": (2, 2, 1), "cfg2_ring2": (1, 2, 2)}  # a world of 4
SAMPLING_LATENT = (1, 16, 3, 6, 10)  # 45 tokens: no share divides


class _Counts:
    """DiT evaluations (the head runs every time) and computed ones (the last block runs), by forward hooks."""

    def __init__(self, dit: WanDiT):
        self.total = self.computed = 0
        self._handles = [dit.head.register_forward_hook(lambda *a: self._add("total")),
                         dit.blocks[-1].register_forward_hook(lambda *a: self._add("computed"))]

    def _add(self, which: str) -> None:
        setattr(self, which, getattr(self, which) + 1)

    def close(self) -> tuple[int, int]:
        for handle in self._handles:
            handle.remove()
        return self.total, self.computed


def _sampling_runs(model) -> dict:
    """Whole sampling runs by name: each returns (latents, (evaluations, computed))."""
    from comfyui_spacetime.jobs.packed import PackedItem, generate_packed
    from comfyui_spacetime.jobs.text_to_video import generate
    from comfyui_spacetime.model_defs.bundles import SpacetimeConditioning
    from comfyui_spacetime.model_defs.flow_matching import SolverSettings
    from comfyui_spacetime.model_defs.step_cache import StepCacheSettings
    from comfyui_spacetime.model_defs.text_encoders import EncodedText

    def cond(seed: int, tokens: int) -> SpacetimeConditioning:
        emb = torch.zeros(1, CONFIG.text_len, CONFIG.text_dim)
        emb[:, :tokens] = torch.randn(1, tokens, CONFIG.text_dim, generator=torch.Generator().manual_seed(seed))
        mask = torch.arange(CONFIG.text_len)[None] < tokens
        return SpacetimeConditioning(EncodedText(emb, mask, ("p",), (False,)), "test")

    latent = torch.zeros(SAMPLING_LATENT)
    unipc = SolverSettings(4, 5.0, 3.0, "unipc")
    euler = SolverSettings(8, 5.0, 3.0, "euler")
    items = [PackedItem(cond(10 + i, 3 + i), cond(20, 2), (1, *shape), 7 + i, f"item {i}") for i, shape in enumerate(VIDEOS)]
    caches = {"fbcache": StepCacheSettings("fbcache", 0.4, start=0.1),  # measured changes 0.21-0.49: skips some
              "teacache": StepCacheSettings("teacache", 0.1, coefficients="wan2.1-t2v-1.3b")}

    def counted(run):
        def call():
            counts = _Counts(model.dit)
            try:
                return run(), counts.close()
            except BaseException:
                counts.close()
                raise
        return call

    runs = {
        "generate_unipc": lambda: generate(model, cond(1, 5), cond(2, 3), latent, 11, unipc, torch.device("cpu")),
        "generate_cfg1": lambda: generate(model, cond(1, 5), cond(2, 3), latent, 11,
                                          dataclasses.replace(unipc, cfg=1.0), torch.device("cpu")),
        "packed_unipc": lambda: generate_packed(model, items, unipc, torch.device("cpu"), max_tokens=10_000),
    }
    for name, settings in caches.items():
        runs[name] = lambda settings=settings: generate(model.with_step_cache(settings), cond(1, 5), cond(2, 3), latent, 11,
                                                        euler, torch.device("cpu"))
    return {name: counted(run) for name, run in runs.items()}


def sampling_errors(rank: int, world_size: int) -> dict:
    """``{plan: {run: (max error, (evaluations, computed) parallel, the same single)}}`` for whole sampling runs."""
    from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeModel

    stats = torch.Generator().manual_seed(1)
    latent_format = LatentFormat(16, tuple(torch.randn(16, generator=stats).tolist()),
                                 tuple((torch.rand(16, generator=stats) + 0.5).tolist()))
    model = SpacetimeModel(tiny_dit().requires_grad_(False), latent_format, "test-tiny")
    single = {name: run() for name, run in _sampling_runs(model).items()}
    results = {}
    for plan_name, (ulysses, ring, cfg) in SAMPLING_PLANS.items():
        parallelize(model.dit, make_groups(ParallelPlan(ulysses=ulysses, ring=ring, cfg=cfg), CONFIG.num_heads))
        results[plan_name] = {name: (_max_error(out, single[name][0]), counts, single[name][1])
                              for name, (out, counts) in ((n, run()) for n, run in _sampling_runs(model).items())}
        unparallelize(model.dit)
        dist.barrier()
    return results


def world_checks(rank: int, world_size: int) -> dict:
    """Everything the forward tests check in one world: the plans' errors, then streaming and compile."""
    return {"forward": forward_errors(rank, world_size), "composition": streamed_and_compiled(rank, world_size)}
