"""Videos longer than the model's trained length, in one of three modes (``MODES``).

- **context windows** (default): the whole latent is one sample; every step runs the DiT on overlapping windows of
  ``chunk_frames`` and blends their velocities (``long_sampling``), so no window is fixed before its neighbours
  see it; one seed for the whole video, its noise rescheduled as FreeNoise does (``freenoise``: every window starts
  from a shuffle of the noise one window earlier, mixed with fresh noise), so the windows agree on the look.
- **latent chain**: chunks of ``chunk_frames`` chained in latent space. The first chunk is plain text to
  video; each later one holds the previous chunk's last ``overlap`` frames' latents as known latent frames
  (``known_frames``, no decode/encode round trip) and adds ``chunk_frames - overlap`` new frames, with the next
  seed (its known frames re-noised with the noise the previous chunk had there, its new frames' noise correlated
  with the previous chunk's). The whole latent sequence (small: 1/48 of the pixels for Wan 2.1) is decoded once at
  the end through the causal VAE's temporal streaming, so joins are seamless in pixels too.
- **pixel chain**: each chunk's tail decoded to pixels and encoded again as a forward extension (``video_prompts``):
  the drift baseline (the round trip through the VAE shifts colour and contrast a little per chunk).
In every mode only one chunk (or window) is ever in the DiT; the output frames are the only thing that grows with
the length (and, in the latent modes, the latent, 1/48 of them). Each chunk or window is conditioned on the prompts
of its time (``prompt_schedule``), mixed per latent frame across a change. Source: the Sora report's "extending
generated videos" and its one-minute videos; context windows as AnimateDiff / ComfyUI context options do them; the
noise as FreeNoise (Qiu et al. 2023) reschedules it. Which mode is the default is measured (BENCHMARKS.md, "Long-video
drift"): on the built-in model the windows keep the look and hide the joins, the chains do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..model_defs.bundles import SpacetimeConditioning, SpacetimeModel, SpacetimeVAE
from ..model_defs.flow_matching import Guide, NoiseStream, SolverSettings
from ..model_defs.known_frames import KnownLatents
from ..model_defs.long_sampling import (
    LOOK_ANCHOR, ChainGuide, LookAnchor, freenoise, prompt_mix_velocity, rescheduled_noise, window_spans, window_weights,
    windowed_velocity,
)
from ..model_defs.sizes import SizeRules, describe_allowed
from .prompt_schedule import EncodedSchedule
from .text_to_video import ModuleUse, run_sampler
from .vae_frames import decode_frames
from .video_prompts import extend_video

MODES = ("context windows", "latent chain", "pixel chain")  # the first is the default

# (chunk index, chunks) after each chunk, and (step, steps, x0 estimate) within one
ChunkDone = Callable[[int, int], None]
StepDone = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class LongVideoPlan:
    """A checked long video: ``frames`` of ``width`` x ``height`` made, in ``mode``, of chunks (or windows) of
    ``chunk_frames`` that each share ``overlap`` frames with the one before; ``temporal_factor`` the VAE's."""

    width: int
    height: int
    frames: int
    chunk_frames: int
    overlap: int
    temporal_factor: int = 4
    mode: str = MODES[0]

    @property
    def new_per_chunk(self) -> int:
        return self.chunk_frames - self.overlap

    @property
    def chunks(self) -> int:
        """Chunks of a chain (the same count in pixels and in latents: both chains add ``new_per_chunk`` frames)."""
        return 1 + max(0, math.ceil((self.frames - self.chunk_frames) / self.new_per_chunk))

    @property
    def latent_frames(self) -> int:
        """Latent frames of the whole video (its frames rounded up to ``1 + tf*k``)."""
        return 1 + math.ceil((self.frames - 1) / self.temporal_factor)

    @property
    def chunk_latents(self) -> int:
        return 1 + (self.chunk_frames - 1) // self.temporal_factor

    @property
    def overlap_latents(self) -> int:
        return 1 + (self.overlap - 1) // self.temporal_factor

    @property
    def windows(self) -> list[tuple[int, int]]:
        """Latent-frame spans of the context windows."""
        return window_spans(self.latent_frames, self.chunk_latents, self.overlap_latents)

    @property
    def runs(self) -> int:
        """Sampling runs of ``steps`` each: one per chunk in a chain, one for all windows."""
        return 1 if self.mode == "context windows" else self.chunks


def plan_long_video(rules: SizeRules, width: int, height: int, frames: int, chunk_frames: int, overlap: int,
                    mode: str = MODES[0]) -> LongVideoPlan:
    """Check the size, lengths and mode against ``rules`` (the VAE's ``video_rules``; errors name the input and the
    allowed values) and return the plan. Chunks and windows are whole latent frames: ``1 + tf*k`` pixel frames."""
    tf = rules.temporal_factor
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed; allowed values: {list(MODES)}")
    rules.check_side("width", width)
    rules.check_side("height", height)
    if frames < 1:
        raise ValueError(f"frames={frames} is not allowed: it must be >= 1")
    if chunk_frames < 1 + tf or (chunk_frames - 1) % tf:
        raise ValueError(
            f"chunk_frames={chunk_frames} is not allowed: it must be 1 + {tf}*k with k >= 1 (whole latent frames; the "
            f"model's trained length is the natural choice); {describe_allowed(chunk_frames, 1 + tf, tf)}"
        )
    if overlap < 1 or (overlap - 1) % tf or overlap >= chunk_frames:
        raise ValueError(
            f"overlap={overlap} is not allowed with chunk_frames={chunk_frames}: it must be 1 + {tf}*m (whole latent "
            f"frames) and smaller than chunk_frames, so that each chunk or window adds new frames; "
            f"{describe_allowed(overlap, 1, tf, below=chunk_frames)}"
        )
    return LongVideoPlan(width, height, frames, chunk_frames, overlap, tf, mode)


def generate_long_video(
    model: SpacetimeModel,
    vae: SpacetimeVAE,
    prompts: EncodedSchedule,
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
    look_anchor: float = LOOK_ANCHOR,
) -> torch.Tensor:
    """IMAGE frames ``[plan.frames, height, width, 3]`` in ``plan.mode``: chunk ``i`` of a chain is sampled with seed
    ``seed + i`` (mod 2**64), the windows with ``seed``. ``prompts``: the schedule (``single_prompt`` for one).
    ``look_anchor``: how far each step holds every frame's look to its prompt's (``LookAnchor``; latent modes)."""
    check_look_anchor(look_anchor)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength} is not allowed: it must be between 0 and 1")
    if model.image_channels:
        raise ValueError(
            f"model {model.name} is an image-to-video model: the long-video node starts from text alone; use a text-to-"
            "video model (Wan 2.1 T2V, Wan 2.2 TI2V-5B or T2V-A14B), or chain Spacetime Extend Video nodes from an image"
        )
    prompts.schedule.check_length(plan.frames)
    sampler = _Sampler(model, prompts, negative, settings, device, on_step, use, plan.temporal_factor)
    if plan.mode == "pixel chain":
        return _pixel_chain(sampler, vae, plan, seed, strength, vae_device, on_chunk)
    if plan.mode == "latent chain":
        latent = _latent_chain(sampler, vae, plan, seed, strength, look_anchor, on_chunk)
    else:
        latent = _context_windows(sampler, vae, plan, seed, look_anchor)
        if on_chunk is not None:
            on_chunk(1, 1)
    return decode_frames(vae, latent[:, :, :plan.latent_frames], vae_device)[:plan.frames]


def check_look_anchor(look_anchor: float) -> None:
    if isinstance(look_anchor, bool) or not isinstance(look_anchor, (int, float)) or not 0.0 <= look_anchor <= 1.0:
        raise ValueError(f"look_anchor={look_anchor!r} is not allowed: it must be between 0 (off) and 1 "
                         f"(default {LOOK_ANCHOR})")


class _Sampler:
    """What every chunk or window of one video shares: the model, the contexts of the schedule's prompts (made
    once) and the negative's, the solver settings and the callbacks."""

    def __init__(self, model: SpacetimeModel, prompts: EncodedSchedule, negative: SpacetimeConditioning,
                 settings: SolverSettings, device: torch.device, on_step: StepDone | None, use: ModuleUse | None,
                 temporal_factor: int):
        self.model, self.prompts, self.settings, self.device = model, prompts, settings, device
        self.on_step, self.use, self.temporal_factor = on_step, use, temporal_factor
        self.contexts = [model.text_context(c, "positive", 1, device) for c in prompts.conditionings]
        self.negative_context = model.text_context(negative, "negative", 1, device)

    def weights(self, first_latent: int, count: int, pixel_offset: int = 0) -> torch.Tensor:
        """Prompt weights ``[prompts, count]`` of latent frames ``first_latent ..`` (``PromptSchedule.latent_weights``)."""
        return self.prompts.schedule.latent_weights(first_latent, count, self.temporal_factor, pixel_offset).float()

    def velocity_of(self, weights: torch.Tensor, wrap: Callable | None = None):
        """``velocity_of(dit, cfg)`` of a latent whose frames take the prompt ``weights`` ``[prompts, F]``, passed
        through ``wrap`` when given."""
        wrap = wrap or (lambda velocity: velocity)
        return lambda dit, cfg: wrap(prompt_mix_velocity(dit, self.contexts, weights.to(self.device), self.negative_context, cfg))

    def sample(self, shape: tuple[int, ...], seed: int, velocity_of, known: KnownLatents | None = None,
               noise: torch.Tensor | None = None, guide: Guide | None = None) -> torch.Tensor:
        """Raw latents ``shape`` ``[1,C,F,h,w]`` from the noise of ``seed`` (or the given initial ``noise``; an "lcm"
        step's fresh noise is still the seed's), holding ``known`` frames (or with the given ``guide``); as
        ``generate`` does for text to video (the same noise, start and guide), with the given velocities."""
        self.model.check_latent(shape)
        normalize = self.model.latent_format.normalize
        x0_start = normalize(torch.zeros(shape)).to(self.device)
        noise_stream = NoiseStream(shape, seed)  # the initial noise, then an "lcm" step's fresh noise per call
        drawn = noise_stream()
        noise = (drawn if noise is None else noise).to(self.device)
        if known is not None:
            guide = known.guide(normalize, noise, self.model.holds_known_frames_clean)
        return run_sampler(self.model, velocity_of, x0_start, noise, self.settings, self.on_step, guide, self.use,
                           renoise=lambda: noise_stream().to(self.device))


def _latent_chain(sampler: _Sampler, vae: SpacetimeVAE, plan: LongVideoPlan, seed: int, strength: float,
                  look_anchor: float, on_chunk: ChunkDone | None) -> torch.Tensor:
    """The raw latent ``[1,C,F,h,w]`` of the chain (``F >= plan.latent_frames``: the last chunk is whole). Chunk
    ``i`` starts from the noise of its seed, its known frames' noise replaced by the previous chunk's noise there
    and its new frames' noise correlated with the first chunk's (``rescheduled_noise``, the shuffle seeded by the
    chunk's seed). Its known frames replay the previous chunk's path there (``ChainGuide``); on a model that holds
    known frames clean (Wan 2.2 TI2V-5B, as trained) they are held clean instead (``KnownLatents``). Every chunk's
    look is held to its prompt's (``LookAnchor``)."""
    size, kept = plan.chunk_latents, plan.overlap_latents
    step = size - kept
    shape = (1, vae.latent_channels, size, plan.height // vae.spatial_factor, plan.width // vae.spatial_factor)
    total = size + (plan.chunks - 1) * step
    latent = torch.zeros(1, shape[1], total, *shape[3:])
    spans = [(index * step, index * step + size) for index in range(plan.chunks)]
    anchor = LookAnchor(look_anchor, spans, sampler.weights(0, total))
    noise = shuffled = None  # the chunk before's initial noise and its unmixed shuffles, [1,C,size,h,w]
    guide = None
    for index in range(plan.chunks):
        start = index * step
        known = None
        if sampler.model.holds_known_frames_clean:
            if index > 0:
                known = KnownLatents(latent[:, :, start: start + kept].clone(), tuple(range(kept)), (strength,) * kept,
                                     tuple(shape[1:]), (plan.chunk_frames, plan.height, plan.width))
        else:
            guide = ChainGuide(kept, None if index == 0 else guide.recorded, strength)
        velocity_of = sampler.velocity_of(sampler.weights(start, size), anchor.chunk(index, start))
        chunk_seed = (seed + index) % 2**64
        drawn = NoiseStream(shape, chunk_seed)()  # the chunk's own noise, as the sampler draws it
        if noise is None:
            noise = shuffled = drawn
        else:
            generator = torch.Generator(device="cpu").manual_seed(chunk_seed)
            new_shuffled, new = rescheduled_noise(shuffled[:, :, :step], drawn[:, :, kept:], generator)
            shuffled = torch.cat([shuffled[:, :, step:], new_shuffled], dim=2)
            noise = torch.cat([noise[:, :, step:], new], dim=2)
        sampled = sampler.sample(shape, chunk_seed, velocity_of, known, noise, guide)
        new_from = 0 if index == 0 else kept  # the known frames stay the previous chunk's own latents, bit for bit
        latent[:, :, start + new_from: start + size] = sampled[:, :, new_from:]
        if on_chunk is not None:
            on_chunk(index + 1, plan.chunks)
    return latent


def _context_windows(sampler: _Sampler, vae: SpacetimeVAE, plan: LongVideoPlan, seed: int, look_anchor: float) -> torch.Tensor:
    """The raw latent ``[1,C,plan.latent_frames,h,w]``, all windows denoised together at every step from
    FreeNoise-rescheduled noise (``freenoise``: the windows start from correlated noise and agree on the look),
    every window's look held to its prompt's (``LookAnchor``)."""
    spans = plan.windows
    blend = window_weights(spans, plan.latent_frames)
    shape = (1, vae.latent_channels, plan.latent_frames, plan.height // vae.spatial_factor, plan.width // vae.spatial_factor)
    per_window = [sampler.weights(start, stop - start) for start, stop in spans]
    anchor = LookAnchor(look_anchor, spans, sampler.weights(0, plan.latent_frames))

    def velocity_of(dit, cfg):
        return anchor.windows(windowed_velocity(lambda i: sampler.velocity_of(per_window[i])(dit, cfg), spans, blend))

    noise = freenoise(NoiseStream(shape, seed)(), plan.chunk_latents, plan.overlap_latents, seed)
    return sampler.sample(shape, seed, velocity_of, noise=noise)


def _pixel_chain(sampler: _Sampler, vae: SpacetimeVAE, plan: LongVideoPlan, seed: int, strength: float,
                 vae_device: torch.device, on_chunk: ChunkDone | None) -> torch.Tensor:
    """The baseline: each chunk decoded, its tail encoded again as the next chunk's known frames."""
    width, height = plan.width, plan.height
    video = torch.empty(plan.frames, height, width, 3)
    shape = (1, vae.latent_channels, plan.chunk_latents, height // vae.spatial_factor, width // vae.spatial_factor)
    done = 0
    for index in range(plan.chunks):
        known, keep_from = None, 0
        if index > 0:
            tail = video[done - plan.overlap: done]
            known = extend_video(vae, tail, "forward", plan.overlap, plan.new_per_chunk, strength, vae_device).known
            keep_from = plan.overlap
        velocity_of = sampler.velocity_of(sampler.weights(0, plan.chunk_latents, index * plan.new_per_chunk))
        samples = sampler.sample(shape, (seed + index) % 2**64, velocity_of, known)
        pixels = decode_frames(vae, samples, vae_device)[keep_from:]
        count = min(len(pixels), plan.frames - done)
        video[done: done + count] = pixels[:count]
        done += count
        if on_chunk is not None:
            on_chunk(index + 1, plan.chunks)
    return video
