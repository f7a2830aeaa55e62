"""Long-video drift on the built-in model: does a minute keep its look? The three modes of Spacetime Long Video
(pixel chain = the baseline, latent chain, context windows) with the same prompt and seed.

Usage: python benchmarks/long_video_drift.py [--seconds 60] [--steps 10] [--threads 2] [--seed 0] [--prompt TEXT]
                                            [--modes baseline,latent,windows] [--out DIR]
Each mode runs in a fresh process (peak RSS is per process) through the node; the video is cut into the chain's
chunks (17 frames, then 12 new ones each) for every mode. Per chunk:
- drift: distance of its mean colour and contrast from the first chunk's, sqrt(|d mean RGB|^2 + d contrast^2)
  (contrast: the frames' luminance standard deviation), in 0..1 pixel units; a mode's drift is its last chunk's;
- identity: whether the detector (training/detector.py) sees the first chunk's colour and shape, each read as the
  most frequent over the chunk's frames; a mode's identity is the share of chunks that do;
- seams: the mean absolute frame difference across each join against the mean of the within-chunk steps into a
  new latent frame (every join is one, and the causal VAE's steps there are larger than inside a latent frame:
  ``step ratio`` prints how much); a mode's seams is its largest ratio (1 = a join looks like any other step into
  a latent frame). ``seams/all`` compares with every within-chunk step instead.
Writes one contact sheet PNG per mode (the middle frame of every chunk, in a grid) to --out. The last line is
``drift: baseline=X latent=Y windows=Z identity=I seams=S``, identity the lowest and seams the largest over the
modes shipped for use (latent chain, context windows); the line before it gives the default mode's own
(the node's default). With ``--modes`` a subset runs (other seeds and prompts) and the last line is left out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = {"baseline": "pixel chain", "latent": "latent chain", "windows": "context windows"}
PROMPT = "a red circle drifts to the left over a grey background"
CHUNK, OVERLAP = 17, 5
TEMPORAL_FACTOR = 4  # the built-in VAE's: pixel frame 1 + 4k starts a latent frame

SHIPPED = ("latent", "windows")  # the modes offered for use (the baseline aside)

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
root, mode, frames, steps, threads, seed, out = sys.argv[1:8]
sys.path.insert(0, root)
from spacetime_bootstrap import load_package
load_package()
torch.set_num_threads(int(threads))
from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL, BUILTIN_TEXT_ENCODER, BUILTIN_VAE
from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeTextEncoderLoader, SpacetimeVAELoader
from comfyui_spacetime.nodes.long_video import SpacetimeLongVideo
from comfyui_spacetime.nodes.sampling import SpacetimeTextEncode
(model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "fp32", "auto")
(vae,) = SpacetimeVAELoader().load(BUILTIN_VAE, "fp32")
(encoder,) = SpacetimeTextEncoderLoader().load(BUILTIN_TEXT_ENCODER, "default")
(positive,) = SpacetimeTextEncode().encode(encoder, PROMPT)
(negative,) = SpacetimeTextEncode().encode(encoder, "")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
(video,) = SpacetimeLongVideo().generate(model, vae, positive, negative, 64, 64, int(frames), CHUNK, OVERLAP, int(seed),
                                         int(steps), 5.0, 5.0, "unipc", 1.0, mode)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
np.save(out, video.numpy())
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "above_baseline_mb": (peak - base) / 1024,
                  "output_mb": video.numel() * video.element_size() / 2**20}))
"""


def chunk_spans(frames: int) -> list[tuple[int, int]]:
    """The chain's chunks as frame spans of the output: 17 frames, then 12 new ones each."""
    spans, start, stop = [], 0, min(CHUNK, frames)
    while start < frames:
        spans.append((start, stop))
        start, stop = stop, min(stop + CHUNK - OVERLAP, frames)
    return spans


def look(video: np.ndarray) -> np.ndarray:
    """Mean RGB and contrast (luminance std per frame, averaged) of frames ``[T,H,W,3]``: ``[4]``."""
    luminance = video @ np.array([0.299, 0.587, 0.114])
    return np.concatenate([video.mean(axis=(0, 1, 2)), [luminance.std(axis=(1, 2)).mean()]])


def chunk_identity(frames: np.ndarray) -> tuple[str | None, str | None]:
    """The colour and the shape the detector reads most often over ``frames`` ``[T,H,W,3]`` (ties: the earlier)."""
    from comfyui_spacetime.training.detector import detect

    readings = [detect(frame[None]) for frame in frames]
    colours = Counter(reading.colour for reading in readings)
    shapes = Counter(reading.shape for reading in readings)
    return colours.most_common(1)[0][0], shapes.most_common(1)[0][0]


def measure(video: np.ndarray) -> dict:

    spans = chunk_spans(len(video))
    looks = [look(video[a:b]) for a, b in spans]
    drift = [float(np.linalg.norm(v - looks[0])) for v in looks]
    # each chunk's colour and shape: the detector's most frequent reading over the chunk's frames (one frame's shape
    # flips between classes as the outline's pixels move: on seed 0's windows the middle frame of the first chunk read
    # "circle" where 13 of its 17 frames read "star"); its motion over its frames and the one before (two ends)
    identities = [chunk_identity(video[a:b]) for a, b in spans]
    kept = [found == identities[0] for found in identities]
    steps = np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))  # [T-1]: step t is frame t -> t+1
    joins = [a - 1 for a, _ in spans[1:]]
    # Every join is a step into a new latent frame (frame 17, 29, ... = 1 + 4k), and the causal VAE's steps into a
    # new latent frame are larger than those inside one; a join is compared with the within-chunk steps of that kind.
    boundary = np.array([t for t in range(len(steps)) if t % TEMPORAL_FACTOR == 0 and t not in joins])
    inside = np.delete(steps, joins + list(boundary))
    seams = [float(steps[j] / steps[boundary].mean()) for j in joins] or [1.0]
    seams_all = [float(steps[j] / np.delete(steps, joins).mean()) for j in joins] or [1.0]
    return {"chunks": len(spans), "drift": drift[-1], "max_drift": max(drift), "identity": float(np.mean(kept)),
            "first": " ".join(map(str, identities[0])), "seams": max(seams), "seams_all": max(seams_all),
            "step_ratio": float(steps[boundary].mean() / inside.mean()), "drift_curve": drift}


def contact_sheet(video: np.ndarray, path: Path, columns: int = 10) -> None:
    from PIL import Image

    spans = chunk_spans(len(video))
    frames = [video[(a + b) // 2] for a, b in spans]
    rows = -(-len(frames) // columns)
    height, width = video.shape[1:3]
    sheet = np.ones((rows * (height + 2), min(columns, len(frames)) * (width + 2), 3), np.float32)
    for index, frame in enumerate(frames):
        row, col = divmod(index, columns)
        sheet[row * (height + 2): row * (height + 2) + height, col * (width + 2): col * (width + 2) + width] = frame
    Image.fromarray((sheet * 255).round().astype(np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length at 16 fps (60: 961 frames)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--modes", default=",".join(MODES), help="a comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--out", default="/tmp/spacetime_long_video_drift", help="where the contact sheets go")
    args = parser.parse_args()
    keys = args.modes.split(",")
    if not set(keys) <= set(MODES):
        parser.error(f"--modes {args.modes!r}: each must be one of {list(MODES)}")
    from spacetime_bootstrap import load_package

    load_package()  # for the detector and the node's default mode
    from comfyui_spacetime.jobs.long_video import MODES as NODE_MODES

    default = next(key for key, mode in MODES.items() if mode == NODE_MODES[0])
    frames = 1 + int(round(args.seconds * 16))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"Long-video drift, built-in model, 64x64, {frames} frames ({args.seconds:g} s at 16 fps), chunks of {CHUNK} "
          f"overlapping by {OVERLAP}, {args.steps} UniPC steps, seed {args.seed}, {args.threads} CPU threads; '{args.prompt}'")
    print(f"{'mode':>16} {'chunks':>6} {'drift':>7} {'max':>7} {'identity':>8} {'seams':>6} {'s/all':>6} {'steps':>6} {'seconds':>8} {'peak MB':>8} "
          f"{'above MB':>9} {'output MB':>9}  first chunk")
    results = {}
    for key in keys:
        mode = MODES[key]
        path = out / f"{key}.npy"
        child = subprocess.run([sys.executable, "-c", f"PROMPT, CHUNK, OVERLAP = {args.prompt!r}, {CHUNK}, {OVERLAP}\n" + CHILD,
                                str(ROOT), mode, str(frames), str(args.steps), str(args.threads), str(args.seed), str(path)],
                               capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"the {mode} run failed:\n{child.stderr}")
        run = json.loads(child.stdout.strip().splitlines()[-1])
        video = np.load(path)
        path.unlink()
        row = measure(video)
        contact_sheet(video, out / f"contact_{key}.png")
        results[key] = row
        print(f"{mode:>16} {row['chunks']:>6} {row['drift']:>7.4f} {row['max_drift']:>7.4f} {row['identity']:>8.2f} "
              f"{row['seams']:>6.2f} {row['seams_all']:>6.2f} {row['step_ratio']:>6.2f} {run['seconds']:>8.1f} {run['peak_mb']:>8.0f} {run['above_baseline_mb']:>9.1f} "
              f"{run['output_mb']:>9.1f}  {row['first']}", flush=True)
    print("drift per chunk, every 10th:")
    for key, row in results.items():
        print(f"  {key:>8}: " + " ".join(f"{d:.3f}" for d in row["drift_curve"][::10]))
    print(f"contact sheets: {out}/contact_{{{','.join(keys)}}}.png")
    if default in results:
        row = results[default]
        print(f"default ({MODES[default]}): drift={row['drift']:.4f} identity={row['identity']:.2f} seams={row['seams']:.2f}")
    if set(keys) != set(MODES):
        return
    print(f"drift: baseline={results['baseline']['drift']:.4f} latent={results['latent']['drift']:.4f} "
          f"windows={results['windows']['drift']:.4f} identity={min(results[k]['identity'] for k in SHIPPED):.2f} "
          f"seams={max(results[k]['seams'] for k in SHIPPED):.2f}")


if __name__ == "__main__":
    main()
