"""Sampling several videos of different sizes, each with its own prompts and seed, as packed sequences.

Every item is what ``text_to_video.generate`` would sample for that prompt alone (batch 1, ``denoise`` 1, the
same seed, steps, cfg, shift and solver), to float rounding: its noise is ``initial_noise`` of its own
latent shape and seed, its contexts are padded as ``generate`` pads them, and guidance is the same
``v_neg + cfg * (v_pos - v_neg)``. What changes is how the DiT runs: one packed call per step holds the
positive and the negative sequence of every video of the pack (``WanDiT.forward_packed``).

The solvers of ``flow_matching.sample`` are reused as they are: they only combine the state, the model's
prediction and their history with scalars of the shared noise levels, element by element, so the packed
state - every video's patch vectors end to end, ``[1, T, P]`` - integrates exactly as each video would
alone (UniPC's history is per element, hence per video). The state stays in patch-vector order between
steps; videos are cut out and unpatchified once, at the end.

Memory: a pack costs activations for all its tokens at once, so ``max_tokens`` bounds a pack's tokens
(counted twice with guidance: the negative pass is a second sequence). Items that do not fit one pack are
split over several, first fit in the given order, and one log line says so.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..model_defs.bundles import SpacetimeConditioning, SpacetimeModel
from ..model_defs.flow_matching import NoiseStream, SolverSettings, VelocityFn, sample
from ..model_defs.layers import patchify, unpatchify
from ..model_defs.sizes import patch_grid
from ..model_defs.token_layouts import make_pack, pack_text
from ..model_defs.wan_dit import WanDiT
from .text_to_video import ModuleUse, step_preview, stepwise_velocity

log = logging.getLogger(__name__)

# progress(done_steps, total_steps, preview) over all packs; may raise to interrupt. ``preview``: a callable giving
# the image of the running pack's first video at that step (``step_preview``), or None when the model has no map.
PackProgress = Callable[[int, int, Callable[[], torch.Tensor] | None], None]


@dataclass(frozen=True, eq=False)
class PackedItem:
    """One video to sample: its prompts, raw latent shape ``(1, C, T', H', W')``, seed, and the name
    errors and logs call it by (e.g. ``"line 3 (96x64x9)"``)."""

    positive: SpacetimeConditioning
    negative: SpacetimeConditioning
    latent_shape: tuple[int, ...]
    seed: int
    name: str


def item_tokens(model: SpacetimeModel, item: PackedItem, guided: bool) -> int:
    """Tokens ``item`` takes in a pack: its patch count, twice with guidance (positive and negative)."""
    return math.prod(patch_grid(item.latent_shape, model.config.patch_size)) * (2 if guided else 1)


def plan_packs(tokens: Sequence[int], max_tokens: int, names: Sequence[str]) -> list[list[int]]:
    """Item indices grouped into packs of at most ``max_tokens`` tokens, first fit in the given order;
    an item over the budget on its own is an error naming it."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_pack={max_tokens} is not allowed: it must be >= 1")
    packs: list[list[int]] = []
    room: list[int] = []
    for index, (count, name) in enumerate(zip(tokens, names)):
        if count > max_tokens:
            raise ValueError(
                f"the video on {name} needs {count} tokens (counted twice with cfg != 1: the positive and the "
                f"negative pass), more than max_tokens_per_pack={max_tokens}; raise max_tokens_per_pack or make "
                "that video smaller or shorter"
            )
        target = next((p for p, left in enumerate(room) if count <= left), None)
        if target is None:
            packs.append([])
            room.append(max_tokens)
            target = len(packs) - 1
        packs[target].append(index)
        room[target] -= count
    return packs


def _check_items(model: SpacetimeModel, items: Sequence[PackedItem]) -> None:
    if not items:
        raise ValueError("there are no videos to sample")
    cfg = model.config
    if cfg.in_dim != cfg.out_dim:
        raise ValueError(
            f"model {model.name} is an image-conditioned (I2V) model ({cfg.in_dim} input channels for {cfg.out_dim} "
            "latent ones): its image channels cannot be packed; sample its videos with the Spacetime Sampler, or pack "
            "with a text-to-video model"
        )
    for item in items:
        if len(item.latent_shape) != 5 or item.latent_shape[0] != 1:
            raise ValueError(f"the latent of {item.name} must be [1,C,T,H,W], got {tuple(item.latent_shape)}")
        model.check_latent(item.latent_shape, f"the latent of {item.name}")


def _sample_pack(
    model: SpacetimeModel,
    items: Sequence[PackedItem],
    settings: SolverSettings,
    device: torch.device,
    on_step: Callable[[int, Callable[[], torch.Tensor] | None], None] | None,
    use: ModuleUse | None,
) -> list[torch.Tensor]:
    """One pack: every item's positive (and, with guidance, negative) sequence in one DiT call per step
    (of the expert of that step, for an expert pair)."""
    patch = model.config.patch_size
    guided = settings.guided
    grids = [patch_grid(item.latent_shape, patch) for item in items]
    contexts = [model.text_context(item.positive, "positive", 1, device) for item in items]  # [1,L,D] each
    if guided:
        contexts += [model.text_context(item.negative, "negative", 1, device) for item in items]
    # the state: every video's patch vectors end to end, built from the very tensors generate() starts from
    x0_start = torch.cat([
        patchify(model.latent_format.normalize(torch.zeros(item.latent_shape))[0], patch) for item in items
    ]).to(device)  # [T,P]
    # each item's own noise stream, as generate() draws it: the initial noise, then an "lcm" step's fresh noise per call
    streams = [NoiseStream(tuple(item.latent_shape), item.seed) for item in items]

    def next_noise() -> torch.Tensor:
        return torch.cat([patchify(stream()[0], patch) for stream in streams]).to(device)  # [T,P]

    noise = next_noise()
    with torch.inference_mode():
        pack = make_pack(grids * (2 if guided else 1), model.config.head_dim, device)  # positives, then negatives
        text = pack_text(torch.cat(contexts))  # [N*L, text_dim] (generate() masks no context token either)

        def velocity_of(dit: WanDiT, cfg: float) -> VelocityFn:
            def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
                # x [1,T,P]; timesteps [1], shared by every sequence (one noise schedule)
                tokens = torch.cat([x[0], x[0]]) if guided else x[0]  # [2T or T, P]
                v = dit.forward_packed(pack, tokens, timesteps.expand(pack.num_sequences), text)  # [2T or T, P]
                if not guided:
                    return v[None]
                v_pos, v_neg = v.chunk(2)  # [T,P] each
                return (v_neg + cfg * (v_pos - v_neg))[None]  # [1,T,P]

            return velocity

        sigmas = settings.sigmas()
        first_length = math.prod(grids[0])

        def callback(done: int, _total: int, x0: torch.Tensor) -> None:
            # x0 [1,T,P]: the step's clean estimate; the preview shows the pack's first video
            on_step(done, step_preview(model, unpatchify(x0[0, :first_length], grids[0], patch)[None]))  # [1,C,T',H',W']

        with stepwise_velocity(model, sigmas, settings, velocity_of, use) as (velocity, step_start):
            result = sample(velocity, x0_start[None], noise[None], sigmas, settings.scheduler, None if on_step is None else callback, None, step_start,
                            renoise=lambda: next_noise()[None])[0]  # [T,P]
    lengths = [math.prod(grid) for grid in grids]
    return [
        model.latent_format.denormalize(unpatchify(part, grid, patch)[None]).float().cpu()  # [1,C,T',H',W']
        for part, grid in zip(result.split(lengths), grids)
    ]


def generate_packed(
    model: SpacetimeModel,
    items: Sequence[PackedItem],
    settings: SolverSettings,
    device: torch.device,
    max_tokens: int,
    on_progress: PackProgress | None = None,
    use: ModuleUse | None = None,
) -> list[torch.Tensor]:
    """Raw latents ``[1,C,T',H',W']``, one per item in the items' order, sampled in as few packs of at most
    ``max_tokens`` tokens as first fit finds (``settings.denoise`` must be 1: every item starts from noise)."""
    if settings.denoise != 1.0:
        raise ValueError(f"denoise={settings.denoise} is not allowed for packed sampling: it starts every video from noise (1.0)")
    _check_items(model, items)
    guided = settings.guided
    steps = settings.steps
    tokens = [item_tokens(model, item, guided) for item in items]
    packs = plan_packs(tokens, max_tokens, [item.name for item in items])
    if len(packs) > 1:
        log.info(
            "Spacetime: %d videos need %d tokens%s, more than max_tokens_per_pack=%d; sampling them in %d packs",
            len(items), sum(tokens), " with cfg (positive + negative)" if guided else "", max_tokens, len(packs),
        )
    total = steps * len(packs)
    results: list[torch.Tensor | None] = [None] * len(items)
    for number, members in enumerate(packs):
        on_step = None if on_progress is None else (lambda done, preview, base=number * steps: on_progress(base + done, total, preview))
        latents = _sample_pack(model, [items[i] for i in members], settings, device, on_step, use)
        for index, latent in zip(members, latents):
            results[index] = latent
    return results
