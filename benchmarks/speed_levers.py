"""The speed levers of issue 18 on the built-in model, in one run: the few-step workflow against the base workflow
(``benchmarks/fewstep.py``: sampling wall time side by side, adherence on the held-out prompts) and the step cache at
its recommended setting against no cache (``benchmarks/step_cache.py``: DiT evaluations counted by hooks, adherence
on the same prompts).

The last line is
``levers: fewstep_speedup=X fewstep_adherence_drop=Y cache_eval_ratio=Z cache_adherence_drop=W``
(speed-ups as ratios measured in this run; drops as the largest of colour, shape and motion).

Usage: python benchmarks/speed_levers.py [--prompts 48]     (run alone: it is timed; ~20 min on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _benchmark(name: str):
    """A sibling benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"spacetime_benchmark_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts (builtin_quality's) for each lever")
    args = parser.parse_args()
    if args.prompts < 1:
        sys.exit(f"--prompts={args.prompts} is not allowed: it must be >= 1")
    fewstep = _benchmark("fewstep").measure_fewstep(args.prompts)
    cache_ratio, cache_drop = _benchmark("step_cache").cache_lever(args.prompts)
    print(
        f"levers: fewstep_speedup={fewstep['fewstep_speedup']:.2f} fewstep_adherence_drop={fewstep['fewstep_adherence_drop']:.2f} "
        f"cache_eval_ratio={cache_ratio:.2f} cache_adherence_drop={cache_drop:.2f}"
    )


if __name__ == "__main__":
    main()
