"""Does the built-in model follow its prompts? Generates a video for each held-out prompt (shape x
colour x motion combinations and phrasings never seen in training) through the same nodes the
workflows use, scores it with the analytic detector, and reports the VAE's reconstruction PSNR on
held-out clips. The last line is ``adherence: colour=X shape=Y motion=Z (N prompts)``.

Usage: python benchmarks/builtin_quality.py [--prompts 48] [--steps 20] [--cfg 5] [--shift 5] [--scheduler unipc]
                                           [--lora FILE [--lora-strength 1]] [--width 64 --height 64 --frames 17]
(the few-step LoRA: --lora model_defs/builtin_weights/fewstep_lora.safetensors --steps 4 --cfg 1 --scheduler euler_distill)
(other sizes measure whether the model draws at sizes and lengths other than the workflows' 64x64x17)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spacetime_bootstrap import load_package  # noqa: E402


def evaluate(prompts: int, steps: int, cfg: float, shift: float, seed: int = 0, log=print, psnr_clips: int = 16,
             width: int = 64, height: int = 64, frames: int = 17, scheduler: str = "unipc", lora: str | Path | None = None,
             lora_strength: float = 1.0) -> dict:
    """Adherence on ``prompts`` held-out prompts; ``lora`` (a file) is added to the model at ``lora_strength`` first."""
    load_package()

    from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL, BUILTIN_TEXT_ENCODER, BUILTIN_VAE
    from comfyui_spacetime.model_defs.lora import read_lora
    from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeTextEncoderLoader, SpacetimeVAELoader
    from comfyui_spacetime.nodes.sampling import SpacetimeEmptyLatentVideo, SpacetimeSampler, SpacetimeTextEncode
    from comfyui_spacetime.nodes.vae import SpacetimeVAEDecode
    from comfyui_spacetime.training.detector import detect
    from comfyui_spacetime.training.metrics import vae_psnr
    from comfyui_spacetime.training.procedural import sample_spec

    (model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "fp32", "auto")
    if lora is not None:
        model = model.with_lora(read_lora(lora), lora_strength)
    (vae,) = SpacetimeVAELoader().load(BUILTIN_VAE, "fp32")
    (encoder,) = SpacetimeTextEncoderLoader().load(BUILTIN_TEXT_ENCODER, "default")
    (negative,) = SpacetimeTextEncode().encode(encoder, "")
    hits = {"colour": 0, "shape": 0, "motion": 0}
    for i in range(prompts):
        spec = sample_spec(10_000 + i, held_out=True)
        (positive,) = SpacetimeTextEncode().encode(encoder, spec.caption)
        (latent,) = SpacetimeEmptyLatentVideo().generate(vae, width, height, frames, 1)
        (samples,) = SpacetimeSampler().sample(model, positive, negative, latent, seed + i, steps, cfg, shift, scheduler, 1.0)
        (images,) = SpacetimeVAEDecode().decode(vae, samples)
        found = detect(images.numpy())
        for key in hits:
            hits[key] += getattr(found, key) == getattr(spec, key)
        log(f"{spec.caption!r}: detected colour={found.colour} shape={found.shape} motion={found.motion}")
    return {key: value / prompts for key, value in hits.items()} | {"prompts": prompts, "vae_psnr": vae_psnr(vae.vae, 424242, psnr_clips)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Prompt adherence of the built-in model on held-out prompts.")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--shift", type=float, default=5.0)  # the shipped workflows' settings: 20 steps, cfg 5, shift 5
    parser.add_argument("--scheduler", default="unipc", help="the sampler's solver (e.g. euler_distill or lcm at 4 steps)")
    parser.add_argument("--lora", type=Path, help="a LoRA file to add to the built-in model (e.g. the few-step one)")
    parser.add_argument("--lora-strength", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    args = parser.parse_args()
    result = evaluate(args.prompts, args.steps, args.cfg, args.shift, width=args.width, height=args.height, frames=args.frames,
                      scheduler=args.scheduler, lora=args.lora, lora_strength=args.lora_strength)
    print(f"vae held-out PSNR: {result['vae_psnr']:.2f} dB")
    size = "" if (args.width, args.height, args.frames) == (64, 64, 17) else f" at {args.width}x{args.height}x{args.frames}"
    size += "" if args.lora is None else f" with {args.lora.name}"
    print(f"adherence{size}: colour={result['colour']:.2f} shape={result['shape']:.2f} motion={result['motion']:.2f} ({result['prompts']} prompts)")


if __name__ == "__main__":
    main()
