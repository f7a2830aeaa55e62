"""How should a mid-video run of known frames be VAE-encoded (backward extension, the end of a
connection)? A causal VAE encodes latent frame j given the frames before it, which in a video prompt are
the frames being generated. This encodes frames 9-16 of procedural clips (latent frames 3-4) after
still lead-ins of 1, 5 and 9 frames (``conditioning.MID_RUN_LEAD_IN``) and, for reference, inside the
whole clip; decodes each after three pasts (the clip's true frames 0-8, its frame 9 held still, another
clip); and prints the PSNR of the decoded run against the given frames, next to the VAE's round trip.
The built-in VAE by default; ``--vae`` measures another Wan VAE file (e.g. wan_2.1_vae.safetensors).
(The built-in VAE, trained frame by frame, has no temporal context: every row then reads the same.)

Usage: python benchmarks/known_frames.py [--clips 6] [--size 64] [--vae PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spacetime_bootstrap import load_package  # noqa: E402

LEAD_INS = (1, 5, 9)
RUN_START, CLIP_FRAMES = 9, 17


def psnr(a, b) -> float:
    import math

    mse = float(((a.double() - b.double()) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def measure(clips: int, size: int, vae_path: str | None = None, log=print) -> dict[tuple[str, str], float]:
    load_package()
    import torch

    from comfyui_spacetime.model_defs.builtin import builtin_vae
    from comfyui_spacetime.model_defs.bundles import SpacetimeVAE
    from comfyui_spacetime.model_defs.checkpoint import load_vae
    from comfyui_spacetime.model_defs.sizes import latent_frame_of
    from comfyui_spacetime.jobs.vae_frames import decode_frames, encode_frames
    from comfyui_spacetime.training.procedural import render, sample_spec

    cpu = torch.device("cpu")
    vae = builtin_vae() if vae_path is None else SpacetimeVAE(load_vae(vae_path, torch.float32), Path(vae_path).name)
    encode = lambda frames: encode_frames(vae, frames, cpu)  # noqa: E731
    decode = lambda latent: decode_frames(vae, latent, cpu)  # noqa: E731
    first_run_latent = latent_frame_of(RUN_START, vae.temporal_factor)
    scores: dict[tuple[str, str], list[float]] = {}
    for index in range(clips):
        clip = torch.from_numpy(render(sample_spec(1000 + index), CLIP_FRAMES, size))
        other = torch.from_numpy(render(sample_spec(2000 + index), CLIP_FRAMES, size))
        run = clip[RUN_START:]
        whole = encode(clip)
        pasts = {
            "true past": whole[:, :, :first_run_latent],
            "still past": encode(run[:1].expand(RUN_START, -1, -1, -1)),
            "another clip": encode(other[:RUN_START]),
        }
        runs = {f"lead-in {n}": encode(torch.cat([run[:1].expand(n, -1, -1, -1), run]))[:, :, -(whole.shape[2] - first_run_latent):] for n in LEAD_INS}
        runs["inside the clip"] = whole[:, :, first_run_latent:]
        for run_name, run_latent in runs.items():
            for past_name, past in pasts.items():
                decoded = decode(torch.cat([past, run_latent], dim=2))[RUN_START:]
                scores.setdefault((run_name, past_name), []).append(psnr(decoded, run))
        scores.setdefault(("VAE round trip", "whole clip"), []).append(psnr(decode(whole)[RUN_START:], run))
    means = {key: sum(values) / len(values) for key, values in scores.items()}
    for (run_name, past_name), value in means.items():
        log(f"{run_name:>16} decoded after {past_name:<12}: {value:6.2f} dB")
    return means


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vae", default=None, help="a Wan VAE .safetensors file (default: the built-in VAE)")
    args = parser.parse_args(argv)
    measure(args.clips, args.size, args.vae)


if __name__ == "__main__":
    main()
