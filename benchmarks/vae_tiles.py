"""Peak memory of Wan VAE decode as the frame grows, untiled against spatially tiled: untiled grows with the
frame's area, tiled stays flat (it follows the tile), whatever the number of tiles.

Usage: python benchmarks/vae_tiles.py [--family wan2.1|wan2.2] [--sizes 256x256,512x512,720x1280]
                                      [--latent-frames 2] [--tile 256]
Each decode runs in a fresh process (the family's real config, random weights: memory does not depend on the
values) and prints peak RSS above the model-loaded baseline and the decoded video's own size (which either
way must be held: the tiled result is fp32, like the frames the job returns). Few latent frames keep it short
on a CPU: the time streaming already makes memory flat in frames (benchmarks/vae_memory.py), so a frame's size
shows with 1 or 2 latent frames. The first chunk decodes 1 frame, later ones 4 and need more, tiled and untiled
alike (BENCHMARKS.md's table used --latent-frames 1 to fit a 2-core CPU).
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
root, family, height, width, frames, tile = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
sys.path.insert(0, root)
from spacetime_bootstrap import load_package
load_package()
from comfyui_spacetime.model_defs import vae_tiles, wan_vae
torch.set_num_threads(2)
torch.manual_seed(0)
config = wan_vae.VAE_PRESETS[family]
vae = wan_vae.WanVAE(config).eval()
sf = config.spatial_factor  # read from the config: 8 for Wan 2.1, 16 for Wan 2.2
if height % sf or width % sf:
    sys.exit(f"sizes must be multiples of {sf} for {family}, got {height}x{width}")
latent = torch.randn(1, config.z_dim, frames, height // sf, width // sf)
with torch.inference_mode():
    vae.decode(latent[:, :, :1, :4, :4])  # warm-up: allocator and kernels, so the baseline is fair
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    # tile 0 here means untiled whatever the size (auto would tile large frames): one tile as large as the frame
    video = vae_tiles.decode_tiled(vae, latent, tile or max(height, width))
    seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
unit = tile // sf
tiles = 1 if tile == 0 else len(vae_tiles.tile_spans(height // sf, unit, vae_tiles.default_overlap(tile, sf) // sf)) * len(
    vae_tiles.tile_spans(width // sf, unit, vae_tiles.default_overlap(tile, sf) // sf))
print(json.dumps({"tiles": tiles, "frames": video.shape[2], "peak_above_baseline_mb": (peak - base) / 1024,
                  "output_mb": video.numel() * video.element_size() / 2**20, "seconds": seconds}))
"""


def measure(family: str, height: int, width: int, frames: int, tile: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), family, str(height), str(width), str(frames), str(tile)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"decode of {width}x{height} with tile {tile} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("wan2.1", "wan2.2"), default="wan2.1")
    parser.add_argument("--sizes", default="256x256,512x512,720x1280", help="HxW pixel sizes, comma-separated")
    parser.add_argument("--latent-frames", type=int, default=2)
    parser.add_argument("--tile", type=int, default=256, help="tile size in pixels for the tiled runs (overlap: the default)")
    args = parser.parse_args()
    print(f"{args.family} VAE decode, {args.latent_frames} latent frames, CPU (2 threads), peak RSS above baseline")
    print("| frame (HxW) | mode | tiles | frames | peak MB | output MB | s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.lower().split("x"))
        for mode, tile in (("untiled", 0), (f"tiled {args.tile}", args.tile)):
            row = measure(args.family, height, width, args.latent_frames, tile)
            print(f"| {height}x{width} | {mode} | {row['tiles']} | {row['frames']} | {row['peak_above_baseline_mb']:.0f} | "
                  f"{row['output_mb']:.0f} | {row['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
