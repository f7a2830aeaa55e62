"""Known latent frames: the mechanism under video prompts (image-to-video, extension, connection).

Mask-based, like Open-Sora's mask strategy, so it works with plain text-to-video weights: some latent
frames of the video to generate are known (VAE-encoded from given pixels); during sampling the model sees
them on their straight path from the noise to the known clean latent, ``x_t = (1 - sigma) * x0 + sigma *
noise`` (the sampler's own initial noise, so a seed still gives one video), its prediction there is
replaced by the known one, and the final sample holds the clean known latents. A per-frame strength
below 1 blends (lerp) instead of replacing; strength 0 is plain text-to-video.

Models trained with per-token timesteps (Wan 2.2 TI2V-5B: ``hold_clean``) see known frames of strength
1 as Wan 2.2 does image-to-video: the clean latent at timestep 0 for the whole run, its velocity 0 (so
every solver keeps it; its data prediction is the known latent). Frames of strength below 1 take the
mask path above on every model.

Where pixel frames land (causal Wan VAE, temporal factor ``tf`` = 4): latent frame 0 holds pixel frame 0
alone, encoded as an image; latent frame j >= 1 holds pixel frames ``1 + tf*(j-1) .. tf*j``, encoded
given the frames before them. Known pixel frames therefore fill whole latent frames only as a run
- from frame 0, of ``1 + tf*m`` frames: encoded as a clip of its own, exactly as the VAE encodes the
  start of any video (image-to-video, forward extension);
- from frame ``1 + tf*i``, of ``tf*m`` frames (a mid-video run: backward extension, the end of a
  connection). Its latents depend on the frames before it, which are the ones being generated. We
  encode the run after a lead-in of its own first frame held still (``MID_RUN_LEAD_IN`` frames): a
  real past the run may follow, and the one the generated frames are pulled towards, since the run's
  latents are what the model sees there. (The alternative, encoding the whole target with placeholder
  frames where the video is unknown, gives the run the placeholders as its past: for a connection, a
  cut from clip A's last frame to clip B.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .sizes import latent_frame_of, series

# Frames of still lead-in before a mid-video run when it is encoded: 1 + tf*k, so the run starts on a
# latent boundary; the lead-in's own latents are dropped.
MID_RUN_LEAD_IN = 1

# IMAGE frames [N,H,W,3] in 0..1 (N = 1 + tf*k) -> raw latent [1,C,N',h,w]
EncodeFn = Callable[[torch.Tensor], torch.Tensor]


def run_latent_frames(start: int, count: int, total_frames: int, temporal_factor: int, what: str = "known frames") -> range:
    """The latent frames that ``count`` known pixel frames from ``start`` fill, in a video of
    ``total_frames``; ValueError saying which starts and lengths are allowed when they do not fill
    whole latent frames or do not fit in the video."""
    tf = temporal_factor
    if count < 1:
        raise ValueError(f"{what}: there are no frames to place")
    if not 0 <= start < total_frames:
        raise ValueError(
            f"{what}: frame index {start} is outside the video, which has {total_frames} frames (0 to {total_frames - 1})"
        )
    if start + count > total_frames:
        raise ValueError(
            f"{what}: {count} frames from frame {start} end at frame {start + count - 1}, after the video's last "
            f"frame {total_frames - 1}; the video has {total_frames} frames"
        )
    layout = f"(a latent frame holds frame 0 alone, then frames 1-{tf}, {tf + 1}-{2 * tf}, ...)"
    if start == 0:
        if (count - 1) % tf:
            raise ValueError(
                f"{what}: {count} frames from frame 0 do not fill whole latent frames {layout}; "
                f"from frame 0 place {series(1, tf)} frames"
            )
        return range(0, 1 + (count - 1) // tf)
    if (start - 1) % tf or count % tf:
        raise ValueError(
            f"{what}: {count} frames from frame {start} do not fill whole latent frames {layout}; "
            f"after frame 0 start at frame {series(1, tf)} and place {series(tf, tf)} frames"
        )
    first = latent_frame_of(start, tf)
    return range(first, first + count // tf)


def encode_run(encode: EncodeFn, frames: torch.Tensor, start: int, temporal_factor: int) -> torch.Tensor:
    """Raw latents ``[1,C,n,h,w]`` of a run of known IMAGE frames ``[N,H,W,3]`` placed at pixel ``start``
    (already checked by ``run_latent_frames``): from frame 0 as a clip of its own, elsewhere after a
    still lead-in of its first frame (module docstring)."""
    if start == 0:
        return encode(frames)
    lead_in = frames[:1].expand(MID_RUN_LEAD_IN, -1, -1, -1)
    latents = encode(torch.cat([lead_in, frames]))
    return latents[:, :, latent_frame_of(MID_RUN_LEAD_IN - 1, temporal_factor) + 1:]


@dataclass(frozen=True, eq=False)
class KnownRun:
    """Known IMAGE frames ``[N,H,W,3]`` to place from pixel frame ``start`` with ``strength`` in 0..1."""

    frames: torch.Tensor
    start: int
    strength: float = 1.0
    label: str = "known frames"


@dataclass(frozen=True, eq=False)
class KnownLatents:
    """Known latent frames of a video to generate.

    ``latents`` ``[1,C,K,h,w]`` raw VAE latents of the known latent frames, in the order of ``indices``
    (their latent frame indices in the target, ascending); ``strengths`` one per known latent frame;
    ``target_shape`` ``(C, F', h, w)`` of the latent to generate and ``target_size`` its pixel
    ``(frames, height, width)`` (for messages).
    """

    latents: torch.Tensor
    indices: tuple[int, ...]
    strengths: tuple[float, ...]
    target_shape: tuple[int, int, int, int]
    target_size: tuple[int, int, int]

    def __post_init__(self):
        if self.latents.ndim != 5 or self.latents.shape[2] != len(self.indices) or len(self.strengths) != len(self.indices):
            raise ValueError("known latents, indices and strengths disagree in length")
        if list(self.indices) != sorted(set(self.indices)) or not all(0 <= i < self.target_shape[1] for i in self.indices):
            raise ValueError(f"known latent frame indices {self.indices} must be distinct, ascending and inside the target")
        if not all(0.0 <= s <= 1.0 for s in self.strengths):
            raise ValueError(f"strengths must be in 0..1, got {self.strengths}")

    def empty_target(self, batch: int = 1) -> torch.Tensor:
        """Zeros ``[batch, C, F', h, w]``: the latent to start text-to-video sampling from."""
        return torch.zeros(batch, *self.target_shape)

    def describe_target(self) -> str:
        frames, height, width = self.target_size
        return f"{frames} frames at {width}x{height} (width x height)"

    def check_target(self, latent_shape: tuple[int, ...]) -> None:
        """ValueError when a latent ``[B,C,F',h,w]`` is not the video these known frames were made for."""
        if tuple(latent_shape[1:]) != self.target_shape:
            raise ValueError(
                f"known_frames were made for a video of {self.describe_target()}, latent shape "
                f"{list(self.target_shape)}, but the latent to sample has shape {list(latent_shape[1:])}; "
                "sample the LATENT output of the node that made the known frames"
            )

    def guide(
        self, normalize: Callable[[torch.Tensor], torch.Tensor], noise: torch.Tensor, hold_clean: bool = False
    ) -> "KnownFramesGuide | None":
        """The sampler's guide in model space (``normalize``: raw -> model latents) for a sampling run
        from ``noise`` ``[B,C,F',h,w]``; None when every strength is 0 (plain text-to-video).
        ``hold_clean``: frames of strength 1 held clean at timestep 0 (models trained so, module docstring)."""
        self.check_target(tuple(noise.shape))
        if not any(self.strengths):
            return None
        frames = self.target_shape[1]
        clean = torch.zeros(1, *self.target_shape, dtype=noise.dtype, device=noise.device)
        clean[:, :, list(self.indices)] = normalize(self.latents.to(device=noise.device, dtype=noise.dtype))
        weight = torch.zeros(1, 1, frames, 1, 1, dtype=noise.dtype, device=noise.device)
        weight[0, 0, list(self.indices)] = torch.tensor(self.strengths, dtype=noise.dtype, device=noise.device).view(-1, 1, 1)
        held = (weight == 1.0) if hold_clean else torch.zeros_like(weight, dtype=torch.bool)
        return KnownFramesGuide(clean.expand_as(noise), weight, noise, held if bool(held.any()) else None)


@dataclass(frozen=True, eq=False)
class KnownFramesGuide:
    """Holds known latent frames during sampling (``flow_matching.Guide``). Tensors on the sampling
    device: ``clean`` ``[B,C,F,h,w]`` known clean latents (model space, anything where unknown),
    ``weight`` ``[1,1,F,1,1]`` strength per latent frame (0 where unknown), ``noise`` the initial noise;
    ``held`` ``[1,1,F,1,1]`` bool, the frames held clean at timestep 0 (None: none are)."""

    clean: torch.Tensor
    weight: torch.Tensor
    noise: torch.Tensor
    held: torch.Tensor | None = None

    def model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Known frames re-noised to ``sigma``: exactly where strength is 1, a lerp below, x where 0;
        held frames clean."""
        x = torch.lerp(x, (1.0 - sigma) * self.clean + sigma * self.noise, self.weight)
        return x if self.held is None else torch.where(self.held, self.clean, x)

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The solver's timesteps ``[B]``; with held frames one per latent frame ``[B, F]``, 0 where held."""
        if self.held is None:
            return t
        return t[:, None] * (~self.held.view(1, -1)).to(t.dtype)  # [B,F]

    def velocity(self, velocity: torch.Tensor) -> torch.Tensor:
        """The velocity of the straight path to the known latent (``noise - x0``) at known frames, so
        every solver keeps them on that path (their data prediction is the known latent); 0 at held
        frames, which stay clean."""
        velocity = torch.lerp(velocity, self.noise - self.clean, self.weight)
        return velocity if self.held is None else velocity.masked_fill(self.held, 0.0)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """The clean known latents in place of the sampled ones (blended by strength)."""
        return torch.lerp(x, self.clean, self.weight)


def known_latents(
    encode: EncodeFn, runs: list[KnownRun], total_frames: int, height: int, width: int,
    temporal_factor: int, target_shape: tuple[int, int, int, int],
) -> KnownLatents:
    """Encode every run and place it: the known latents of a video of ``total_frames`` x ``height`` x
    ``width`` pixels whose latent has ``target_shape``. Runs must not share latent frames."""
    placed: dict[int, tuple[torch.Tensor, float]] = {}
    owner: dict[int, str] = {}
    for run in runs:
        count, run_height, run_width = run.frames.shape[0], run.frames.shape[1], run.frames.shape[2]
        if (run_height, run_width) != (height, width):
            raise ValueError(
                f"{run.label} are {run_width}x{run_height} (width x height) but the video to generate is "
                f"{width}x{height}; resize them to the video's size first, or generate at {run_width}x{run_height}"
            )
        if not 0.0 <= run.strength <= 1.0:
            raise ValueError(f"strength={run.strength} is not allowed: it must be in 0..1")
        span = run_latent_frames(run.start, count, total_frames, temporal_factor, run.label)
        for index in span:
            if index in owner:
                raise ValueError(f"{run.label} and {owner[index]} both fill latent frame {index}; place them apart")
            owner[index] = run.label
        latents = encode_run(encode, run.frames, run.start, temporal_factor)
        for offset, index in enumerate(span):
            placed[index] = (latents[:, :, offset], run.strength)
    indices = tuple(sorted(placed))
    stacked = torch.stack([placed[i][0] for i in indices], dim=2)  # [1,C,K,h,w]
    return KnownLatents(stacked, indices, tuple(placed[i][1] for i in indices), target_shape, (total_frames, height, width))
