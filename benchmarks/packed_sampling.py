"""Packed vs sequential sampling of several prompts of different sizes on the built-in model (CPU).

Usage: python benchmarks/packed_sampling.py [--steps 20] [--repeats 3] [--threads 2]
    [--videos "64x64x17,96x64x9,64x96x13"] [--scheduler unipc] [--cfg 5.0]
Sequential: ``jobs.text_to_video.generate`` once per prompt (each a batch of 2 for CFG). Packed:
``jobs.packed.generate_packed``, every prompt's positive and negative pass in one packed sequence per
step. Prints the best wall time of each over the repeats, their ratio, and the largest difference
between the two results (they must agree to float rounding).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spacetime_bootstrap import load_package  # noqa: E402

load_package()
from comfyui_spacetime.kernels import REFERENCE  # noqa: E402
from comfyui_spacetime.model_defs.builtin import builtin_model, builtin_text_encoder, builtin_vae  # noqa: E402
from comfyui_spacetime.model_defs.bundles import SpacetimeConditioning  # noqa: E402
from comfyui_spacetime.jobs.packed import PackedItem, generate_packed, item_tokens  # noqa: E402
from comfyui_spacetime.jobs.text_to_video import empty_latent, generate  # noqa: E402
from comfyui_spacetime.model_defs.flow_matching import SolverSettings  # noqa: E402

PROMPTS = (
    "a red circle drifts to the left on a grey background",
    "a blue square rises on a black background",
    "a yellow star grows on a white background",
    "a green triangle falls on a white background",
)


def _best_time(job, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = job()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default="64x64x17,96x64x9,64x96x13", help="width x height x frames, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scheduler", default="unipc")
    parser.add_argument("--cfg", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model, vae, text_encoder = builtin_model(REFERENCE), builtin_vae(), builtin_text_encoder()

    def encode(text: str) -> SpacetimeConditioning:
        return SpacetimeConditioning(text_encoder.encoder.encode([text], text_encoder.text_len), text_encoder.name)

    negative = encode("")
    sizes = [tuple(int(n) for n in spec.split("x")) for spec in args.videos.split(",")]
    items = [
        PackedItem(encode(PROMPTS[i % len(PROMPTS)]), negative, tuple(empty_latent(vae, w, h, f, 1).shape), 42 + i, f"video {i} ({w}x{h}x{f})")
        for i, (w, h, f) in enumerate(sizes)
    ]

    def sequential():
        return [
            generate(model, item.positive, item.negative, torch.zeros(item.latent_shape), item.seed, SolverSettings(args.steps, args.cfg, 5.0, args.scheduler, 1.0), device)
            for item in items
        ]

    def packed():
        return generate_packed(model, items, SolverSettings(args.steps, args.cfg, 5.0, args.scheduler), device, max_tokens=1 << 24)

    sequential()  # warm-up: allocator, RoPE table cache
    seq_s, seq_out = _best_time(sequential, args.repeats)
    pack_s, pack_out = _best_time(packed, args.repeats)
    diff = max(float((a - b).abs().max()) for a, b in zip(seq_out, pack_out))
    tokens = [item_tokens(model, item, guided=False) for item in items]
    print(f"built-in model, {len(items)} videos {args.videos} ({tokens} tokens each, x2 for cfg), {args.steps} {args.scheduler} steps, "
          f"cfg {args.cfg}, {args.threads} CPU threads, best of {args.repeats}")
    print(f"sequential (generate per prompt): {seq_s:7.3f} s")
    print(f"packed (one sequence per step):   {pack_s:7.3f} s")
    print(f"packed / sequential: {pack_s / seq_s:.3f}   (speed-up {seq_s / pack_s:.2f}x); max |packed - sequential| = {diff:.2e}")


if __name__ == "__main__":
    main()
