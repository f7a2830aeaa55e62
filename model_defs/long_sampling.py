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

from .flow_matching import NUM_TRAIN_TIMESTEPS, VelocityFn, guided_velocity

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


class ChainGuide:
    """The guide (``flow_matching.Guide``) of one chunk of a latent chain whose first ``kept`` latent frames are the
    chunk before's last ``kept``: every model evaluation sees them as that chunk saw them at the same evaluation (its
    model inputs there, recorded in order) and the solver takes that chunk's velocities there. The new frames are thus
    denoised beside the shared frames' own path from noise to their final latents, step by step (as a context window
    beside its neighbour), not beside a straight path to the final latents re-noised to each level (the mask path of
    ``known_frames``, which this model family follows loosely: measured in BENCHMARKS.md, "Long-video drift").
    ``strength`` below 1 lerps the replayed values with the chunk's own; 0 replays nothing. The chunk's last ``kept``
    frames are recorded in ``recorded`` for the next chunk; ``replay`` None: the first chunk."""

    def __init__(self, kept: int, replay: list[tuple[torch.Tensor, torch.Tensor]] | None = None, strength: float = 1.0):
        self.kept, self.replay, self.strength = kept, replay, strength
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []  # per evaluation: (model input, velocity) [B,C,kept,h,w]
        self._inputs: torch.Tensor | None = None

    def _replayed(self, value: torch.Tensor, which: int) -> torch.Tensor:
        if self.replay is None or self.strength == 0.0:
            return value
        index = len(self.recorded)
        if index >= len(self.replay):
            raise RuntimeError(f"latent chain: model evaluation {index + 1} of a chunk has no counterpart in the chunk "
                               f"before, which made {len(self.replay)}; every chunk must be sampled with the same settings")
        value = value.clone()
        head = value[:, :, : self.kept]
        value[:, :, : self.kept] = torch.lerp(head, self.replay[index][which].to(head), self.strength)
        return value

    def model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        x = self._replayed(x, 0)
        self._inputs = x[:, :, -self.kept:].clone()
        return x

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def velocity(self, velocity: torch.Tensor) -> torch.Tensor:
        velocity = self._replayed(velocity, 1)
        self.recorded.append((self._inputs, velocity[:, :, -self.kept:].clone()))
        return velocity

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the shared frames are kept as the chunk before made them (``long_video._latent_chain``)


# How far each step moves a frame's look towards its prompt's (``LookAnchor``). Measured on the built-in model at the
# minute (BENCHMARKS.md, "Long-video drift", windows, seed 0): 0 lets about five stretches wash pink (max drift 0.26),
# 0.5 keeps every chunk's background (max drift 0.029); 1.0 does no better (0.027) and pins the look harder.
LOOK_ANCHOR = 0.5


def look_of(x0: torch.Tensor) -> torch.Tensor:
    """A latent's look ``[B,C,F]``: the per-channel median of each frame of ``x0`` ``[B,C,F,h,w]`` over its positions,
    the latent colour of its background wherever the subject covers less than half of the frame."""
    return x0.flatten(3).median(dim=-1).values


def anchor_spans(spans: list[tuple[int, int]], weights: torch.Tensor) -> list[int]:
    """For each prompt (``weights`` ``[prompts, F]``, the schedule's per latent frame), the index of the span (window
    or chunk) whose look anchors it: the first that carries the most of that prompt."""
    carried = torch.stack([weights[:, start:stop].sum(dim=1) for start, stop in spans], dim=1)  # [prompts, spans]
    return [int(row.argmax()) for row in carried]  # argmax: the first of equal maxima


class LookAnchor:
    """Keeps a long video's look: at every model evaluation, the data prediction ``x - sigma * v`` of each latent
    frame has its per-channel medians (``look_of``: its background's latent colour) moved by ``strength`` towards
    the look of its prompt, which is the look of that prompt's anchor span (``anchor_spans``: the first window or chunk
    that carries the most of it), mixed by the frame's prompt weights. Windows take the anchor span's look of the
    same evaluation; a chain records it while it samples the anchor chunk, evaluation by evaluation, for the chunks
    after (a chunk's frames whose prompt has no record yet are left free). Where the prompt changes, so does the look
    held. Independent windows or chunks otherwise each draw their own background now and then (a wash of another
    colour for a few chunks); this is a guidance on the statistics of the estimate, not on the noise, so the motion
    stays free."""

    def __init__(self, strength: float, spans: list[tuple[int, int]], weights: torch.Tensor):
        self.strength, self.spans = strength, spans
        self.weights = weights.double()  # [prompts, F] over the whole latent
        self.anchors = anchor_spans(spans, self.weights)
        self.moving = self.weights.clone()  # the weights that move frames: 0 in each prompt's own anchor span
        for prompt, anchor in enumerate(self.anchors):
            self.moving[prompt, slice(*spans[anchor])] = 0.0
        self.active = strength > 0.0 and len(spans) > 1  # one span: nothing to hold it to (exactly the plain sampler)
        self.recorded: dict[int, list[torch.Tensor]] = {}  # chain: prompt -> its anchor chunk's look per evaluation [B,C]

    def _prompt_look(self, look: torch.Tensor, prompt: int, start: int) -> torch.Tensor:
        """``[B,C]``: the median over the frames of ``prompt``'s anchor span that it rules (weight >= 1/2) of ``look``
        ``[B,C,F']`` (frames from ``start``)."""
        a, b = self.spans[self.anchors[prompt]]
        ruled = [f for f in range(a, b) if self.weights[prompt, f] >= 0.5] or list(range(a, b))
        return look[:, :, [f - start for f in ruled]].median(dim=-1).values

    def windows(self, velocity_fn: VelocityFn) -> VelocityFn:
        """The anchored velocity of the whole latent (context windows)."""
        if not self.active:
            return velocity_fn

        def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            v, sigma = velocity_fn(x, timesteps), _sigma(timesteps)
            if sigma == 0.0:
                return v
            look = look_of(x - sigma * v)
            targets = {p: self._prompt_look(look, p, 0) for p in range(len(self.anchors))}
            return self._moved(v, sigma, look, targets, 0)

        return velocity

    def chunk(self, index: int, start: int) -> Callable[[VelocityFn], VelocityFn]:
        """``wrap(velocity_fn)`` for chunk ``index`` of a chain, whose latent frames start at ``start``: anchored to
        the records of earlier anchor chunks; records the looks of the prompts this chunk anchors."""
        stop = self.spans[index][1]
        records = {p: self.recorded.setdefault(p, []) for p, anchor in enumerate(self.anchors) if anchor == index}
        known = {p: looks for p, looks in self.recorded.items() if p not in records}
        evaluation = [0]  # over the chunk's evaluations, whichever expert makes them

        def wrap(velocity_fn: VelocityFn) -> VelocityFn:
            if not self.active:
                return velocity_fn

            def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
                v, sigma = velocity_fn(x, timesteps), _sigma(timesteps)
                step, evaluation[0] = evaluation[0], evaluation[0] + 1
                if sigma == 0.0:
                    return v
                look = look_of(x - sigma * v)
                for prompt, looks in records.items():
                    looks.append(self._prompt_look(look, prompt, start))
                targets = {p: looks[step] for p, looks in known.items() if step < len(looks)}
                return self._moved(v, sigma, look, targets, start, stop)

            return velocity

        return wrap

    def _moved(self, v: torch.Tensor, sigma: float, look: torch.Tensor, targets: dict[int, torch.Tensor], start: int,
               stop: int | None = None) -> torch.Tensor:
        """``v`` with each frame's look moved towards the mix of ``targets`` (prompt -> look ``[B,C]``) by its
        prompts' weights; frames whose prompts have no target, or lie in their prompt's anchor span, move less or not
        at all."""
        if not targets:
            return v
        weights = self.moving[list(targets), start:stop].to(v)  # [k, F']
        held = weights.sum(dim=0)  # [F']: the share of each frame's prompts that have a look to keep
        stacked = torch.stack([targets[p] for p in targets]).to(v)  # [k,B,C]
        target = torch.einsum("kf,kbc->bcf", weights, stacked) / held.clamp_min(1e-12)
        shift = self.strength * held * (target - look)  # [B,C,F']
        return v - shift[..., None, None] / sigma


def _sigma(timesteps: torch.Tensor) -> float:
    """The solver's noise level of a model evaluation at ``timesteps`` ``[B]`` (or ``[B,F]``, 0 at frames held
    clean)."""
    return float(timesteps.max()) / NUM_TRAIN_TIMESTEPS
