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

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..model_defs.bundles import ImageCondition, SpacetimeClipVision, SpacetimeModel, SpacetimeVAE
from ..model_defs.wan_image import image_condition as image_condition_channels
from ..model_defs.known_frames import KnownLatents, KnownRun, known_latents
from ..model_defs.sizes import describe_allowed
from .vae_frames import ChunkCallback, encode_frames

DIRECTIONS = ("forward", "backward")
FITS = ("crop", "pad", "stretch")  # how images of another size are resized to the video's


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
class GivenFrames:
    """IMAGE frames ``[N,H,W,3]`` at their exact pixel frame index ``start`` in the video to generate."""

    frames: torch.Tensor
    start: int


@dataclass(frozen=True, eq=False)
class KnownFrames:
    """SPACETIME_KNOWN_FRAMES: the known latent frames the sampler holds, and how to join the result.

    For image-conditioned (I2V) models the sampler conditions on ``given`` instead: the frames as the
    user placed them, encoded by ``vae`` into the model's image channels (``image_condition``), with
    ``clip`` the CLIP vision features of the given images when a CLIP vision model was connected."""

    known: KnownLatents
    join: JoinPlan
    given: tuple[GivenFrames, ...] = ()
    vae: SpacetimeVAE | None = None
    clip: torch.Tensor | None = None


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise ValueError(f"{name} must be IMAGE frames [N,H,W,3], got shape {tuple(images.shape)}")


def _prompt(
    vae: SpacetimeVAE, runs: list[KnownRun], frames: int, height: int, width: int, join: JoinPlan,
    device: torch.device, on_chunk: ChunkCallback | None, given: list[GivenFrames] | None = None,
) -> KnownFrames:
    """``given``: the frames at their exact places when they differ from the latent-aligned ``runs``."""
    target_shape = (vae.latent_channels, *vae.video_rules.latent_size(width, height, frames))
    encode: Callable[[torch.Tensor], torch.Tensor] = lambda images: encode_frames(vae, images.float(), device, on_chunk)
    known = known_latents(encode, runs, frames, height, width, vae.temporal_factor, target_shape)
    given = given if given is not None else [GivenFrames(run.frames, run.start) for run in runs if run.strength > 0]
    return KnownFrames(known, join, tuple(given), vae)


def with_clip_features(prompt: KnownFrames, clip_vision: SpacetimeClipVision) -> KnownFrames:
    """``prompt`` with the CLIP vision features ``[n, tokens, dim]`` of its first given frame and, when another
    frame is given later, of the last one (FLF2V models take both, I2V models the first)."""
    if not prompt.given:
        return prompt
    first, last = prompt.given[0], prompt.given[-1]
    images = [first.frames[:1]]
    if last.start + last.frames.shape[0] - 1 > first.start:
        images.append(last.frames[-1:])
    features = clip_vision.encode(torch.cat(images))  # [n,tokens,dim], on the encoder's device
    return dataclasses.replace(prompt, clip=features.float().cpu())


def check_image_prompt(model: SpacetimeModel, prompt: KnownFrames | None) -> KnownFrames:
    """The known frames, when an image-conditioned model can take them; a one-line error naming what is missing."""
    kind = model.config.model_type
    if prompt is None or not prompt.given:
        raise ValueError(
            f"model {model.name} is an image-to-video ({kind}) model: it needs an image; connect Spacetime Image To "
            "Video's latent and known_frames to the sampler (strength above 0)"
        )
    strengths = set(prompt.known.strengths) - {0.0, 1.0}
    if strengths:
        raise ValueError(
            f"strength={min(strengths)} is not allowed with the image-to-video model {model.name}: its image channels "
            "take given frames whole; allowed values: 1 (or 0 to ignore them)"
        )
    if prompt.vae is None:
        raise ValueError("known_frames carry no VAE to encode the given frames; make them with a Spacetime prompt node")
    if model.needs_clip:
        if prompt.clip is None:
            raise ValueError(
                f"model {model.name} ({kind}) needs CLIP vision features of the image: connect Spacetime Load CLIP Vision "
                "(clip_vision_h.safetensors, models/clip_vision) to Spacetime Image To Video's clip_vision input"
            )
        if kind == "flf2v" and prompt.clip.shape[0] < 2:
            raise ValueError(
                f"model {model.name} is a first-last-frame (flf2v) model: it needs a first and a last image; connect "
                "last_image on Spacetime Image To Video"
            )
    return prompt


def image_condition(
    model: SpacetimeModel, prompt: KnownFrames | None, device: torch.device, on_chunk: ChunkCallback | None = None
) -> ImageCondition:
    """What an image-conditioned model takes besides its noisy latents: the given frames at their places in a
    mid-grey video of the target's length, VAE-encoded into the model's latent space, behind the mask of the
    known pixel frames (``wan_image.image_condition``); and the CLIP features its CLIP branch needs (the first
    image's; FLF2V: the first and the last image's)."""
    prompt = check_image_prompt(model, prompt)
    frames, height, width = prompt.known.target_size
    video = torch.full((frames, height, width, 3), 0.5)  # mid-grey, 0 in the VAE's -1..1, where nothing is given
    known_pixels: list[int] = []
    for given in prompt.given:
        video[given.start: given.start + given.frames.shape[0]] = given.frames.float()
        known_pixels += range(given.start, given.start + given.frames.shape[0])
    raw = encode_frames(prompt.vae, video, device, on_chunk)  # [1,C,F',h,w]
    channels = image_condition_channels(model.latent_format.normalize(raw), known_pixels, prompt.vae.temporal_factor)
    clip = None
    if model.needs_clip:
        clip = prompt.clip[[0, -1]] if model.config.model_type == "flf2v" else prompt.clip[:1]  # [n,tokens,dim]
        clip = clip.reshape(1, -1, clip.shape[-1])  # [1, n*tokens, dim]
    return ImageCondition(channels.cpu(), clip)


def fit_frames(images: torch.Tensor, width: int, height: int, fit: str, name: str = "image") -> torch.Tensor:
    """IMAGE frames ``[N,H,W,3]`` at ``width`` x ``height``: ``crop`` scales to cover and cuts the middle (as
    ComfyUI's Wan nodes do), ``pad`` scales to fit and pads with black, ``stretch`` scales each side alone;
    aspect kept but for ``stretch``. Frames already that size are returned as they are."""
    _check_images(images, name)
    if fit not in FITS:
        raise ValueError(f"resize={fit!r} is not allowed; allowed values: {list(FITS)}")
    source_height, source_width = images.shape[1], images.shape[2]
    if (source_height, source_width) == (height, width):
        return images
    pixels = images.movedim(-1, 1).float()  # [N,3,H,W]
    if fit == "stretch":
        scaled_size = (height, width)
    else:
        choose = max if fit == "crop" else min
        scale = choose(height / source_height, width / source_width)
        scaled_size = (max(1, round(source_height * scale)), max(1, round(source_width * scale)))
        if fit == "crop":
            scaled_size = (max(scaled_size[0], height), max(scaled_size[1], width))
        else:
            scaled_size = (min(scaled_size[0], height), min(scaled_size[1], width))
    scaled = F.interpolate(pixels, size=scaled_size, mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)
    top, left = (scaled_size[0] - height) // 2, (scaled_size[1] - width) // 2
    if fit == "crop":
        scaled = scaled[:, :, top: top + height, left: left + width]
    elif fit == "pad":
        out = scaled.new_zeros(scaled.shape[0], 3, height, width)
        out[:, :, -top: -top + scaled_size[0], -left: -left + scaled_size[1]] = scaled
        scaled = out
    return scaled.movedim(1, -1).to(images.dtype)


def check_frame_index(frame_index: int, frames: int) -> None:
    if not 0 <= frame_index < frames:
        raise ValueError(f"frame_index={frame_index} is outside the video: it has {frames} frames (0 to {frames - 1})")


def image_to_video(
    vae: SpacetimeVAE, images: torch.Tensor, width: int, height: int, frames: int, frame_index: int, strength: float,
    device: torch.device, on_chunk: ChunkCallback | None = None, last_image: torch.Tensor | None = None,
    fit: str = "crop",
) -> KnownFrames:
    """IMAGE ``images`` ``[N,H,W,3]`` placed from ``frame_index`` of a ``frames`` x ``height`` x ``width``
    video (and ``last_image`` ``[1,H,W,3]`` as its last frame: first and last frame to video), resized to
    the video's size by ``fit`` (``fit_frames``). One image away from frame 0 is held still over the 4
    frames of the latent frame holding ``frame_index`` (a latent frame there spans 4 frames); image-
    conditioned models get it at ``frame_index`` exactly."""
    _check_images(images, "image")
    vae.video_rules.check_size(width, height, frames)
    check_frame_index(frame_index, frames)
    images = fit_frames(images, width, height, fit)
    runs, given = [_image_run(images, frame_index, strength, vae.temporal_factor, "image frames")], [GivenFrames(images, frame_index)]
    if last_image is not None:
        if last_image.ndim != 4 or last_image.shape[0] != 1:
            raise ValueError(f"last_image must be one IMAGE [1,H,W,3], got shape {tuple(last_image.shape)}")
        last_image = fit_frames(last_image, width, height, fit, "last_image")
        if frame_index + images.shape[0] > frames - 1:
            raise ValueError(
                f"last_image goes on the last frame ({frames - 1}) but the image frames already reach it (frame_index="
                f"{frame_index}, {images.shape[0]} frames); lower frame_index or make the video longer"
            )
        runs.append(_image_run(last_image, frames - 1, strength, vae.temporal_factor, "last_image"))
        given.append(GivenFrames(last_image, frames - 1))
    given = given if strength > 0 else []
    return _prompt(vae, runs, frames, height, width, JoinPlan(frames, 0, frames), device, on_chunk, given)


def _image_run(images: torch.Tensor, frame_index: int, strength: float, tf: int, label: str) -> KnownRun:
    """Frames from ``frame_index`` as a known run; one image away from frame 0 fills the latent frame holding it."""
    if images.shape[0] == 1 and frame_index > 0:
        start = 1 + tf * ((frame_index - 1) // tf)  # first frame of the latent frame holding frame_index
        return KnownRun(images.expand(tf, -1, -1, -1), start, strength, label)
    return KnownRun(images, frame_index, strength, label)


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
