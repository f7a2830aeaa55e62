"""Multi-GPU scaling: one guided DiT step (a forward on the positive and negative batch of 2) on 1, 2, 4, 8 ranks.

Usage: python benchmarks/multi_gpu.py [--device cpu|cuda] [--ranks 1,2,4] [--steps 3] [--size WxHxF] [--layout auto|ulysses|ring|cfg]
- cuda (default with a GPU): the Wan 14B config (wan2.1-t2v-14b shapes) at 1280x720x81 (a latent of 21x90x160: 75,600
  tokens), random weights built on each GPU directly in bf16 (meta device, then materialized there), ranks 1/2/4/8 up to
  the GPU count; per rank count: the step time (rank 0, after a warm-up step, all ranks in step by a barrier), the
  scaling efficiency t1 / (n * tn) and each GPU's peak memory (torch.cuda.max_memory_allocated).
- cpu: the built-in DiT's config at 64x64x33 on 1/2/4 gloo processes, weights random in fp32, one thread per process
  at most (the cores shared out). Also the same step through the product path, Spacetime Multi-GPU's worker runtime
  (``jobs.parallel.start_workers``: the host sends each forward to its workers and takes rank 0's result), whose
  difference from the in-rank time is the runtime's own overhead per step.
Layout auto: Ulysses over all ranks when the heads allow it (14B: 40 heads), else ring (the built-in DiT: 3 heads).
The last line sums it up: ``multi_gpu: device=... ranks=... step_s=... efficiency=...``.
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spacetime_bootstrap import load_package  # noqa: E402

load_package()
from comfyui_spacetime.jobs.parallel import start_workers  # noqa: E402
from comfyui_spacetime.jobs.parallel.devices import backend_for, free_port, worker_threads  # noqa: E402
from comfyui_spacetime.jobs.parallel.worker import place_plan  # noqa: E402
from comfyui_spacetime.kernels import get_backend  # noqa: E402
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeModel  # noqa: E402
from comfyui_spacetime.model_defs.parallel.plan import ParallelPlan, make_groups  # noqa: E402
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS, WanDiT  # noqa: E402

CONFIGS = {"cuda": "wan2.1-t2v-14b", "cpu": "builtin-tiny"}
SIZES = {"cuda": "1280x720x81", "cpu": "64x64x33"}
VAE_FACTORS = (4, 8)  # Wan 2.1's VAE: temporal, spatial (the benchmark draws latents directly)


def plan_for(layout: str, ranks: int, heads: int) -> ParallelPlan:
    if ranks == 1:
        return ParallelPlan()
    if layout == "auto":
        layout = "ulysses" if heads % ranks == 0 else "ring"
    if layout == "cfg":
        return ParallelPlan(cfg=2, ring=ranks // 2)
    return ParallelPlan(ulysses=ranks) if layout == "ulysses" else ParallelPlan(ring=ranks)


def latent_shape(size: str, channels: int) -> tuple[int, ...]:
    width, height, frames = (int(n) for n in size.lower().split("x"))
    temporal, spatial = VAE_FACTORS
    return (2, channels, 1 + (frames - 1) // temporal, height // spatial, width // spatial)


def _inputs(config, shape, device, dtype):
    generator = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(shape, generator=generator).to(device)
    timesteps = torch.tensor([700.0, 700.0], device=device)
    context = torch.randn(2, config.text_len, config.text_dim, generator=generator).to(device, dtype)
    return latents, timesteps, context


def _build(config_name: str, device: torch.device, dtype: torch.dtype) -> WanDiT:
    """Random weights straight on ``device`` in ``dtype``: built on the meta device, materialized there, seeded alike on
    every rank (the ranks must hold the same model)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            dit = WanDiT(DIT_PRESETS[config_name], get_backend(device, choice="auto" if device.type == "cuda" else "sdpa"))
    finally:
        torch.set_default_dtype(before)
    dit = dit.to_empty(device=device)
    with torch.no_grad():
        for name, param in dit.named_parameters():  # what init_weights leaves alone (norms): ones and zero biases
            param.zero_() if name.endswith("bias") else param.fill_(1.0)
    dit.init_weights(torch.Generator(device=device).manual_seed(0), zero_head=False)
    return dit.eval().requires_grad_(False)


def _rank_main(rank: int, world: int, port: int, device_type: str, config_name: str, shape, steps: int, layout: str, results):
    try:
        import torch.distributed as dist

        device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(worker_threads(world))
        dist.init_process_group(backend_for((device,)), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=1800))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        config = DIT_PRESETS[config_name]
        plan = plan_for(layout, world, config.num_heads)
        dit = place_plan(_build(config_name, device, dtype), make_groups(plan, config.num_heads))
        latents, timesteps, context = _inputs(config, shape, device, dtype)
        times = []
        with torch.inference_mode():
            for index in range(steps + 1):  # the first one warms up
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                dit(latents, timesteps, context)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dist.barrier()
                if index:
                    times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        dist.destroy_process_group()
        results.put((rank, True, (statistics.median(times), peak, plan.describe())))
    except BaseException as exc:  # reported by the parent
        results.put((rank, False, f"{type(exc).__name__}: {exc}"))


def in_rank_step(world: int, device_type: str, config_name: str, shape, steps: int, layout: str) -> tuple[float, list[int], str]:
    """(rank 0's median step time, peak memory per rank, the plan) of a world of ``world`` processes."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(r, world, port, device_type, config_name, shape, steps, layout, results))
                 for r in range(world)]
    for process in processes:
        process.start()
    found = {}
    try:
        while len(found) < world:
            try:
                rank, ok, value = results.get(timeout=5)
            except queue.Empty:
                dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code {processes[dead[0]].exitcode}") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank}: {value}")
            found[rank] = value
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return found[0][0], [found[r][1] for r in range(world)], found[0][2]


def runtime_step(world: int, config_name: str, shape, steps: int, layout: str) -> float:
    """The median step time through the worker runtime (CPU): the host's proxy DiT, ``world`` worker processes."""
    config = DIT_PRESETS[config_name]
    dit = _build(config_name, torch.device("cpu"), torch.float32)
    model = SpacetimeModel(dit, LatentFormat(config.out_dim, (0.0,) * config.out_dim, (1.0,) * config.out_dim), "random")
    devices = (torch.device("cpu"),) * world
    parallel = start_workers(model, devices, plan_for(layout, world, config.num_heads))
    latents, timesteps, context = _inputs(config, shape, torch.device("cpu"), torch.float32)
    times = []
    try:
        with torch.inference_mode():
            for index in range(steps + 1):
                start = time.perf_counter()
                parallel.dit(latents, timesteps, context)
                if index:
                    times.append(time.perf_counter() - start)
    finally:
        parallel.dit.runtime.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ranks", default="", help="comma-separated rank counts (default: cuda 1,2,4,8 up to the GPUs; cpu 1,2,4)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", default="", help="WxHxF in pixels (default: cuda 1280x720x81, cpu 64x64x33)")
    parser.add_argument("--layout", choices=("auto", "ulysses", "ring", "cfg"), default="auto")
    args = parser.parse_args()
    device_type = args.device
    config_name = CONFIGS[device_type]
    config = DIT_PRESETS[config_name]
    if args.ranks:
        ranks = [int(n) for n in args.ranks.split(",")]
    elif device_type == "cuda":
        ranks = [n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count()]
    else:
        ranks = [1, 2, 4]
    shape = latent_shape(args.size or SIZES[device_type], config.in_dim)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    print(f"{config_name} ({config.num_heads} heads), latent {list(shape)} = {tokens} tokens per video, batch 2 (a guided "
          f"step), {args.steps} steps after a warm-up, device {device_type}, {os.cpu_count()} CPU cores")
    header = "| ranks | plan | step s | efficiency | peak memory per rank |" + (" step s via the runtime |" if device_type == "cpu" else "")
    print(header)
    print("|" + "---|" * header.count(" |"))
    times = []
    for world in ranks:
        step_s, peaks, plan = in_rank_step(world, device_type, config_name, shape, args.steps, args.layout)
        times.append(step_s)
        efficiency = times[0] / (world * step_s) if ranks[0] == 1 else float("nan")
        memory = ", ".join(f"{p / 2**30:.1f} GiB" for p in peaks) if device_type == "cuda" else "n/a (CPU)"
        row = f"| {world} | {plan} | {step_s:.4f} | {efficiency:.2f} | {memory} |"
        if device_type == "cpu":
            row += f" {runtime_step(world, config_name, shape, args.steps, args.layout):.4f} |"
        print(row, flush=True)
    efficiencies = ",".join(f"{times[0] / (n * t):.2f}" for n, t in zip(ranks, times))
    print(f"multi_gpu: device={device_type} ranks={','.join(map(str, ranks))} "
          f"step_s={','.join(f'{t:.4f}' for t in times)} efficiency={efficiencies}")


if __name__ == "__main__":
    main()
