"""Does the built-in model's prompt extension help it follow free-form prompts? For held-out clips (shape x colour x
motion combinations never seen in training) it writes a free-form paraphrase in words of its own table below
(not the extension's table: some of these words the extension does not know), generates a video from the
paraphrase as given and from its extension (Spacetime Extend Prompt, backend built-in), and scores both with the
analytic detector, as ``builtin_quality.py`` does. Last line:
``paraphrase adherence: raw colour=.. shape=.. motion=..; extended colour=.. shape=.. motion=.. (N prompts)``.

Usage: python benchmarks/builtin_paraphrase.py [--prompts 24] [--steps 20]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spacetime_bootstrap import load_package  # noqa: E402

COLOUR_WORDS = {"red": ("crimson", "scarlet", "cherry-red", "ruby"), "green": ("emerald", "lime", "grass-green", "jade"),
                "blue": ("cobalt", "azure", "sapphire", "royal blue"), "yellow": ("golden", "lemon", "canary", "sunflower"),
                "purple": ("violet", "lavender", "plum", "grape"), "orange": ("tangerine", "amber", "pumpkin", "apricot"),
                "cyan": ("turquoise", "teal", "aqua", "aquamarine"), "pink": ("rose", "salmon", "fuchsia", "bubblegum")}
SHAPE_WORDS = {"circle": ("ball", "disc", "orb", "round blob"), "square": ("box", "block", "cube", "square tile"),
               "triangle": ("pyramid", "wedge", "triangular shape", "cone"), "star": ("starfish", "star shape", "sparkle", "five-pointed star")}
MOTION_WORDS = {"left": ("rolling leftwards", "heading left", "moving toward the left edge", "sliding westward"),
                "right": ("rolling rightwards", "heading right", "moving toward the right edge", "sliding eastward"),
                "up": ("climbing", "ascending", "lifting toward the top", "soaring upward"),
                "down": ("dropping", "descending", "plummeting", "sinking toward the bottom"),
                "growing": ("getting larger", "inflating", "expanding outward", "swelling"),
                "shrinking": ("getting smaller", "contracting", "deflating", "dwindling away"),
                "still": ("sitting motionless", "not moving at all", "staying put", "perfectly static")}
TEMPLATES = ("a {colour} {shape} {motion}", "{colour} {shape}, {motion}", "there is a {colour} {shape} {motion}",
             "a {shape} in {colour}, {motion}")


def paraphrase(spec, seed: int) -> str:
    rng = random.Random(seed)
    return rng.choice(TEMPLATES).format(colour=rng.choice(COLOUR_WORDS[spec.colour]), shape=rng.choice(SHAPE_WORDS[spec.shape]),
                                        motion=rng.choice(MOTION_WORDS[spec.motion]))


def evaluate(prompts: int, steps: int, log=print) -> dict:
    load_package()
    from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL, BUILTIN_TEXT_ENCODER, BUILTIN_VAE
    from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeTextEncoderLoader, SpacetimeVAELoader
    from comfyui_spacetime.nodes.prompt import SpacetimeExtendPrompt
    from comfyui_spacetime.nodes.sampling import SpacetimeEmptyLatentVideo, SpacetimeSampler, SpacetimeTextEncode
    from comfyui_spacetime.nodes.vae import SpacetimeVAEDecode
    from comfyui_spacetime.training.detector import detect
    from comfyui_spacetime.training.procedural import sample_spec

    (model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "fp32", "auto")
    (vae,) = SpacetimeVAELoader().load(BUILTIN_VAE, "fp32")
    (encoder,) = SpacetimeTextEncoderLoader().load(BUILTIN_TEXT_ENCODER, "default")
    (negative,) = SpacetimeTextEncode().encode(encoder, "")
    hits = {kind: {"colour": 0, "shape": 0, "motion": 0} for kind in ("raw", "extended")}
    for i in range(prompts):
        spec = sample_spec(30_000 + i, held_out=True)
        raw = paraphrase(spec, i)
        extended, note = SpacetimeExtendPrompt().extend(raw, "t2v", "built-in", "", "", "", 0, 256, "fail")
        for kind, text in (("raw", raw), ("extended", extended)):
            (positive,) = SpacetimeTextEncode().encode(encoder, text)
            (latent,) = SpacetimeEmptyLatentVideo().generate(vae, 64, 64, 17, 1)
            (samples,) = SpacetimeSampler().sample(model, positive, negative, latent, i, steps, 5.0, 5.0, "unipc", 1.0)
            (images,) = SpacetimeVAEDecode().decode(vae, samples)
            found = detect(images.numpy())
            for key in hits[kind]:
                hits[kind][key] += getattr(found, key) == getattr(spec, key)
        log(f"{raw!r} -> {extended!r} {note}")
    return {kind: {key: value / prompts for key, value in counts.items()} for kind, counts in hits.items()} | {"prompts": prompts}


def main() -> None:
    parser = argparse.ArgumentParser(description="Adherence of the built-in model to free-form paraphrases, with and without its prompt extension.")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    r = evaluate(args.prompts, args.steps)
    raw, ext = r["raw"], r["extended"]
    print(f"paraphrase adherence: raw colour={raw['colour']:.2f} shape={raw['shape']:.2f} motion={raw['motion']:.2f}; "
          f"extended colour={ext['colour']:.2f} shape={ext['shape']:.2f} motion={ext['motion']:.2f} ({r['prompts']} prompts)")


if __name__ == "__main__":
    main()
