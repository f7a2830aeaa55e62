"""Text to video (and video to video with ``denoise < 1``): an empty latent of a checked size, and the
sampler that turns noise into raw latents under text conditioning, optionally holding known frames."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

from ..model_defs.bundles import ImageCondition, SpacetimeConditioning, SpacetimeModel, SpacetimeTextEncoder, SpacetimeVAE
from ..model_defs.flow_matching import Guide, NoiseStream, SolverSettings, StepCallback, StepStart, VelocityFn, guided_velocity, sample
from ..model_defs.experts import ExpertSwitch, default_boundary
from ..model_defs.known_frames import KnownLatents
from ..model_defs.lora import applied
from ..model_defs.previews import PREVIEW_MODES, preview_image
from ..model_defs.step_cache import StepCacheRun, cached
from ..model_defs.wan_dit import WanDiT

log = logging.getLogger(__name__)

# use(module): put a DiT on the sampling device before it runs (and release the one that ran before); the
# nodes pass ComfyUI's model management here, tests and scripts nothing (the DiTs are already there).
ModuleUse = Callable[[torch.nn.Module], None]


def encode_prompts(text_encoder: SpacetimeTextEncoder, prompts: list[str]) -> list[SpacetimeConditioning]:
    """Each prompt encoded alone, at the encoder's own text length (the sampler pads or cuts to the model's)."""
    return [SpacetimeConditioning(text_encoder.encoder.encode([p], text_encoder.text_len), text_encoder.name) for p in prompts]


def empty_latent(vae: SpacetimeVAE, width: int, height: int, frames: int, batch: int) -> torch.Tensor:
    """Zeros ``[batch, C, T', height/sf, width/sf]`` after checking the size against the VAE's rules."""
    size = vae.video_rules.latent_size(width, height, frames)
    if batch < 1:
        raise ValueError(f"batch_size={batch} is not allowed: it must be >= 1")
    return torch.zeros(batch, vae.latent_channels, *size)


def generate(
    model: SpacetimeModel,
    positive: SpacetimeConditioning,
    negative: SpacetimeConditioning,
    latent: torch.Tensor,
    seed: int,
    settings: SolverSettings,
    device: torch.device,
    on_step: StepCallback | None = None,
    known: KnownLatents | None = None,
    use: ModuleUse | None = None,
    image: ImageCondition | None = None,
) -> torch.Tensor:
    """Sample raw latents like ``latent [B,C,F,H,W]`` (raw VAE space); ``settings.denoise < 1`` starts from
    ``latent``; ``known`` latent frames (image/video prompts) are held in place while sampling, or, for an
    image-conditioned model, ``image`` (``video_prompts.image_condition``) is its conditioning. An expert
    pair runs each expert for its steps, ``use`` placing it first."""
    model.check_latent(tuple(latent.shape))
    batch = latent.shape[0]
    pos_ctx = model.text_context(positive, "positive", batch, device)
    neg_ctx = model.text_context(negative, "negative", batch, device)

    x0_start = model.latent_format.normalize(latent.float()).to(device)
    noise_stream = NoiseStream(tuple(latent.shape), seed)  # the initial noise, then an "lcm" step's fresh noise per call
    noise = noise_stream().to(device)
    if model.image_channels:
        if image is None:
            raise ValueError(f"model {model.name} is an image-to-video model: it needs an image (Spacetime Image To Video)")
        known = None  # the image channels carry the given frames
    guide = None if known is None else known.guide(model.latent_format.normalize, noise, model.holds_known_frames_clean)
    model_fn = _conditioned(image, tuple(latent.shape), device) if model.image_channels else (lambda dit: dit)
    velocity_of = lambda dit, cfg: guided_velocity(model_fn(dit), pos_ctx, neg_ctx, cfg)  # noqa: E731
    return run_sampler(model, velocity_of, x0_start, noise, settings, on_step, guide, use, renoise=lambda: noise_stream().to(device))


def run_sampler(
    model: SpacetimeModel,
    velocity_of: Callable[[WanDiT, float], VelocityFn],
    x0_start: torch.Tensor,
    noise: torch.Tensor,
    settings: SolverSettings,
    on_step: StepCallback | None = None,
    guide: Guide | None = None,
    use: ModuleUse | None = None,
    renoise: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The solver from ``noise`` (and ``x0_start``, model space, both on the sampling device) to raw latents
    on the CPU: ``velocity_of(dit, cfg)`` makes the velocity of each step's DiT (``stepwise_velocity``).
    ``renoise()`` draws the fresh noise of each step of a re-noising solver ("lcm"). ``generate`` is this with
    classifier-free guidance on one prompt; long videos pass their own velocities."""
    sigmas = settings.sigmas()
    with torch.inference_mode():
        with stepwise_velocity(model, sigmas, settings, velocity_of, use) as (velocity, step_start):
            result = sample(velocity, x0_start, noise, sigmas, settings.scheduler, on_step, guide, step_start, renoise=renoise)
    return model.latent_format.denormalize(result).float().cpu()


def step_preview(model: SpacetimeModel, x0: torch.Tensor, mode: str = PREVIEW_MODES[0]) -> Callable[[], torch.Tensor] | None:
    """A preview of a sampling step's estimate ``x0 [B,C,F,h,w]`` (model space), made when called: an image
    ``[h, w, 3]`` (``previews.preview_image``); None when the model's latents have no preview map."""
    rgb = model.latent_format.rgb
    if rgb is None or rgb.channels != x0.shape[1]:
        return None
    return lambda: preview_image(x0, rgb, mode)


def _conditioned(image: ImageCondition, latent_shape: tuple[int, ...], device: torch.device):
    """``model_fn(dit)``: the DiT called on the noisy latents with the image channels behind them (and its CLIP
    features), for any batch the guidance makes."""
    channels = image.channels.to(device)  # [1,tf+C,F',h,w]
    if tuple(channels.shape[2:]) != tuple(latent_shape[2:]):
        raise ValueError(
            f"the image conditioning was made for a latent of {list(channels.shape[2:])} (frames, height, width) but the "
            f"latent to sample is {list(latent_shape[2:])}; sample the LATENT output of the node that made the known frames"
        )
    clip = None if image.clip is None else image.clip.to(device)

    def model_fn(dit: WanDiT):
        def call(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            batch = x.shape[0]
            inputs = torch.cat([x, channels.expand(batch, -1, -1, -1, -1)], dim=1)  # [B,in_dim,F',h,w]
            image_context = None if clip is None else clip.expand(batch, -1, -1)
            return dit(inputs, timesteps, context, image_context=image_context)

        return call

    return model_fn


def pair_experts(high: SpacetimeModel, low: SpacetimeModel, switch_step: int = -1, cfg_low_noise: float = 0.0) -> SpacetimeModel:
    """A Wan 2.2 A14B expert pair: switched at the published boundary of its kind, or after ``switch_step``
    steps (-1: by the boundary); ``cfg_low_noise`` the low-noise expert's cfg (0: the sampler's)."""
    switch = ExpertSwitch(
        default_boundary(high.config.model_type),
        None if switch_step < 0 else switch_step,
        None if cfg_low_noise == 0.0 else cfg_low_noise,
    )
    return high.with_low_noise_expert(low, switch)


@contextlib.contextmanager
def stepwise_velocity(
    model: SpacetimeModel,
    sigmas: torch.Tensor,
    settings: SolverSettings,
    velocity_of: Callable[[WanDiT, float], VelocityFn],
    use: ModuleUse | None,
) -> Iterator[tuple[VelocityFn, StepStart]]:
    """``with stepwise_velocity(...) as (velocity, step_start):`` the velocity the solver calls, and the
    ``step_start`` that picks the DiT of each step: the model's one DiT, or an expert pair's high-noise expert
    until its switch step and the low-noise one after (at its own cfg when set). ``velocity_of(dit, cfg)`` makes
    one DiT's velocity; ``use`` places a DiT before its first step (a streamed DiT: its resident part), and then
    that DiT's LoRAs are applied to it (``lora.applied``), its blocks streamed (``weight_streaming``) and its step
    cache set up (``step_cache.cached``, empty at the start of every run and expert) until the other expert takes over
    or the block ends, also when it raises: outside the block every DiT holds its own weights and caches nothing."""
    stages = [(model.dit, settings.cfg, model.loras, model.streamer, model.step_cache)]
    steps = len(sigmas) - 1
    first_low = steps
    if model.low_noise is not None:
        low_cfg = settings.cfg if model.switch.cfg_low_noise is None else model.switch.cfg_low_noise
        stages.append((model.low_noise.dit, low_cfg, model.low_noise.loras, model.low_noise.streamer, model.low_noise.step_cache))
        first_low = model.switch.first_low_noise_step(sigmas)
        log.info("Spacetime: %s", model.switch.describe(sigmas))
    current: list[tuple[WanDiT, VelocityFn, StepCacheRun | None]] = []

    with contextlib.ExitStack() as lora_stack:

        def step_start(index: int) -> None:
            dit, cfg, loras, streamer, cache = stages[1] if index >= first_low else stages[0]
            if not current or current[0][0] is not dit:
                lora_stack.close()  # the previous DiT gets its own weights back (and drops its step cache) before it is released
                current.clear()
                if use is not None:
                    with torch.inference_mode(False):  # weights moved here stay normal tensors (ComfyUI patches them later)
                        use(dit if streamer is None else streamer.resident)  # a streamed DiT: its resident part only
                lora_stack.enter_context(applied(dit, loras))
                if streamer is not None:  # after the LoRAs: a streamed block moves with what they put in it
                    lora_stack.enter_context(streamer.streaming())
                run = lora_stack.enter_context(cached(dit, cache, steps))  # a fresh cache per run and per expert
                current[:] = [(dit, velocity_of(dit, cfg), run)]
            if current[0][2] is not None:
                current[0][2].at_step(index)

        def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return current[0][1](x, timesteps)

        yield velocity, step_start
