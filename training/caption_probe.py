"""Does the DiT read each word of its caption? A probe that needs no sampling: on held-out clips, the
flow-matching loss under the clip's own caption against the same caption with one attribute's words
changed, at the same noise: ``direction`` (the motion played backwards: left for right, up for down,
growing for shrinking), ``motion`` (another kind: left for up, growing for still), ``shape``,
``colour``; ``text`` is the empty caption. A model that reads the words predicts the true clip better.

With no sampling it is much faster than generating and scoring videos (``benchmarks/builtin_quality.py``),
and it separates what sampling blurs. Its results for the shipped DiT and for earlier runs are in
BENCHMARKS.md.
"""
from __future__ import annotations

import torch

from ..model_defs.bundles import LatentFormat
from .clips import render_pool, to_video
from .procedural import BACKWARDS, COLOURS, SHAPES, recaption

SIGMAS = (0.5, 0.7, 0.85, 0.95)  # where a video's layout and motion are decided
_COLOURS = tuple(COLOURS)
_OTHER_KIND = {"left": "up", "right": "down", "up": "left", "down": "right", "growing": "still", "shrinking": "still",
               "still": "growing"}
CHANGES = {
    "direction": lambda spec: {"motion": BACKWARDS[spec.motion]},
    "motion": lambda spec: {"motion": _OTHER_KIND[spec.motion]},
    "shape": lambda spec: {"shape": SHAPES[(SHAPES.index(spec.shape) + 1) % len(SHAPES)]},
    "colour": lambda spec: {"colour": _COLOURS[(_COLOURS.index(spec.colour) + 1) % len(_COLOURS)]},
}


@torch.no_grad()
def caption_sensitivity(dit, vae, encoder, text_len: int, clips: int = 96, seed: int = 12345,
                        batch: int = 32) -> dict[str, dict[str, float]]:
    """For each attribute: ``gap`` (mean loss under the changed caption minus under the true one) and
    ``wins`` (the share of clips the true caption predicts better), over ``clips`` held-out 64x64x17
    clips (direction over the moving ones: a still clip played backwards is the same clip). ``text`` is
    the gap of the empty caption. ``encoder`` is a text encoder (``encode(prompts, text_len)``, e.g. a
    SPACETIME_TEXT_ENCODER's ``encoder``); ``vae`` encodes and normalises latents as the DiT was trained on them."""
    pixels, specs = render_pool(clips, seed, held_out=True)
    moving = torch.tensor([spec.motion != "still" for spec in specs])
    if not moving.any():
        raise ValueError(f"clips={clips}: none of them moves, so there is no direction to probe; probe more clips (e.g. 32)")
    device = next(dit.parameters()).device
    normalize = LatentFormat.from_vae_config(vae.config).normalize
    x0 = torch.cat([normalize(vae.encode(to_video(pixels[i: i + batch]).to(device))) for i in range(0, clips, batch)])
    captions = {"true": [recaption(spec, spec.seed * 31 + 7) for spec in specs], "text": [""] * clips}
    for name, change in CHANGES.items():
        captions[name] = [recaption(spec, spec.seed * 31 + 7, **change(spec)) for spec in specs]
    contexts = {name: encoder.encode(texts, text_len).embeddings.to(device, torch.float32) for name, texts in captions.items()}
    generator = torch.Generator().manual_seed(seed)
    losses = {name: torch.zeros(clips) for name in captions}
    for sigma in SIGMAS:
        noise = torch.randn(x0.shape, generator=generator).to(device)
        x_t = (1 - sigma) * x0 + sigma * noise
        timesteps = torch.full((clips,), sigma * 1000, device=device)
        for name, context in contexts.items():
            velocity = torch.cat([dit(x_t[i: i + batch], timesteps[i: i + batch], context[i: i + batch]) for i in range(0, clips, batch)])
            losses[name] += (velocity.float() - (noise - x0)).pow(2).mean(dim=(1, 2, 3, 4)).cpu() / len(SIGMAS)
    result = {}
    for name in ("text", *CHANGES):
        keep = moving if name == "direction" else torch.ones(clips, dtype=torch.bool)
        gap = (losses[name] - losses["true"])[keep]
        result[name] = {"gap": gap.mean().item(), "wins": (gap > 0).float().mean().item()}
    return result
