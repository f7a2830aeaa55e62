"""One GPU check in one go (issue 19, item 7): everything that needs a CUDA GPU, as ONE markdown table for
BENCHMARKS.md, in under 8 minutes on one H100/H200 (``--quick``: about 3).

Usage: python benchmarks/gpu_check.py [--quick]
Parts, each run in its own subprocess under its own time limit, so a failure, a hang or a CUDA crash in
one costs that part's rows only ("failed: ..." / "timed out after N s"), never the table:
1. kernel tests on CUDA: pytest on tests/test_kernels_*.py with ``SPACETIME_KERNEL_TEST_DEVICE=cuda``
   (tensors made on the GPU, Triton compiled, not interpreted; see tests/conftest.py): pass/fail counts
   and the failing tests' names.
2. ``benchmarks/kernels.py``: ours vs the best baseline per op and shape (full sizes; ``--quick``: / 8).
3. a Wan 2.1 1.3B-config DiT step (random weights, bf16) at 480p x 81 frames (32,760 tokens; ``--quick``:
   21 frames) with each attention backend that runs here (sdpa, triton, flash_attn, sage_attention):
   seconds per step and max |out - sdpa's out|.
4. peak VRAM of the 14B config at three weight-streaming budgets, when ``benchmarks/streaming.py`` has a
   ``streaming_peak_vram(budgets)``; "not available" otherwise.
Without CUDA it exits at once with one line. Needs only torch and triton (no installs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "benchmarks/gpu_check.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); nothing was run."
# seconds per part (full, quick): together under 8 minutes with start-up
LIMITS = {"tests": (120, 60), "kernels": (150, 60), "dit": (135, 75), "streaming": (75, 60)}
STREAMING_BUDGETS_GB = (0.0, 8.0, 4.0)  # 0: all resident (the 14B fp8 blocks are ~14 GB)
RESULT_TAG = "GPU_CHECK_RESULT "


def emit(rows: list[list[str]]) -> None:
    """A part's rows ([case, result, detail] each), as the last line of its stdout."""
    print(RESULT_TAG + json.dumps(rows), flush=True)


def part_tests(quick: bool) -> None:
    env = {**os.environ, "SPACETIME_KERNEL_TEST_DEVICE": "cuda", "TRITON_INTERPRET": "0"}
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_kernels_*.py"))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *files],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMITS["tests"][quick] - 5,
    )  # fmt: skip
    out = run.stdout + run.stderr
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", out.splitlines()[-1] if out else "")}
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no summary (see log)"
    emit([["kernel tests on CUDA (tests/test_kernels_*.py)", summary, "; ".join(failed)[:600] or "-"]])


def part_kernels(quick: bool) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("spacetime_kernels_benchmark", ROOT / "benchmarks" / "kernels.py")
    bench_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_kernels)

    rows = []
    real_add = bench_kernels.Bench.add

    def add_and_emit(self, *args, **kwargs):  # each row out as soon as measured: a time-out keeps them
        real_add(self, *args, **kwargs)
        op, shape, ours_ms, base, base_ms, ratio, rate, unit, pct, diff = self.rows[-1]
        rows.append([f"{op} {shape}", f"ours {ours_ms:.3f} ms vs {base} {base_ms:.3f} ms: x{ratio:.2f}",
                     f"{rate:.1f} {unit} ({pct:.0f}% of ceiling); max abs diff {diff:.3g}"])  # fmt: skip
        emit(rows)

    bench_kernels.Bench.add = add_and_emit
    _, matmul_tflops, copy_gbs = bench_kernels.run({"attention", "packed", "adaln"}, small=quick, rep=50 if quick else 100)
    emit([["ceilings", f"bf16 matmul {matmul_tflops:.0f} TFLOP/s; copy {copy_gbs:.0f} GB/s", "measured in this run"], *rows])


def part_dit(quick: bool) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from spacetime_bootstrap import load_package

    load_package()
    from comfyui_spacetime.kernels import dispatch
    from comfyui_spacetime.kernels.attention_external import unavailable
    from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS, WanDiT

    device = torch.device("cuda", torch.cuda.current_device())
    config = DIT_PRESETS["wan2.1-t2v-1.3b"]
    frames = 21 if quick else 81
    latent_frames, height, width = 1 + (frames - 1) // 4, 480 // 8, 832 // 8
    tokens = latent_frames * (height // 2) * (width // 2)
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, config.in_dim, latent_frames, height, width, generator=gen, device=device)
    context = torch.randn(1, config.text_len, config.text_dim, generator=gen, device=device)
    timestep = torch.tensor([500.0], device=device)
    with torch.device(device):
        base = WanDiT(config, dispatch.REFERENCE)
    base.init_weights(torch.Generator(device=device).manual_seed(1), zero_head=False)
    base = base.to(torch.bfloat16).eval()
    weights = base.state_dict()
    label = f"Wan-1.3B DiT step, 480p x {frames} frames ({tokens} tokens), bf16"
    rows, reference = [], None
    for choice in ("sdpa", "triton", "flash_attn", "sage_attention"):
        if choice in dispatch.EXTERNAL and (reason := unavailable(choice)):
            rows.append([f"{label}: {choice}", "not installed", reason[:120]])
            continue
        backend = dispatch.get_backend(device, choice=choice)
        if backend.name != choice:
            rows.append([f"{label}: {choice}", "fell back to sdpa", "self-check failed (see log)"])
            continue
        try:
            if choice == "sdpa":
                model = base
            else:
                with torch.device("meta"):
                    model = WanDiT(config, backend)
                model.load_state_dict(weights, assign=True)  # the same weight tensors, this backend's kernels
                model.eval()
            with torch.no_grad():
                out = model(latents, timestep, context)  # warm-up: compilation, autotuning
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model(latents, timestep, context)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            if reference is None:
                reference = out
            error = (out - reference).abs().max().item()
            scale = reference.abs().max().item()
            rows.append([f"{label}: {choice}", f"{seconds:.2f} s/step",
                         f"max abs err vs sdpa {error:.3g} (output max {scale:.3g}); peak VRAM "
                         f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"])  # fmt: skip
        except Exception as error:  # noqa: BLE001 - one backend failing must not cost the others' rows
            rows.append([f"{label}: {choice}", "failed", f"{type(error).__name__}: {error}".splitlines()[0][:200]])
        emit(rows)  # each backend's row as soon as it exists: a time-out keeps the rows so far


def part_streaming(quick: bool) -> None:
    import importlib.util

    path = ROOT / "benchmarks" / "streaming.py"
    try:
        if not path.is_file():
            raise ImportError(f"{path.name} not found")
        spec = importlib.util.spec_from_file_location("spacetime_streaming_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        measure = module.streaming_peak_vram
    except (ImportError, AttributeError) as error:
        emit([["14B peak VRAM at streaming budgets", "not available", f"benchmarks/streaming.py: {error}"[:200]]])
        return
    result = measure(list(STREAMING_BUDGETS_GB))
    items = result.items() if isinstance(result, dict) else zip(STREAMING_BUDGETS_GB, result)
    rows = []
    for budget, peak in items:
        peak_text = f"{peak / 2**30:.2f} GiB" if isinstance(peak, (int, float)) and peak > 1024 else str(peak)
        rows.append([f"14B config, streaming budget {budget} GB", f"peak VRAM {peak_text}", "benchmarks/streaming.py"])
    emit(rows)


PARTS = {"tests": part_tests, "kernels": part_kernels, "dit": part_dit, "streaming": part_streaming}


def run_part(name: str, quick: bool) -> list[list[str]]:
    """Run one part in a subprocess under its time limit; its rows, or one row saying what went wrong."""
    limit = LIMITS[name][quick]
    args = [sys.executable, str(Path(__file__).resolve()), "--part", name] + (["--quick"] if quick else [])
    start = time.perf_counter()
    try:
        run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        stdout, stderr, status = run.stdout, run.stderr, f"exit code {run.returncode}"
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        status = f"timed out after {limit} s"
    sys.stderr.write(f"--- part {name}: {status}, {time.perf_counter() - start:.0f} s ---\n{stderr[-3000:]}\n")
    results = [line[len(RESULT_TAG):] for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
    rows = json.loads(results[-1]) if results else []
    if not results or status.startswith("timed out"):
        last = (stderr.strip().splitlines() or ["no output"])[-1][:200]
        rows.append([f"{name}", "timed out" if status.startswith("timed out") else "failed", f"{status}: {last}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter sequences and time limits (about 3 minutes)")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # internal: run one part
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit(NO_CUDA)
    if args.part:
        PARTS[args.part](args.quick)
        return
    started = time.perf_counter()
    rows = []
    for name in PARTS:
        rows += [[name, *row] for row in run_part(name, args.quick)]
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "not importable"
    print(f"\nDevice: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton_version}; "
          f"{datetime.date.today()}; {'--quick; ' if args.quick else ''}{time.perf_counter() - started:.0f} s in all\n")  # fmt: skip
    print("| part | case | result | detail |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(cell).replace("|", "/").replace("\n", " ") for cell in row) + " |")


if __name__ == "__main__":
    main()
