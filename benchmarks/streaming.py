"""Weight streaming: DiT weights on the compute device and step time, with all blocks resident, half of them,
and only the two streamed blocks in flight.

Usage: python benchmarks/streaming.py [--device cpu|cuda] [--steps 3] [--latent FxHxW] [--kernels reference|auto]
- cpu (default without a GPU): a mid-size random DiT (dim 768, 12 blocks, fp32), a latent of 3x16x16; prints the
  largest parameter bytes on the device seen inside any block (the same accounting as the tests:
  ``weight_streaming.device_bytes``, counted by a hook on every layer of every block) and the mean step time. On a
  CPU no bytes move (storage and device are one), so the time shows the mechanism's own overhead only.
- cuda: the Wan 14B config (wan2.1-t2v-14b shapes), its block Linear weights fp8 (e4m3fn) as ComfyUI's fp8 files,
  everything else bf16, random values; built on the meta device and each tensor materialized straight where it
  lives (blocks in CPU memory, the rest on the GPU); each budget's streamer copies its streamed blocks into pinned
  memory (``PinnedArena``), so host RAM holds the model about twice at most (~28 GB). Prints
  torch.cuda.max_memory_allocated over one DiT forward (after a warm-up forward) at the default 480x832x81
  latent (21x60x104), with the weight bytes the plan puts on the GPU and the step time.
One DiT forward is a step here (cfg 1: no negative pass).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spacetime_bootstrap import load_package  # noqa: E402

load_package()
from comfyui_spacetime.kernels import get_backend  # noqa: E402
from comfyui_spacetime.model_defs.fp8 import prepare_fp8  # noqa: E402
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS, WanDiT, WanDiTConfig  # noqa: E402
from comfyui_spacetime.model_defs.weight_streaming import (  # noqa: E402
    GIB, BlockStreamer, device_bytes, module_bytes, plan_for_blocks, plan_streaming,
)

CPU_CONFIG = WanDiTConfig(dim=768, ffn_dim=2048, freq_dim=256, text_dim=512, text_len=64, num_heads=6, num_layers=12)
FP8 = torch.float8_e4m3fn


def _budgets(num_blocks: int) -> list[tuple[str, int | None]]:
    """(label, resident blocks; None: no streaming) for all / half / two blocks on the device."""
    half = num_blocks // 2
    return [("all blocks resident", None), (f"{half} of {num_blocks} blocks on the device", half - 2),
            (f"2 of {num_blocks} blocks on the device (all streamed)", 0)]


def _peak_counter(dit: nn.Module, device: torch.device, streamer: BlockStreamer | None, seen: list) -> list:
    handles = []
    for block in dit.blocks:
        for layer in block.modules():
            if isinstance(getattr(layer, "weight", None), torch.Tensor) and layer.weight.ndim == 2:
                handles.append(layer.register_forward_pre_hook(lambda m, a: seen.append(device_bytes(dit, device, streamer))))
    return handles


def _inputs(config: WanDiTConfig, latent: tuple[int, int, int], device: torch.device, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.in_dim, *latent, generator=generator).to(device)
    context = torch.randn(1, config.text_len, config.text_dim, generator=generator).to(device, dtype)
    return x, torch.tensor([900.0], device=device), context


def run_cpu(args) -> None:
    torch.set_num_threads(2)
    config = CPU_CONFIG
    dit = WanDiT(config, get_backend(torch.device("cpu"), force_reference=True)).eval().requires_grad_(False)
    dit.init_weights(torch.Generator().manual_seed(0), zero_head=False)
    latent = tuple(int(v) for v in (args.latent or "3x16x16").split("x"))
    inputs = _inputs(config, latent, torch.device("cpu"), torch.float32)
    print(f"CPU (2 threads), dim {config.dim}, {config.num_layers} blocks, fp32 ({module_bytes(dit) / 2**20:.0f} MB of weights), "
          f"latent {'x'.join(map(str, latent))}, {args.steps} steps after a warm-up")
    print("| budget | streamed blocks | plan: weights on device (MB) | largest seen in a block (MB) | step (s) |")
    print("|---|---:|---:|---:|---:|")
    expected = None
    for label, resident in _budgets(config.num_layers):
        plan = None if resident is None else plan_for_blocks(dit, resident)
        streamer = None if plan is None else BlockStreamer(dit, plan, pin=False)
        seen, times = [], []
        with torch.inference_mode(), (streamer.streaming() if streamer else _nothing()):
            handles = _peak_counter(dit, torch.device("cpu"), streamer, seen)
            out = dit(*inputs)  # counted (and the warm-up); the timed steps run without the counting hooks
            for handle in handles:
                handle.remove()
            for _ in range(args.steps):
                start = time.perf_counter()
                dit(*inputs)
                times.append(time.perf_counter() - start)
        expected = out if expected is None else expected
        assert torch.equal(out, expected), "a streamed forward differs from the resident one"
        planned = module_bytes(dit) if plan is None else plan.device_bytes
        print(f"| {label} | {0 if plan is None else len(plan.streamed)} | {planned / 2**20:.1f} | {max(seen) / 2**20:.1f} | "
              f"{statistics.mean(times):.3f} |", flush=True)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _meta_fp8_dit(config: WanDiTConfig, backend) -> WanDiT:
    """The DiT on the meta device with every block Linear an fp8 ``FP8Linear`` (as an fp8 checkpoint loads)."""
    with torch.device("meta"):
        dit = WanDiT(config, backend)
    fp8_weights = {f"{name}.weight": torch.empty(module.weight.shape, dtype=FP8, device="meta")
                   for name, module in dit.named_modules() if name.startswith("blocks.") and isinstance(module, nn.Linear)}
    prepare_fp8(dit, fp8_weights)
    return dit


def _materialize(dit: WanDiT, device: torch.device) -> dict[int, list]:
    """Random values for every tensor: non-block ones bf16 on the GPU; block ones in CPU memory (fp8 Linear weights
    stay fp8, their scales fp32 1.0, the rest bf16). Returns each block's (table, name, CPU tensor)."""
    hosts: dict[int, list] = {}
    generator = torch.Generator(device).manual_seed(0)
    for name, module in dit.named_modules():
        for table in (module._parameters, module._buffers):
            for key, meta in list(table.items()):
                if meta is None:
                    continue
                dtype = FP8 if meta.dtype == FP8 else torch.bfloat16
                if key == "scale_weight":
                    value = torch.ones(meta.shape, dtype=torch.float32, device=device)
                else:
                    value = (torch.randn(meta.shape, generator=generator, device=device, dtype=torch.bfloat16) * 0.02).to(dtype)
                if name.startswith("blocks."):  # CPU memory; each budget's streamer pins its streamed blocks (PinnedArena)
                    value = value.cpu()
                    hosts.setdefault(int(name.split(".")[1]), []).append((table, key, value))
                table[key] = nn.Parameter(value, requires_grad=False) if isinstance(meta, nn.Parameter) else value
    torch.cuda.synchronize(device)
    return hosts


def _cuda_runs(placements, latent: tuple[int, int, int], steps: int, kernels: str = "reference"):
    """The 14B config (block Linears fp8, random weights) on the GPU under each ``(label, plan_of(dit))`` of
    ``placements`` (a plan, or None for all resident): yields ``(label, streamed blocks, planned bytes, peak
    allocated bytes, mean step seconds)``, after a header line describing the model."""
    device = torch.device("cuda")
    config = DIT_PRESETS["wan2.1-t2v-14b"]
    backend = get_backend(device, force_reference=kernels == "reference")
    dit = _meta_fp8_dit(config, backend).eval()
    start = time.perf_counter()
    hosts = _materialize(dit, device)
    inputs = _inputs(config, latent, device, torch.bfloat16)
    print(f"{torch.cuda.get_device_name(device)}, Wan 14B config, block Linears fp8 ({module_bytes(dit) / GIB:.2f} GB of weights; "
          f"built in {time.perf_counter() - start:.0f} s), latent {'x'.join(map(str, latent))} "
          f"({latent[0] * latent[1] * latent[2] // 4} tokens), kernels {backend.name}, {steps} steps after a warm-up", flush=True)
    for label, plan_of in placements:
        plan = plan_of(dit)
        streamed = set() if plan is None else set(plan.streamed)
        for index, entries in hosts.items():  # this budget's placement, from the one CPU copy
            for table, key, host in entries:
                value = host if index in streamed else host.to(device)
                table[key] = nn.Parameter(value, requires_grad=False) if isinstance(table[key], nn.Parameter) else value
        streamer = None if plan is None else BlockStreamer(dit, plan, pin=True)
        torch.cuda.empty_cache()
        times = []
        with torch.inference_mode(), (streamer.streaming() if streamer else _nothing()):
            dit(*inputs)  # warm-up
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                start = time.perf_counter()
                dit(*inputs)
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated(device)
        planned = module_bytes(dit) if plan is None else plan.device_bytes
        yield label, len(streamed), planned, peak, statistics.mean(times)
        for entries in hosts.values():  # back to the CPU copy: the GPU copies (and the streamer's pinned ones) are freed
            for table, key, host in entries:
                table[key] = nn.Parameter(host, requires_grad=False) if isinstance(table[key], nn.Parameter) else host
        del streamer


def run_cuda(args) -> None:
    latent = tuple(int(v) for v in (args.latent or "21x60x104").split("x"))
    placements = [(label, (lambda dit, r=resident: None if r is None else plan_for_blocks(dit, r)))
                  for label, resident in _budgets(DIT_PRESETS["wan2.1-t2v-14b"].num_layers)]
    header = False
    for label, streamed, planned, peak, step in _cuda_runs(placements, latent, args.steps, args.kernels):
        if not header:
            print("| budget | streamed blocks | plan: weights on GPU (GB) | peak allocated (GB) | step (s) |")
            print("|---|---:|---:|---:|---:|")
            header = True
        print(f"| {label} | {streamed} | {planned / GIB:.2f} | {peak / GIB:.2f} | {step:.2f} |", flush=True)


def streaming_peak_vram(budgets_gb: list[float], latent: tuple[int, int, int] = (5, 30, 52), steps: int = 1) -> dict[float, int]:
    """For benchmarks/gpu_check.py: peak allocated bytes of one 14B-config step (a small latent, so three budgets
    fit its time limit) with ``gpu_budget_gb`` set to each of ``budgets_gb``, planned by the loader's own rule."""
    device = torch.device("cuda")
    placements = [(budget, (lambda dit, b=budget: plan_streaming(dit, b, device))) for budget in budgets_gb]
    return {label: peak for label, _, _, peak, _ in _cuda_runs(placements, latent, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: cpu 3, cuda 2)")
    parser.add_argument("--latent", default=None, help="latent frames x height x width (cpu: 3x16x16; cuda: 21x60x104)")
    parser.add_argument("--kernels", choices=("reference", "auto"), default="reference", help="cuda: the attention kernels")
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.device == "cuda" else 3)
    (run_cuda if args.device == "cuda" else run_cpu)(args)


if __name__ == "__main__":
    main()
