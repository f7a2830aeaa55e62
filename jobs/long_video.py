"""Videos longer than the model's trained length, by chained forward extension with overlap.

The first chunk is plain text to video; every later chunk is a forward extension (``video_prompts``)
that starts with the last ``overlap`` frames generated so far and adds ``chunk_frames - overlap``
new ones, with the next seed. Only one chunk is ever in the model or the VAE, so their memory is
bounded by the chunk, not the video; the output frames are written into one preallocated IMAGE
buffer (the only thing that grows with the length). The last chunk is cut to give exactly
``frames`` frames. Source: the Sora report's "extending generated videos", done the way its video
prompts condition a text-to-video model on known frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..model_defs.bundles import SpacetimeConditioning, SpacetimeModel, SpacetimeVAE
from ..model_defs.flow_matching import SolverSettings
from ..model_defs.sizes import SizeRules, describe_allowed
from .text_to_video import ModuleUse, empty_latent, generate
from .vae_frames import decode_frames
from .video_prompts import extend_video

# (chunk index, chunks) after each chunk, and (step, steps, x0 estimate) within one
ChunkDone = Callable[[int, int], None]
StepDone = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class LongVideoPlan:
    """A checked long video: ``frames`` of ``width`` x ``height`` made of chunks of ``chunk_frames`` that each
    share ``overlap`` frames with the one before."""

    width: int
    height: int
    frames: int
    chunk_frames: int
    overlap: int

    @property
    def new_per_chunk(self) -> int:
        return self.chunk_frames - self.overlap

    @property
    def chunks(self) -> int:
        return 1 + max(0, math.ceil((self.frames - self.chunk_frames) / self.new_per_chunk))


def plan_long_video(rules: SizeRules, width: int, height: int, frames: int, chunk_frames: int, overlap: int) -> LongVideoPlan:
    """Check the size and lengths against ``rules`` (the VAE's ``video_rules``; errors name the input and the
    allowed values) and return the plan."""
    tf = rules.temporal_factor
    rules.check_side("width", width)
    rules.check_side("height", height)
    if frames < 1:
        raise ValueError(f"frames={frames} is not allowed: it must be >= 1")
    if chunk_frames < 1 + tf or (chunk_frames - 1) % tf:
        raise ValueError(
            f"chunk_frames={chunk_frames} is not allowed: it must be 1 + {tf}*k with k >= 1 (the model's trained "
            f"length is the natural choice); {describe_allowed(chunk_frames, 1 + tf, tf)}"
        )
    if overlap < 1 or (overlap - 1) % tf or overlap >= chunk_frames:
        raise ValueError(
            f"overlap={overlap} is not allowed with chunk_frames={chunk_frames}: it must be 1 + {tf}*m and smaller "
            f"than chunk_frames, so that each chunk adds new frames; {describe_allowed(overlap, 1, tf, below=chunk_frames)}"
        )
    return LongVideoPlan(width, height, frames, chunk_frames, overlap)


def generate_long_video(
    model: SpacetimeModel,
    vae: SpacetimeVAE,
    positive: SpacetimeConditioning,
    negative: SpacetimeConditioning,
    plan: LongVideoPlan,
    seed: int,
    settings: SolverSettings,
    strength: float,
    device: torch.device,
    vae_device: torch.device,
    on_chunk: ChunkDone | None = None,
    on_step: StepDone | None = None,
    use: ModuleUse | None = None,
) -> torch.Tensor:
    """IMAGE frames ``[plan.frames, height, width, 3]``: chunk ``i`` is sampled with seed
    ``seed + i`` (mod 2**64)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength} is not allowed: it must be between 0 and 1")
    if model.image_channels:
        raise ValueError(
            f"model {model.name} is an image-to-video model: the long-video node starts from text alone; use a text-to-"
            "video model (Wan 2.1 T2V, Wan 2.2 TI2V-5B or T2V-A14B), or chain Spacetime Extend Video nodes from an image"
        )
    width, height = plan.width, plan.height
    video = torch.empty(plan.frames, height, width, 3)
    done = 0
    for index in range(plan.chunks):
        if index == 0:
            known, keep_from = None, 0
            latent = empty_latent(vae, width, height, plan.chunk_frames, 1)
        else:
            tail = video[done - plan.overlap: done]
            prompt = extend_video(vae, tail, "forward", plan.overlap, plan.new_per_chunk, strength, vae_device)
            known, keep_from = prompt.known, plan.overlap
            latent = known.empty_target()
        samples = generate(model, positive, negative, latent, (seed + index) % 2**64, settings, device, on_step=on_step, known=known, use=use)
        pixels = decode_frames(vae, samples, vae_device)[keep_from:]
        count = min(len(pixels), plan.frames - done)
        video[done: done + count] = pixels[:count]
        done += count
        if on_chunk is not None:
            on_chunk(index + 1, plan.chunks)
    return video
