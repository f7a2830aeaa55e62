"""Size rules: which videos a model takes and what latent grid they give, in plain integers.

A causal video VAE with temporal factor ``tf`` and spatial factor ``sf`` turns ``frames = 1 + tf*k``
frames of ``height x width`` pixels into ``1 + k`` latent frames of ``height/sf x width/sf``; a DiT then
cuts the latent into ``(pt, ph, pw)`` patches. Every factor comes from the loaded models (Wan 2.1's VAE
is 8x8x4, Wan 2.2's 16x16x4); this module holds the arithmetic and the messages, once. Where pixel frames
land in the latent: latent frame 0 holds pixel frame 0 alone, latent frame ``j >= 1`` holds pixel frames
``1 + tf*(j-1) .. tf*j``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# Every supported DiT family cuts latents into 2x2 patches in space: the size a video must have before a
# DiT is known (Empty Latent, video prompts); a sampler checks its own model's patch.
SPATIAL_PATCH = 2


def series(first: int, step: int) -> str:
    """``"1, 5, 9, ..."``: how messages list an arithmetic series of allowed values."""
    return f"{first}, {first + step}, {first + 2 * step}, ..."


def nearest_allowed(value: int, first: int, step: int) -> list[int]:
    """The values of ``first, first + step, ...`` nearest ``value``: itself when allowed, the first when
    below it, else the two around it."""
    if value <= first:
        return [first]
    below = first + (value - first) // step * step
    return [value] if below == value else [below, below + step]


def describe_allowed(value: int, first: int, step: int, below: int | None = None) -> str:
    """``"allowed: 1, 5, 9, ... (nearest: 13, 17)"``, optionally only values under ``below``."""
    nearest = nearest_allowed(value, first, step)
    upto = ""
    if below is not None:
        nearest = [v for v in nearest if v < below] or [first + (below - 1 - first) // step * step]
        upto = f" below {below}"
    return f"allowed: {series(first, step)}{upto} (nearest: {', '.join(map(str, nearest))})"


def latent_frame_of(pixel_frame: int, temporal_factor: int) -> int:
    """The latent frame holding ``pixel_frame``: 0 -> 0, then ``tf`` pixel frames per latent frame."""
    return 0 if pixel_frame <= 0 else (pixel_frame + temporal_factor - 1) // temporal_factor


def pixel_frames_of(latent_frame: int, temporal_factor: int) -> range:
    """The pixel frames latent frame ``latent_frame`` holds."""
    if latent_frame == 0:
        return range(0, 1)
    return range(1 + temporal_factor * (latent_frame - 1), 1 + temporal_factor * latent_frame)


def patch_grid(latent_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(F', H', W') of a latent ``[..., F, H, W]``; ValueError if a side is not a multiple of the patch."""
    frames, height, width = (int(n) for n in latent_shape[-3:])
    pt, ph, pw = patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(
            f"latent size {frames}x{height}x{width} (frames x height x width) is not a multiple of the patch "
            f"{tuple(patch_size)}"
        )
    return frames // pt, height // ph, width // pw


@dataclass(frozen=True)
class SizeRules:
    """The sizes a VAE (and, with ``patch``, a DiT on its latents) takes: width a multiple of
    ``sf * pw``, height of ``sf * ph``, frames ``1 + tf*k`` with the latent frames a multiple of ``pt``."""

    spatial_factor: int
    temporal_factor: int
    patch: tuple[int, int, int] = (1, 1, 1)

    def with_patch(self, patch: Sequence[int]) -> "SizeRules":
        return SizeRules(self.spatial_factor, self.temporal_factor, tuple(int(p) for p in patch))

    @property
    def width_unit(self) -> int:
        return self.spatial_factor * self.patch[2]

    @property
    def height_unit(self) -> int:
        return self.spatial_factor * self.patch[1]

    @property
    def unit_note(self) -> str:
        return "(VAE factor x patch size)" if self.patch[1:] != (1, 1) else "(the VAE's spatial factor)"

    def check_side(self, name: str, value: int) -> None:
        unit = self.width_unit if name == "width" else self.height_unit
        if value < unit or value % unit:
            raise ValueError(
                f"{name}={value} is not allowed: it must be a multiple of {unit} {self.unit_note}; "
                f"nearest allowed values: {nearest_allowed(value, unit, unit)}"
            )

    def check_frames(self, frames: int) -> None:
        tf, pt = self.temporal_factor, self.patch[0]
        step = tf * pt
        if frames < 1 or (frames - 1) % step:
            raise ValueError(
                f"frames={frames} is not allowed: it must be 1 + {step}*k ({series(1, step)}); "
                f"nearest allowed values: {nearest_allowed(frames, 1, step)}"
            )

    def check_size(self, width: int, height: int, frames: int) -> None:
        """ValueError naming the first offending input and its nearest allowed values."""
        self.check_side("width", width)
        self.check_side("height", height)
        self.check_frames(frames)

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_factor

    def latent_size(self, width: int, height: int, frames: int) -> tuple[int, int, int]:
        """(T', h, w) of a checked video size."""
        self.check_size(width, height, frames)
        sf = self.spatial_factor
        return self.latent_frames(frames), height // sf, width // sf
