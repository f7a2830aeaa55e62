"""Step caching on the built-in model: for each cache setting, how many DiT evaluations the sampler computes,
its wall time, and prompt adherence on ``builtin_quality``'s held-out prompts (same prompts, seeds and settings:
64x64x17, 20 steps, cfg 5, shift 5, unipc), against the same run without a cache (threshold 0, measured first).

``measure_cache(prompts, thresholds, log)`` -> one dict per threshold: method, threshold, computed and total DiT
evaluations per video (counted by forward hooks: the head runs every evaluation, the last block only computed
ones), eval_ratio (total / computed), sampling wall seconds (all prompts), colour/shape/motion adherence and
adherence_drop (the largest drop of the three against threshold 0). A threshold is a number (``method``'s) or a
``(method, threshold)`` pair. ``cache_lever(prompts)`` -> ``(cache_eval_ratio, cache_adherence_drop)`` at the
recommended setting ``CHOSEN`` (for ``benchmarks/speed_levers.py``).

Usage: python benchmarks/step_cache.py [--prompts 48] [--method teacache] [--thresholds 0.15 0.25 teacache:0.3 fbcache:0.1] [--start 0.1] [--end 0.95]
(run under the CPU lock: ``flock /work/cpu.lock python benchmarks/step_cache.py``)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spacetime_bootstrap import load_package  # noqa: E402

ATTRIBUTES = ("colour", "shape", "motion")


def measure_cache(prompts: int, thresholds, log=print, method: str = "teacache", start: float | None = None,
                  end: float | None = None, steps: int = 20, cfg: float = 5.0, shift: float = 5.0, seed: int = 0) -> list[dict]:
    load_package()
    from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL, BUILTIN_TEXT_ENCODER, BUILTIN_VAE
    from comfyui_spacetime.model_defs.step_cache import StepCacheSettings
    from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeTextEncoderLoader, SpacetimeVAELoader
    from comfyui_spacetime.nodes.sampling import SpacetimeEmptyLatentVideo, SpacetimeSampler, SpacetimeTextEncode
    from comfyui_spacetime.nodes.step_cache import SpacetimeStepCache
    from comfyui_spacetime.nodes.vae import SpacetimeVAEDecode
    from comfyui_spacetime.training.detector import detect
    from comfyui_spacetime.training.procedural import sample_spec

    (model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "fp32", "auto")
    (vae,) = SpacetimeVAELoader().load(BUILTIN_VAE, "fp32")
    (encoder,) = SpacetimeTextEncoderLoader().load(BUILTIN_TEXT_ENCODER, "default")
    (negative,) = SpacetimeTextEncode().encode(encoder, "")
    defaults = StepCacheSettings()
    settings = [(method, 0.0)] + [t if isinstance(t, tuple) else (method, float(t)) for t in thresholds]
    variants = [
        SpacetimeStepCache().apply(model, m, t, defaults.start if start is None else start, defaults.end if end is None else end)[0]
        for m, t in settings
    ]
    counts = {"total": 0, "computed": 0}
    hooks = [model.dit.head.register_forward_hook(lambda *a: counts.__setitem__("total", counts["total"] + 1)),
             model.dit.blocks[-1].register_forward_hook(lambda *a: counts.__setitem__("computed", counts["computed"] + 1))]
    rows = [{"method": m, "threshold": t, "total": 0, "computed": 0, "wall_s": 0.0} | dict.fromkeys(ATTRIBUTES, 0)
            for m, t in settings]
    (warm,) = SpacetimeTextEncode().encode(encoder, "a red circle")
    SpacetimeSampler().sample(model, warm, negative, SpacetimeEmptyLatentVideo().generate(vae, 64, 64, 17, 1)[0], 0, 2, cfg,
                              shift, "unipc", 1.0)  # untimed warm-up: the first run's one-time costs are nobody's
    try:
        for i in range(prompts):
            spec = sample_spec(10_000 + i, held_out=True)
            (positive,) = SpacetimeTextEncode().encode(encoder, spec.caption)
            (latent,) = SpacetimeEmptyLatentVideo().generate(vae, 64, 64, 17, 1)
            found_by = []
            for row, variant in zip(rows, variants):
                counts.update(total=0, computed=0)
                began = time.perf_counter()
                (samples,) = SpacetimeSampler().sample(variant, positive, negative, latent, seed + i, steps, cfg, shift, "unipc", 1.0)
                row["wall_s"] += time.perf_counter() - began
                row["total"] += counts["total"]
                row["computed"] += counts["computed"]
                found = detect(SpacetimeVAEDecode().decode(vae, samples)[0].numpy())
                for key in ATTRIBUTES:
                    row[key] += getattr(found, key) == getattr(spec, key)
                found_by.append(f"{row['method']} {row['threshold']:g}: {found.colour}/{found.shape}/{found.motion}")
            log(f"{i + 1}/{prompts} {spec.caption!r}: " + "; ".join(found_by))
    finally:
        for hook in hooks:
            hook.remove()
    for row in rows:
        row["computed_per_video"] = row.pop("computed") / prompts
        row["total_per_video"] = row.pop("total") / prompts
        row["eval_ratio"] = row["total_per_video"] / row["computed_per_video"]
        for key in ATTRIBUTES:
            row[key] /= prompts
        row["adherence_drop"] = max(rows[0][key] - row[key] for key in ATTRIBUTES)
        row["prompts"] = prompts
    base = rows[0]
    for row in rows:
        row["speedup"] = base["wall_s"] / row["wall_s"]
    return rows


# The setting the README recommends for the built-in model, chosen from the tables in BENCHMARKS.md (48 prompts:
# 9 of 20 evaluations, eval ratio 2.22, adherence drop 0.021).
CHOSEN = {"method": "teacache", "threshold": 0.25, "start": 0.1, "end": 1.0}


def cache_lever(prompts: int = 48, log=print) -> tuple[float, float]:
    """``(cache_eval_ratio, cache_adherence_drop)`` at ``CHOSEN``: uncached over cached DiT evaluations, and the
    largest adherence drop of colour/shape/motion, measured against the uncached run on the same prompts."""
    rows = measure_cache(prompts, [(CHOSEN["method"], CHOSEN["threshold"])], log, CHOSEN["method"], CHOSEN["start"], CHOSEN["end"])
    return rows[1]["eval_ratio"], rows[1]["adherence_drop"]


def format_table(rows: list[dict]) -> str:
    lines = ["| method | threshold | DiT evaluations per video (computed / total) | eval ratio | sampling wall (s, all prompts) "
             "| speed-up | colour | shape | motion | adherence drop |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method'] if r['threshold'] else 'none'} | {r['threshold']:g} | {r['computed_per_video']:.2f} / "
            f"{r['total_per_video']:.0f} | {r['eval_ratio']:.2f}x | {r['wall_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['colour']:.2f} | {r['shape']:.2f} | {r['motion']:.2f} | {r['adherence_drop']:+.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Step caching on the built-in model: evaluations, wall time, adherence.")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--method", default="teacache")
    parser.add_argument("--thresholds", nargs="+", default=["0.15", "0.25", "0.3"],
                        help="numbers (--method's), or method:threshold, e.g. teacache:0.25 fbcache:0.1")
    parser.add_argument("--start", type=float, default=None, help="default: the node's")
    parser.add_argument("--end", type=float, default=None, help="default: the node's")
    args = parser.parse_args()
    thresholds = [(t.split(":")[0], float(t.split(":")[1])) if ":" in t else float(t) for t in args.thresholds]
    rows = measure_cache(args.prompts, thresholds, method=args.method, start=args.start, end=args.end)
    print(format_table(rows))


if __name__ == "__main__":
    main()
