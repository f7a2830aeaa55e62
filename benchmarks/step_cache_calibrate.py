"""Fit the built-in model's TeaCache polynomial (``model_defs/step_cache_coefficients.py``, ``builtin-tiny``).

Samples held-out prompts (``builtin_quality``'s, seeds 0..n-1) at the workflows' settings with every step
computed, and records, at every DiT evaluation, the cheap input (the time modulation, and the time embedding)
and the residual of the block stack (output minus input), per batch row (the cond and uncond rows alike). For
consecutive evaluations of a run it pairs x = relative L1 change of the cheap input with y = relative L1 change
of the residual, and fits y ~ poly(x) of degree 4 by least squares (``numpy.polyfit``), as TeaCache fits its
Wan coefficients. Prints the coefficients for both inputs and the fit's RMS error, and MagCache's magnitude
ratios: per step, the mean over tokens of |residual_i| / |residual_i-1| of the conditional row, averaged over
the prompts.

Usage: python benchmarks/step_cache_calibrate.py [--prompts 8] [--steps 20] [--cfg 5] [--shift 5] [--degree 4]
(run under the CPU lock: ``flock /work/cpu.lock python benchmarks/step_cache_calibrate.py``)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spacetime_bootstrap import load_package  # noqa: E402


class _Recorder:
    """A step-cache hook (``WanDiT.step_cache``) that computes every evaluation and keeps what the fit needs."""

    def __init__(self):
        self.records: list[tuple] = []  # (time_mod [N,6C], time_emb [N,C], residual [B,S,C]) per evaluation

    def before_blocks(self, x, time_emb, time_mod, blocks, block_args):
        self._input, self._cheap = x, (time_mod.flatten(1).clone(), time_emb.clone())
        return x, blocks

    def after_blocks(self, x):
        self.records.append((*self._cheap, (x - self._input).float()))
        return x


def _row_changes(new, old) -> np.ndarray:
    return ((new - old).abs().mean(1) / old.abs().mean(1).clamp_min(1e-12)).numpy()


def calibrate(prompts: int, steps: int, cfg: float, shift: float, degree: int = 4, log=print) -> dict:
    load_package()
    from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL, BUILTIN_TEXT_ENCODER, BUILTIN_VAE
    from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeTextEncoderLoader, SpacetimeVAELoader
    from comfyui_spacetime.nodes.sampling import SpacetimeEmptyLatentVideo, SpacetimeSampler, SpacetimeTextEncode
    from comfyui_spacetime.training.procedural import sample_spec

    (model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "fp32", "auto")
    (vae,) = SpacetimeVAELoader().load(BUILTIN_VAE, "fp32")
    (encoder,) = SpacetimeTextEncoderLoader().load(BUILTIN_TEXT_ENCODER, "default")
    (negative,) = SpacetimeTextEncode().encode(encoder, "")
    pairs = {"time_modulation": ([], []), "time_embedding": ([], [])}
    magnitudes = []  # per prompt: per step, the mean over tokens of |residual_i| / |residual_i-1| (conditional row)
    for i in range(prompts):
        spec = sample_spec(10_000 + i, held_out=True)
        (positive,) = SpacetimeTextEncode().encode(encoder, spec.caption)
        (latent,) = SpacetimeEmptyLatentVideo().generate(vae, 64, 64, 17, 1)
        recorder = _Recorder()
        model.dit.step_cache = recorder
        try:
            SpacetimeSampler().sample(model, positive, negative, latent, i, steps, cfg, shift, "unipc", 1.0)
        finally:
            model.dit.step_cache = None
        magnitudes.append([1.0] + [
            float((new[0].norm(dim=-1) / old[0].norm(dim=-1)).mean())
            for (_, _, old), (_, _, new) in zip(recorder.records, recorder.records[1:])
        ])
        for (mod_old, emb_old, res_old), (mod_new, emb_new, res_new) in zip(recorder.records, recorder.records[1:]):
            res_old, res_new = res_old.flatten(1), res_new.flatten(1)
            y = _row_changes(res_new, res_old)  # [rows]
            for name, new, old in (("time_modulation", mod_new, mod_old), ("time_embedding", emb_new, emb_old)):
                x = _row_changes(new, old)
                pairs[name][0].extend(np.broadcast_to(x, y.shape) if x.size == 1 else x)
                pairs[name][1].extend(y)
        log(f"prompt {i + 1}/{prompts}: {spec.caption!r}, {len(recorder.records)} evaluations recorded")
    result = {}
    for name, (xs, ys) in pairs.items():
        xs, ys = np.asarray(xs), np.asarray(ys)
        coefficients = np.polyfit(xs, ys, degree)
        rms = float(np.sqrt(np.mean((np.polyval(coefficients, xs) - ys) ** 2)))
        result[name] = {"coefficients": [float(c) for c in coefficients], "rms": rms, "points": len(xs),
                        "x_range": (float(xs.min()), float(xs.max())), "y_mean": float(ys.mean())}
    result["mag_ratios"] = [round(float(v), 5) for v in np.mean(magnitudes, axis=0)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Fit the built-in model's TeaCache polynomial.")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--degree", type=int, default=4)
    args = parser.parse_args()
    result = calibrate(args.prompts, args.steps, args.cfg, args.shift, args.degree)
    print(f"mag_ratios ({args.steps} steps): {tuple(result.pop('mag_ratios'))}")
    for name, fit in result.items():
        coefficients = ", ".join(f"{c:.8e}" for c in fit["coefficients"])
        print(f"{name}: ({coefficients})  rms={fit['rms']:.4f} over {fit['points']} pairs, "
              f"x in [{fit['x_range'][0]:.4f}, {fit['x_range'][1]:.4f}], mean y {fit['y_mean']:.4f}")


if __name__ == "__main__":
    main()
