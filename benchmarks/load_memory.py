"""Peak system RAM of loading a DiT file, against the file's size: loading must never hold two copies.

Usage: python benchmarks/load_memory.py [--preset wan2.1-t2v-14b] [--storage fp8] [--dir DIR]
Writes a synthetic file of the preset's real keys and shapes (random bytes; memory does not depend on the
values) in ComfyUI's layout: Linear weights in fp8 (``--storage fp8``, like ``*_fp8_e4m3fn.safetensors``) or
everything in fp16; then, each in a fresh process, loads it through our loader (``load_model``, bf16 compute)
and, side by side, reads it as the loader did before (safetensors' memory-mapped ``safe_open``, each tensor
cast as it is read; the baseline, which builds no model); prints peak RSS above the process's baseline, the RSS left after dropping the model, and the
ratios to the file size. Needs free disk and RAM of about the file's size (14B fp8: ~14 GB).
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, json, resource, sys
import torch
root, path, how = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, root)
from spacetime_bootstrap import load_package
load_package()
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.checkpoint import load_model

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

base = rss_mb()
if how == "ours":
    model = load_model(path, torch.bfloat16, REFERENCE)
else:  # the reader before: safetensors' memory map, each tensor cast to the compute dtype as it is read
    from safetensors import safe_open
    from comfyui_spacetime.model_defs.fp8 import FP8_DTYPES
    model = {}
    with safe_open(path, framework="pt", device="cpu") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            model[key] = tensor.to(torch.bfloat16) if tensor.is_floating_point() and tensor.dtype not in FP8_DTYPES else tensor
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
del model
gc.collect()
print(json.dumps({"how": how, "peak_mb": peak - base, "after_mb": rss_mb() - base}))
"""

DTYPE_NAMES = {"fp8": "F8_E4M3", "fp16": "F16", "fp32": "F32"}


def write_synthetic(path: Path, preset: str, storage: str) -> int:
    """A ComfyUI-layout file of ``preset``'s keys and shapes, random bytes, written tensor by tensor."""
    sys.path.insert(0, str(ROOT))
    from spacetime_bootstrap import load_package

    load_package()
    import torch

    from comfyui_spacetime.kernels import REFERENCE
    from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS, WanDiT

    with torch.device("meta"):
        state = WanDiT(DIT_PRESETS[preset], REFERENCE).state_dict()
    header, offset, entries = {}, 0, []
    for key, tensor in state.items():
        fp8 = storage == "fp8" and key.endswith(".weight") and tensor.ndim == 2  # the Linear weights
        dtype = "F8_E4M3" if fp8 else DTYPE_NAMES["fp16" if storage == "fp8" else storage]
        size = tensor.numel() * (1 if dtype == "F8_E4M3" else 2 if dtype == "F16" else 4)
        header["model.diffusion_model." + key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        entries.append(size)
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for size in entries:
            while size:
                chunk = min(size, 64 * 2**20)
                handle.write(torch.randint(0, 120, (chunk,), dtype=torch.uint8, generator=generator).numpy().tobytes())
                size -= chunk
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="wan2.1-t2v-14b")
    parser.add_argument("--storage", default="fp8", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--dir", default=None, help="where to write the synthetic file (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / f"{args.preset}_{args.storage}.safetensors"
        size_mb = write_synthetic(path, args.preset, args.storage) / 2**20
        print(f"{path.name}: {size_mb:.0f} MB")
        print("| reader | peak RSS above baseline (MB) | peak / file | RSS after unload (MB) |")
        print("|---|---:|---:|---:|")
        results = {}
        for how in ("ours", "safe_open"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(path), how], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[how] = result
            print(f"| {how} | {result['peak_mb']:.0f} | {result['peak_mb'] / size_mb:.2f} | {result['after_mb']:.0f} |")
        print(f"load_memory: file_mb={size_mb:.0f} peak_ratio={results['ours']['peak_mb'] / size_mb:.2f} "
              f"baseline_ratio={results['safe_open']['peak_mb'] / size_mb:.2f} after_unload_mb={results['ours']['after_mb']:.0f}")


if __name__ == "__main__":
    main()
