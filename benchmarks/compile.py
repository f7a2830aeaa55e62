"""torch.compile of the DiT's blocks (the loader's compile=on): compile time, step time eager against compiled,
and how far the compiled output is from the eager one, for the built-in model and a larger config.

Usage: python benchmarks/compile.py [--steps 5] [--threads 2]
One step is one DiT forward on a batch of 2 (a cfg step's positive and negative pass). Compile time: the first
compiled step's time less an eager step's. The built-in model runs at its workflow's size (64x64, 17 frames: a
5x8x8 latent); the larger config (dim 768, 12 blocks, random weights) at a 5x16x16 latent.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spacetime_bootstrap import load_package  # noqa: E402

load_package()
from comfyui_spacetime.kernels import REFERENCE  # noqa: E402
from comfyui_spacetime.model_defs.builtin import builtin_model  # noqa: E402
from comfyui_spacetime.model_defs.compiled import compile_blocks  # noqa: E402
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig  # noqa: E402

LARGER = WanDiTConfig(dim=768, ffn_dim=2048, freq_dim=256, text_dim=512, text_len=64, num_heads=6, num_layers=12)


def _timed(dit, inputs, steps: int) -> tuple[float, torch.Tensor]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = dit(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure(label: str, dit: WanDiT, latent: tuple[int, int, int], steps: int) -> str:
    config = dit.config
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, config.in_dim, *latent, generator=generator), torch.tensor([900.0, 900.0]),
              torch.randn(2, config.text_len, config.text_dim, generator=generator))
    torch._dynamo.reset()
    with torch.inference_mode():
        dit(*inputs)  # warm-up
        eager_step, expected = _timed(dit, inputs, steps)
        compile_blocks(dit, label)
        start = time.perf_counter()
        first = dit(*inputs)
        compile_seconds = time.perf_counter() - start - eager_step
        compiled_step, out = _timed(dit, inputs, steps)
    error = max((first - expected).abs().max().item(), (out - expected).abs().max().item())
    return (f"| {label} | {'x'.join(map(str, latent))} | {compile_seconds:.1f} | {eager_step:.3f} | {compiled_step:.3f} | "
            f"{eager_step / compiled_step:.2f} | {error:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind (their median is shown)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU ({args.threads} threads), inductor, fp32, reference kernels; step = one DiT forward on a batch of 2")
    print("| model | latent | compile (s) | eager step (s) | compiled step (s) | speed-up | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(measure("built-in (dim 192, 6 blocks)", builtin_model(REFERENCE).dit, (5, 8, 8), args.steps), flush=True)
    larger = WanDiT(LARGER, REFERENCE).eval().requires_grad_(False)
    larger.init_weights(torch.Generator().manual_seed(0), zero_head=False)
    print(measure("dim 768, 12 blocks", larger, (5, 16, 16), args.steps), flush=True)


if __name__ == "__main__":
    main()
