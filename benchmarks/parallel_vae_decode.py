"""The VAE decode split across ranks by spatial tiles (``model_defs/parallel/vae_decode.py``) against one process:
wall time of the decode and each rank's peak memory above its loaded baseline, on gloo worlds of CPU processes.

Usage: python benchmarks/parallel_vae_decode.py [--worlds 1,2,4] [--size 192x320] [--latent-frames 2] [--tile 64]
       [--family tiny] [--threads 1]
World 1 is the one-process ``decode_tiled``. Every rank decodes its own tiles (r, r+N, ...) with ``--threads``
threads, then all ranks gather the pieces and blend them, so each ends with the whole video (fp32); the memory
column is the decode's working set plus that result. Random weights of the family's config (time and memory do
not depend on the values). On a CPU the ranks share its cores: the speed-up there is bounded by the cores free.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rank(rank: int, world: int, port: int, args, results) -> None:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from spacetime_bootstrap import load_package

    load_package()
    import torch.distributed as dist

    from comfyui_spacetime.model_defs import wan_vae
    from comfyui_spacetime.model_defs.parallel.plan import ParallelPlan, make_groups
    from comfyui_spacetime.model_defs.parallel.vae_decode import decode_split
    from comfyui_spacetime.model_defs.vae_tiles import decode_tiled

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    groups = make_groups(ParallelPlan(ring=world))
    torch.manual_seed(0)
    config = wan_vae.VAE_PRESETS[args.family]
    vae = wan_vae.WanVAE(config).eval()
    height, width = (int(v) for v in args.size.split("x"))
    sf = config.spatial_factor
    latent = torch.randn(1, config.z_dim, args.latent_frames, height // sf, width // sf, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        vae.decode(latent[:, :, :1, :4, :4])  # warm-up: allocator and kernels
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        dist.barrier()
        start = time.perf_counter()
        if world == 1:
            video = decode_tiled(vae, latent, args.tile)
        else:
            video = decode_split(vae, latent, groups, args.tile)
        seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024  # MiB (ru_maxrss: KiB on Linux)
    dist.barrier()
    dist.destroy_process_group()
    results.put((rank, seconds, peak, video.numel() * 4 / 2**20))


def run_world(world: int, args) -> list[tuple]:
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(rank, world, port, args, results)) for rank in range(world)]
    for process in processes:
        process.start()
    rows = sorted(results.get(timeout=1800) for _ in processes)
    for process in processes:
        process.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--size", default="192x320", help="HxW pixels")
    parser.add_argument("--latent-frames", type=int, default=2)
    parser.add_argument("--tile", type=int, default=64, help="tile size in pixels")
    parser.add_argument("--family", default="tiny")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"{args.family} VAE, {args.size} px, {args.latent_frames} latent frames, {args.tile}-px tiles, {args.threads} thread(s) per rank")
    print("world | decode s (slowest rank) | peak MiB above baseline per rank | result MiB")
    for world in (int(w) for w in args.worlds.split(",")):
        rows = run_world(world, args)
        peaks = ", ".join(f"{peak:.0f}" for _, _, peak, _ in rows)
        print(f"{world} | {max(seconds for _, seconds, _, _ in rows):.2f} | {peaks} | {rows[0][3]:.0f}", flush=True)


if __name__ == "__main__":
    main()
