"""Sampling math for latents longer than a model's trained length: context windows and per-frame prompt mixes.

Context windows (the approach of AnimateDiff's and ComfyUI's "context options"): the whole latent ``[B,C,F,h,w]``
is one sample for the solver; each model evaluation runs the DiT on overlapping windows of ``window`` latent frames
and blends their velocities with feathered weights (linear ramps across each overlap, 1 elsewhere), so every
window sees its neighbours' frames at every step and no window is fixed before the others. Windows are laid on a
stride of ``window - overlap``; the last one is moved back to end on the last frame (its overlap then grows).

Correlated noise (FreeNoise's noise rescheduling, Qiu et al. 2023, "FreeNoise: tuning-free longer video diffusion via
noise rescheduling"): windows started from independent noise each draw their own version of the prompt, and the
blend switches between them; so the noise of every frame after the first window is a seeded shuffle of the noise
frames one window earlier (each window then starts from a reordering of the first window's noise and the windows
agree on what the video shows), mixed with a share of fresh noise so that the video still moves
(``FREENOISE_CORRELATION``); the shuffles are of the unmixed frames, so every frame keeps that correlation with the
first window however long the video. The chain draws each chunk's new frames the same way, from the shuffles of the
chunk before.

Per-frame prompt mix (a prompt schedule): several prompts condition one DiT call's frames with weights that sum to
one per latent frame; the guided velocity is ``v_neg + cfg * (sum_p w_p * v_p - v_neg)`` (one negative pass, one
positive pass per prompt active in the frames, all in one batch). With one active prompt it is exactly
``flow_matching.guided_velocity``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .flow_matching import VelocityFn, guided_velocity

# model_fn(x [B,C,F,h,w], timesteps [B] or [B,F], context [B,L,D]) -> velocity like x
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The share of a later frame's noise that is the shuffled first-window noise (the rest is fresh, so variance stays 1).
# Measured on the built-in model (BENCHMARKS.md, "Long-video drift", 4 s, seed 0): 1.0 (FreeNoise as published) keeps
# the look but freezes the motion (the story's segments read "still"); 0.8 keeps the look (identity 1.00, seams 1.26)
# and some motion; 0.5 lets the joins show (seams 1.55). Stories that need each segment's motion use the latent chain.
FREENOISE_CORRELATION = 0.8


def window_spans(frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, stop)`` latent-frame spans of windows of ``window`` frames overlapping by at least ``overlap``
    that cover ``frames``; one span ``(0, frames)`` when the latent fits in a window. Sizes are checked by the
    caller's plan (``0 <= overlap < window``)."""
    if frames <= window:
        return [(0, frames)]
    stride = window - overlap
    starts = list(range(0, frames - window, stride)) + [frames - window]
    return [(start, start + window) for start in starts]


def rescheduled_noise(earlier: torch.Tensor, fresh: torch.Tensor, generator: torch.Generator,
                      correlation: float = FREENOISE_CORRELATION) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shuffled, noise)`` of ``n = fresh.shape[2]`` new frames ``[B,C,n,h,w]``: ``shuffled`` the first ``n`` of a
    random order (drawn from ``generator``, on the CPU) of the frames ``earlier`` ``[B,C,s,h,w]`` (``s >= n``: the
    shuffled frames one window before them, so they are frames of the first window's noise however far on), and the
    initial noise ``correlation * shuffled + sqrt(1 - correlation**2) * fresh``: unit variance, and correlated with
    the first window by ``correlation`` at any length (mixing the previous mix instead would decay it geometrically)."""
    order = torch.randperm(earlier.shape[2], generator=generator)[: fresh.shape[2]].to(earlier.device)
    shuffled = earlier[:, :, order]
    return shuffled, correlation * shuffled + math.sqrt(1.0 - correlation**2) * fresh


def freenoise(noise: torch.Tensor, window: int, overlap: int, seed: int,
              correlation: float = FREENOISE_CORRELATION) -> torch.Tensor:
    """``noise`` ``[B,C,F,h,w]`` rescheduled for windows of ``window`` frames on a stride ``window - overlap``: its
    first ``window`` frames kept, each later run of ``stride`` frames made by ``rescheduled_noise`` from the shuffled
    frames one window earlier and its own frames of ``noise`` as the fresh part; the shuffles seeded by ``seed``. As
    FreeNoise does (``correlation`` 1), with fresh noise mixed in (module docstring)."""
    frames, stride = noise.shape[2], window - overlap
    shuffled, out = noise.clone(), noise.clone()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for start in range(window, frames, stride):
        count = min(stride, frames - start)
        earlier = shuffled[:, :, start - window: start - window + stride]
        new_shuffled, new = rescheduled_noise(earlier, noise[:, :, start: start + count], generator, correlation)
        shuffled[:, :, start: start + count], out[:, :, start: start + count] = new_shuffled, new
    return out


def window_weights(spans: list[tuple[int, int]], frames: int) -> torch.Tensor:
    """Blend weights ``[len(spans), frames]`` (fp64): each window's feathered ramp (rising over its overlap with
    the window before, falling over its overlap with the one after), normalised to sum to one in every frame."""
    weights = torch.zeros(len(spans), frames, dtype=torch.float64)
    for index, (start, stop) in enumerate(spans):
        position = torch.arange(stop - start, dtype=torch.float64)
        ramp = torch.ones(stop - start, dtype=torch.float64)
        if index > 0:
            shared = spans[index - 1][1] - start  # frames shared with the window before
            ramp = torch.minimum(ramp, (position + 1) / (shared + 1))
        if index + 1 < len(spans):
            shared = stop - spans[index + 1][0]
            ramp = torch.minimum(ramp, (stop - start - position) / (shared + 1))
        weights[index, start:stop] = ramp
    return weights / weights.sum(dim=0, keepdim=True)


def windowed_velocity(window_velocity: Callable[[int], VelocityFn], spans: list[tuple[int, int]], weights: torch.Tensor) -> VelocityFn:
    """The velocity of the whole latent: ``window_velocity(i)`` (the velocity function of window ``i``, called
    once here) on each span, blended by ``weights`` (``window_weights``). A single window is its velocity
    itself, so one window is exactly the plain sampler."""
    velocities = [window_velocity(index) for index in range(len(spans))]
    if len(spans) == 1:
        return velocities[0]

    def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)  # [B,C,F,h,w]
        blend = weights.to(device=x.device, dtype=x.dtype)  # [windows, F]
        for index, (start, stop) in enumerate(spans):
            t = timesteps if timesteps.ndim == 1 else timesteps[:, start:stop]  # per-frame timesteps follow the window
            part = velocities[index](x[:, :, start:stop], t)  # [B,C,w,h,w]
            out[:, :, start:stop] += part * blend[index, start:stop].view(1, 1, -1, 1, 1)
        return out

    return velocity


def prompt_mix_velocity(model_fn: ModelFn, contexts: list[torch.Tensor], weights: torch.Tensor, negative: torch.Tensor,
                        cfg: float) -> VelocityFn:
    """Guided velocity under several prompts mixed per latent frame: ``contexts`` one ``[B,L,D]`` per prompt,
    ``weights`` ``[prompts, F]`` summing to one per frame (rows of 0 are skipped), ``negative`` ``[B,L,D]``."""
    active = [index for index in range(len(contexts)) if bool(weights[index].any())]
    if len(active) == 1:
        return guided_velocity(model_fn, contexts[active[0]], negative, cfg)
    passes = [contexts[index] for index in active] + ([] if cfg == 1.0 else [negative])
    batched = torch.cat(passes)  # [(k(+1))*B,L,D]
    mix = [weights[index].view(1, 1, -1, 1, 1) for index in active]

    def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        count = len(passes)
        out = model_fn(torch.cat([x] * count), torch.cat([timesteps] * count), batched).chunk(count)
        v_pos = sum(w.to(device=x.device, dtype=x.dtype) * v for w, v in zip(mix, out))
        return v_pos if cfg == 1.0 else out[-1] + cfg * (v_pos - out[-1])

    return velocity
