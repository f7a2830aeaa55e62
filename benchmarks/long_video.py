"""Long video on the built-in model: wall time and peak memory of the Spacetime Long Video node as the
video grows. Memory must stay that of one chunk plus the output frames (the IMAGE buffer every
ComfyUI video node needs), not grow with the number of chunks.

Usage: python benchmarks/long_video.py [--frames 161,961] [--steps 20] [--threads 2] [--mode "latent chain"]
Each length runs in a fresh process (peak RSS is per process) through the node itself; 961 frames is
one minute at 16 fps. Prints one row per length: chunks, seconds, peak RSS, RSS above the
model-loaded baseline and the output buffer's size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
root, frames, steps, threads, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, root)
from spacetime_bootstrap import load_package
load_package()
torch.set_num_threads(threads)
from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL, BUILTIN_TEXT_ENCODER, BUILTIN_VAE
from comfyui_spacetime.jobs.long_video import plan_long_video
from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeTextEncoderLoader, SpacetimeVAELoader
from comfyui_spacetime.nodes.long_video import SpacetimeLongVideo
from comfyui_spacetime.nodes.sampling import SpacetimeTextEncode
(model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "fp32", "auto")
(vae,) = SpacetimeVAELoader().load(BUILTIN_VAE, "fp32")
(encoder,) = SpacetimeTextEncoderLoader().load(BUILTIN_TEXT_ENCODER, "default")
(positive,) = SpacetimeTextEncode().encode(encoder, "a red circle drifts to the left over a grey background")
(negative,) = SpacetimeTextEncode().encode(encoder, "")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
(video,) = SpacetimeLongVideo().generate(model, vae, positive, negative, 64, 64, frames, 17, 5, 0, steps, 5.0, 5.0, "unipc", 1.0, mode)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"frames": video.shape[0], "chunks": plan_long_video(vae.video_rules, 64, 64, frames, 17, 5).chunks, "seconds": seconds,
                  "peak_mb": peak / 1024, "above_baseline_mb": (peak - base) / 1024,
                  "output_mb": video.numel() * video.element_size() / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="161,961")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="latent chain", help="latent chain, context windows or pixel chain")
    args = parser.parse_args()
    print(f"Spacetime Long Video ({args.mode}), built-in model, 64x64, chunks of 17 frames overlapping by 5, {args.steps} UniPC steps, "
          f"{args.threads} CPU threads")
    print(f"{'frames':>7} {'chunks':>7} {'seconds':>8} {'peak RSS MB':>12} {'above base MB':>14} {'output MB':>10}")
    for frames in (int(v) for v in args.frames.split(",")):
        out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(frames), str(args.steps), str(args.threads), args.mode],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the long video of {frames} frames failed:\n{out.stderr}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row['frames']:>7} {row['chunks']:>7} {row['seconds']:>8.1f} {row['peak_mb']:>12.0f} "
              f"{row['above_baseline_mb']:>14.1f} {row['output_mb']:>10.1f}")


if __name__ == "__main__":
    main()
