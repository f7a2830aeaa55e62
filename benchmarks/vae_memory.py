"""Peak memory of Wan VAE decode as the video grows: it must be flat in the number of frames
(the causal cache streams one latent frame at a time), not linear.

Usage: python benchmarks/vae_memory.py [--family wan2.1|wan2.2] [--size 128] [--ks 1,2,4,8,16,32]
Each decode runs in a fresh process (the family's real config, random weights: memory does not depend
on the values); prints peak RSS above the model-loaded baseline, and the output video's own size.
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
root, k, size, family = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, root)
from spacetime_bootstrap import load_package
load_package()
from comfyui_spacetime.model_defs import wan_vae
torch.set_num_threads(2)
torch.manual_seed(0)
config = wan_vae.VAE_PRESETS[family]
vae = wan_vae.WanVAE(config).eval()
sf = config.spatial_factor  # read from the config: 8 for Wan 2.1, 16 for Wan 2.2
if size % sf:
    sys.exit(f"--size must be a multiple of {sf} for {family}, got {size}")
latent = torch.randn(1, config.z_dim, 1 + k, size // sf, size // sf)
with torch.inference_mode():
    vae.decode(latent[:, :, :1])  # warm-up: allocator and kernels, so the baseline is fair
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    video = vae.decode(latent)
    seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"k": k, "frames": video.shape[2], "peak_above_baseline_mb": (peak - base) / 1024,
                  "output_mb": video.numel() * video.element_size() / 2**20, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("wan2.1", "wan2.2"), default="wan2.1")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--ks", default="1,2,4,8,16,32")
    args = parser.parse_args()
    print(f"{args.family} VAE decode, {args.size}x{args.size}, CPU, peak RSS above baseline")
    print(f"{'k':>4} {'frames':>7} {'peak MB':>9} {'output MB':>10} {'s':>7}")
    for k in (int(v) for v in args.ks.split(",")):
        out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(k), str(args.size), args.family], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"decode with k={k} failed:\n{out.stderr}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row['k']:>4} {row['frames']:>7} {row['peak_above_baseline_mb']:>9.1f} {row['output_mb']:>10.1f} {row['seconds']:>7.2f}")


if __name__ == "__main__":
    main()
