"""Does the built-in DiT read each word of its prompts? Seconds where builtin_quality.py takes minutes:
on held-out clips, the loss under each clip's caption against the same caption with one attribute's
word changed (``training/caption_probe.py``). The last line is
``caption sensitivity: direction=G (wins W) motion=... shape=... colour=... text=... (N clips)``: G the mean loss
gap (higher: the word matters more), W the share of clips the true caption predicts better (0.5: the
word is ignored).

Usage: python benchmarks/builtin_caption_probe.py [--clips 96] [--weights-dir model_defs/builtin_weights]
(--weights-dir probes other weights, e.g. a training run's --out)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spacetime_bootstrap import load_package  # noqa: E402


def main() -> None:
    load_package()
    import torch

    from comfyui_spacetime.kernels import get_backend
    from comfyui_spacetime.model_defs.builtin import WEIGHTS_DIR, builtin_model, builtin_text_encoder, builtin_vae
    from comfyui_spacetime.training.caption_probe import caption_sensitivity

    parser = argparse.ArgumentParser(description="How much the built-in DiT's predictions depend on each word of a caption.")
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args()
    if args.clips < 8:
        parser.error(f"--clips={args.clips}: allowed values are 8 or more (fewer clips may hold no moving one to play backwards)")
    model = builtin_model(get_backend(), torch.float32, args.weights_dir)
    vae = builtin_vae(torch.float32, args.weights_dir)
    encoder = builtin_text_encoder()
    result = caption_sensitivity(model.dit.eval(), vae.vae.eval(), encoder.encoder, encoder.text_len, clips=args.clips)
    print("caption sensitivity: " + " ".join(f"{name}={r['gap']:.3f} (wins {r['wins']:.2f})" for name, r in result.items() if name != "text")
          + f" text={result['text']['gap']:.3f} ({args.clips} clips)")


if __name__ == "__main__":
    main()
