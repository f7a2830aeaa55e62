"""Sora-style video prompts on a text-to-video model: where given frames go in the video to generate,
and how the generated video joins the given clips afterwards.

- image to video: IMAGE frame(s) at a frame index; the output is the generated video.
- extend forward: the generated video starts with the input's last K frames (K = 1 + 4m: the first
  of them fills the causal VAE's one-frame first latent, so it is encoded like the start of any video);
  joined: the whole input, then the new frames.
- extend backward: the generated video ends with the input's first K frames (K = 4m, whole latent
  frames after frame 0); joined: the new frames, then the whole input.
- connect: the generated video starts with clip A's last K + 1 frames (K = 4m; as forward, the one
  extra frame fills the first latent) and ends with clip B's first K frames (as backward), with the
  generated bridge between; joined: A, the bridge, B. Clips of different sizes are refused (resizing
  would change one clip's framing; the user picks how to resize).

In every joined clip the given frames are the input's own pixels, unchanged; the generated frames
that overlap them (their VAE reconstructions) are dropped. Sources: the Sora technical report
(video prompts), Open-Sora's mask strategy (conditioning a T2V model on known frames by masking).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model_defs.bundles import SpacetimeVAE
from ..model_defs.known_frames import KnownLatents, KnownRun, known_latents
from ..model_defs.sizes import describe_allowed
from .vae_frames import ChunkCallback, encode_frames

DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True, eq=False)
class JoinPlan:
    """The joined clip is ``before`` + generated frames ``[keep_start, keep_stop)`` + ``after``
    (IMAGE frames ``[N,H,W,3]`` or None); ``generated_frames`` is the length of one generated video."""

    generated_frames: int
    keep_start: int
    keep_stop: int
    before: torch.Tensor | None = None
    after: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class KnownFrames:
    """SPACETIME_KNOWN_FRAMES: the known latent frames the sampler holds, and how to join the result."""

    known: KnownLatents
    join: JoinPlan


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise ValueError(f"{name} must be IMAGE frames [N,H,W,3], got shape {tuple(images.shape)}")


def _prompt(
    vae: SpacetimeVAE, runs: list[KnownRun], frames: int, height: int, width: int, join: JoinPlan,
    device: torch.device, on_chunk: ChunkCallback | None,
) -> KnownFrames:
    target_shape = (vae.latent_channels, *vae.video_rules.latent_size(width, height, frames))
    encode: Callable[[torch.Tensor], torch.Tensor] = lambda images: encode_frames(vae, images.float(), device, on_chunk)
    return KnownFrames(known_latents(encode, runs, frames, height, width, vae.temporal_factor, target_shape), join)


def check_frame_index(frame_index: int, frames: int) -> None:
    if not 0 <= frame_index < frames:
        raise ValueError(f"frame_index={frame_index} is outside the video: it has {frames} frames (0 to {frames - 1})")


def image_to_video(
    vae: SpacetimeVAE, images: torch.Tensor, width: int, height: int, frames: int, frame_index: int, strength: float,
    device: torch.device, on_chunk: ChunkCallback | None = None,
) -> KnownFrames:
    """IMAGE ``images`` ``[N,H,W,3]`` placed from ``frame_index`` of a ``frames`` x ``height`` x ``width``
    video. One image away from frame 0 is held still over the 4 frames of the latent frame holding
    ``frame_index`` (a latent frame there spans 4 frames)."""
    _check_images(images, "image")
    tf = vae.temporal_factor
    vae.video_rules.check_size(width, height, frames)
    check_frame_index(frame_index, frames)
    start = frame_index
    if images.shape[0] == 1 and frame_index > 0:
        start = 1 + tf * ((frame_index - 1) // tf)  # first frame of the latent frame holding frame_index
        images = images.expand(tf, -1, -1, -1)
    run = KnownRun(images, start, strength, "image frames")
    return _prompt(vae, [run], frames, height, width, JoinPlan(frames, 0, frames), device, on_chunk)


def extend_video(
    vae: SpacetimeVAE, video: torch.Tensor, direction: str, overlap: int, new_frames: int, strength: float,
    device: torch.device, on_chunk: ChunkCallback | None = None,
) -> KnownFrames:
    """A video of ``overlap + new_frames`` frames that continues ``video`` ``[T,H,W,3]`` (forward: starts
    with its last ``overlap`` frames) or leads into it (backward: ends with its first ``overlap``)."""
    _check_images(video, "video")
    tf = vae.temporal_factor
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not allowed; allowed values: {list(DIRECTIONS)}")
    total_in, height, width = video.shape[0], video.shape[1], video.shape[2]
    if overlap > total_in:
        raise ValueError(f"overlap={overlap} is larger than the input video, which has {total_in} frames")
    # forward: overlap fills latent frames from frame 0 (1 + tf*m); backward: whole later ones (tf*m)
    overlap_first, new_first = (1, tf) if direction == "forward" else (tf, 1)
    if overlap < overlap_first or (overlap - overlap_first) % tf:
        raise ValueError(
            f"overlap={overlap} is not allowed for direction '{direction}': the overlap must fill whole latent frames "
            f"(the first holds 1 frame, each later one {tf}); {describe_allowed(overlap, overlap_first, tf)}"
        )
    if new_frames < new_first or (new_frames - new_first) % tf:
        raise ValueError(
            f"new_frames={new_frames} is not allowed for direction '{direction}' with overlap={overlap}: the generated "
            f"video has overlap + new_frames frames, which must be 1 + {tf}*k; {describe_allowed(new_frames, new_first, tf)}"
        )
    frames = overlap + new_frames
    if direction == "forward":
        run = KnownRun(video[total_in - overlap:], 0, strength, "the input's last overlap frames")
        join = JoinPlan(frames, overlap, frames, before=video)
    else:
        run = KnownRun(video[:overlap], new_frames, strength, "the input's first overlap frames")
        join = JoinPlan(frames, 0, new_frames, after=video)
    return _prompt(vae, [run], frames, height, width, join, device, on_chunk)


def connect_videos(
    vae: SpacetimeVAE, clip_a: torch.Tensor, clip_b: torch.Tensor, overlap: int, bridge_frames: int, strength: float,
    device: torch.device, on_chunk: ChunkCallback | None = None,
) -> KnownFrames:
    """A video of ``1 + 2*overlap + bridge_frames`` frames: A's last ``overlap + 1`` frames, a generated
    bridge, B's first ``overlap`` frames."""
    _check_images(clip_a, "clip_a")
    _check_images(clip_b, "clip_b")
    tf = vae.temporal_factor
    (frames_a, height, width), (frames_b, height_b, width_b) = clip_a.shape[:3], clip_b.shape[:3]
    if (height, width) != (height_b, width_b):
        raise ValueError(
            f"clip_a is {width}x{height} (width x height) but clip_b is {width_b}x{height_b}: connecting needs both "
            "clips at one size; resize one of them first (e.g. with an image scale node)"
        )
    if overlap < tf or overlap % tf:
        raise ValueError(
            f"overlap={overlap} is not allowed: each clip's overlap must fill whole latent frames of {tf} frames; "
            f"{describe_allowed(overlap, tf, tf)}"
        )
    for name, count, needed in (("clip_a", frames_a, overlap + 1), ("clip_b", frames_b, overlap)):
        if needed > count:
            raise ValueError(
                f"overlap={overlap} is larger than {name}, which has {count} frames (it needs {needed}: "
                "clip_a gives its last overlap + 1 frames, clip_b its first overlap frames)"
            )
    if bridge_frames < tf or bridge_frames % tf:
        raise ValueError(
            f"bridge_frames={bridge_frames} is not allowed: the bridge must fill whole latent frames of {tf} frames; "
            f"{describe_allowed(bridge_frames, tf, tf)}"
        )
    frames = 1 + 2 * overlap + bridge_frames
    runs = [
        KnownRun(clip_a[frames_a - overlap - 1:], 0, strength, "clip_a's last frames"),
        KnownRun(clip_b[:overlap], frames - overlap, strength, "clip_b's first frames"),
    ]
    join = JoinPlan(frames, overlap + 1, frames - overlap, before=clip_a, after=clip_b)
    return _prompt(vae, runs, frames, height, width, join, device, on_chunk)


def join_video(images: torch.Tensor, prompt: KnownFrames) -> torch.Tensor:
    """Decoded generated IMAGE frames (videos of ``join.generated_frames`` one after another) joined with
    the given clips: every video of the batch becomes ``before + kept frames + after``."""
    _check_images(images, "images")
    plan = prompt.join
    count, height, width = images.shape[:3]
    if count % plan.generated_frames:
        raise ValueError(
            f"images has {count} frames but the known_frames were made for videos of {plan.generated_frames} frames; "
            "connect the decoded output of the sampler that used these known_frames"
        )
    given = next((t for t in (plan.before, plan.after) if t is not None), None)
    if given is not None and tuple(given.shape[1:3]) != (height, width):
        raise ValueError(
            f"images are {width}x{height} (width x height) but the known_frames' clips are "
            f"{given.shape[2]}x{given.shape[1]}; decode the sampler's output with the VAE that encoded them"
        )
    pieces = []
    for video in images.split(plan.generated_frames):
        pieces += [t.to(images) for t in (plan.before,) if t is not None]
        pieces.append(video[plan.keep_start: plan.keep_stop])
        pieces += [t.to(images) for t in (plan.after,) if t is not None]
    return torch.cat(pieces)
