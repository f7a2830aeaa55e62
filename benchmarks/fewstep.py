"""Few-step sampling on the built-in model, side by side with the base workflow: for each held-out prompt (those
of ``builtin_quality.py``, same seeds) the base workflow's sampler (``workflows/spacetime_t2v_builtin.json``: 20
UniPC steps, cfg 5) and the few-step workflow's (``workflows/spacetime_t2v_fewstep_builtin.json``: its LoRA, 4
euler_distill steps, cfg 1) run one after the other through the same nodes; only the sampler calls are timed.
Settings are read from the two workflow files, so the numbers are those of the shipped workflows.

    fewstep_speedup = base sampling wall time / few-step sampling wall time (sums over the prompts)
    fewstep_adherence_drop = max over colour, shape, motion of (base - few-step) adherence

Usage: python benchmarks/fewstep.py [--prompts 48]     (prints a table; the last line holds both numbers)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spacetime_bootstrap import load_package  # noqa: E402

BASE_WORKFLOW = ROOT / "workflows" / "spacetime_t2v_builtin.json"
FEWSTEP_WORKFLOW = ROOT / "workflows" / "spacetime_t2v_fewstep_builtin.json"
ATTRIBUTES = ("colour", "shape", "motion")


def workflow_sampling(path: Path) -> tuple[dict, tuple | None]:
    """The sampler settings (steps, cfg, shift, scheduler, denoise) of a workflow file, and its LoRA node's
    (lora_name, strength, mode) or None."""
    nodes = {node["type"]: node["widgets_values"] for node in json.loads(path.read_text())["nodes"]}
    _seed, _control, steps, cfg, shift, scheduler, denoise = nodes["SpacetimeSampler"]
    lora = nodes.get("SpacetimeLoadLoRA")
    return {"steps": steps, "cfg": cfg, "shift": shift, "scheduler": scheduler, "denoise": denoise}, (tuple(lora) if lora else None)


def measure_fewstep(prompts: int, log=print, seed: int = 0) -> dict:
    """Both workflows' sampling on ``prompts`` held-out prompts. Returns fewstep_speedup, fewstep_adherence_drop,
    and per workflow ("base", "fewstep") its adherence per attribute and sampling seconds."""
    load_package()

    from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL, BUILTIN_TEXT_ENCODER, BUILTIN_VAE
    from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeTextEncoderLoader, SpacetimeVAELoader
    from comfyui_spacetime.nodes.lora import SpacetimeLoadLoRA
    from comfyui_spacetime.nodes.sampling import SpacetimeEmptyLatentVideo, SpacetimeSampler, SpacetimeTextEncode
    from comfyui_spacetime.nodes.vae import SpacetimeVAEDecode
    from comfyui_spacetime.training.detector import detect
    from comfyui_spacetime.training.procedural import sample_spec

    (base_model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "fp32", "auto")
    (vae,) = SpacetimeVAELoader().load(BUILTIN_VAE, "fp32")
    (encoder,) = SpacetimeTextEncoderLoader().load(BUILTIN_TEXT_ENCODER, "default")
    (negative,) = SpacetimeTextEncode().encode(encoder, "")
    runs = {}
    for name, path in (("base", BASE_WORKFLOW), ("fewstep", FEWSTEP_WORKFLOW)):
        settings, lora = workflow_sampling(path)
        model = base_model if lora is None else SpacetimeLoadLoRA().load(base_model, *lora)[0]
        runs[name] = {"model": model, "settings": settings, "seconds": 0.0, "hits": dict.fromkeys(ATTRIBUTES, 0)}
    for i in range(prompts):
        spec = sample_spec(10_000 + i, held_out=True)  # builtin_quality.py's prompts and seeds
        (positive,) = SpacetimeTextEncode().encode(encoder, spec.caption)
        (latent,) = SpacetimeEmptyLatentVideo().generate(vae, 64, 64, 17, 1)
        found = {}
        for name, run in runs.items():
            s = run["settings"]
            started = time.perf_counter()
            (samples,) = SpacetimeSampler().sample(run["model"], positive, negative, latent, seed + i, s["steps"], s["cfg"],
                                                   s["shift"], s["scheduler"], s["denoise"])
            run["seconds"] += time.perf_counter() - started
            (images,) = SpacetimeVAEDecode().decode(vae, samples)
            found[name] = detect(images.numpy())
            for key in ATTRIBUTES:
                run["hits"][key] += getattr(found[name], key) == getattr(spec, key)
        log(f"{spec.caption!r}: " + "; ".join(f"{name} {f.colour}/{f.shape}/{f.motion}" for name, f in found.items()))
    result = {name: {key: run["hits"][key] / prompts for key in ATTRIBUTES} | {"seconds": run["seconds"], "settings": run["settings"]}
              for name, run in runs.items()}
    result["fewstep_speedup"] = runs["base"]["seconds"] / runs["fewstep"]["seconds"]
    result["fewstep_adherence_drop"] = max(result["base"][key] - result["fewstep"][key] for key in ATTRIBUTES)
    result["prompts"] = prompts
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Few-step workflow vs base workflow on the built-in model.")
    parser.add_argument("--prompts", type=int, default=48)
    args = parser.parse_args()
    result = measure_fewstep(args.prompts)
    print(f"| workflow | steps | cfg | scheduler | colour | shape | motion | sampling s ({result['prompts']} prompts) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("base", "fewstep"):
        row, s = result[name], result[name]["settings"]
        print(f"| {name} | {s['steps']} | {s['cfg']} | {s['scheduler']} | {row['colour']:.2f} | {row['shape']:.2f} | "
              f"{row['motion']:.2f} | {row['seconds']:.1f} |")
    print(f"fewstep: fewstep_speedup={result['fewstep_speedup']:.2f} fewstep_adherence_drop={result['fewstep_adherence_drop']:.2f}")


if __name__ == "__main__":
    main()
