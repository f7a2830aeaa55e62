"""Prompt schedules: a long video told as segments, each with its own prompt from a start time.

The text, one segment per line (blank lines and lines starting with ``#`` are skipped)::

    0s: a red square moving right
    1.5s: a red square grows
    48: a red square moving left

A start is seconds (``1.5s``, converted at ``fps`` and rounded to a frame) or a frame index (``48`` or ``48f``).
The first segment starts at 0, starts increase, and each segment lasts at least ``transition`` frames (the
span over which one prompt hands over to the next, centred on the change: 0 is a hard cut), so no two
hand-overs overlap. A segment runs until the next one starts, the last to the video's end; a start beyond the
video is refused when the video's length is known (``check_length``).

Weights: at pixel frame ``f`` prompt ``k`` weighs ``ramp(f - s_k) - ramp(f - s_{k+1})`` with ``ramp`` rising from
0 to 1 over ``transition`` frames centred on 0 (a step for 0): non-negative, one at a time away from changes,
summing to one everywhere. A latent frame takes the mean weight of the pixel frames it holds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..model_defs.bundles import SpacetimeConditioning
from ..model_defs.sizes import pixel_frames_of

SYNTAX = "one segment per line, '<start>: <prompt>' with start in seconds ('1.5s') or frames ('24')"
_LINE = re.compile(r"^\s*(?P<time>[^:]*?)\s*:\s*(?P<prompt>.*?)\s*$")
_SECONDS = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*s$")
_FRAMES = re.compile(r"^(\d+)\s*f?$")


@dataclass(frozen=True)
class Segment:
    """One line of a schedule: its prompt from pixel frame ``start``; ``line`` (1-based) and ``time`` (as
    written) for messages."""

    start: int
    prompt: str
    line: int
    time: str

    def where(self) -> str:
        return f"schedule line {self.line} ({self.time!r})"


@dataclass(frozen=True)
class PromptSchedule:
    """Parsed and checked segments in time order, and the hand-over span ``transition`` (pixel frames)."""

    segments: tuple[Segment, ...]
    transition: int
    fps: float

    @property
    def prompts(self) -> tuple[str, ...]:
        """The distinct prompts in order of first use: each is encoded once."""
        return tuple(dict.fromkeys(s.prompt for s in self.segments))

    def check_length(self, frames: int) -> None:
        """ValueError when a segment starts at or after the video's end, or the last is shorter than the transition."""
        last = self.segments[-1]
        if last.start >= frames:
            raise ValueError(
                f"schedule: {last.where()} starts at frame {last.start} but the video has {frames} frames (0 to {frames - 1} "
                f"at {self.fps:g} fps, {(frames - 1) / self.fps:.2f}s): start it before frame {frames}, or make the video longer"
            )
        if len(self.segments) > 1 and frames - last.start < self.transition:
            raise ValueError(
                f"schedule: {last.where()} lasts {frames - last.start} frames to the video's end, shorter than transition="
                f"{self.transition}: start it at frame {frames - self.transition} or earlier, or lower transition"
            )

    def frame_weights(self, pixel_frames: torch.Tensor) -> torch.Tensor:
        """Weights ``[len(prompts), N]`` (fp64) of each distinct prompt at pixel frames ``[N]`` (may be fractional)."""
        f = pixel_frames.to(torch.float64)
        index = {prompt: i for i, prompt in enumerate(self.prompts)}
        weights = torch.zeros(len(index), len(f), dtype=torch.float64)
        for number, segment in enumerate(self.segments):
            rise = torch.ones_like(f) if number == 0 else _ramp(f - segment.start, self.transition)
            following = self.segments[number + 1].start if number + 1 < len(self.segments) else None
            fall = torch.zeros_like(f) if following is None else _ramp(f - following, self.transition)
            weights[index[segment.prompt]] += rise - fall
        return weights

    def latent_weights(self, first: int, count: int, temporal_factor: int, pixel_offset: int = 0) -> torch.Tensor:
        """Weights ``[len(prompts), count]`` of latent frames ``first .. first + count - 1`` of a latent whose pixel
        frame 0 is the video's frame ``pixel_offset``: the mean over the pixel frames each one holds."""
        rows = []
        for latent in range(first, first + count):
            pixels = pixel_offset + torch.tensor(list(pixel_frames_of(latent, temporal_factor)), dtype=torch.float64)
            rows.append(self.frame_weights(pixels).mean(dim=1))
        return torch.stack(rows, dim=1)


def _ramp(offset: torch.Tensor, transition: int) -> torch.Tensor:
    """0 before ``-transition/2``, 1 after ``+transition/2``, linear between; a step at 0 for transition 0."""
    if transition == 0:
        return (offset >= 0).to(offset.dtype)
    return ((offset + transition / 2) / transition).clamp(0.0, 1.0)


def _start_frame(time: str, fps: float, where: str) -> int:
    seconds = _SECONDS.match(time)
    if seconds:
        return int(round(float(seconds.group(1)) * fps))
    frames = _FRAMES.match(time)
    if frames:
        return int(frames.group(1))
    raise ValueError(f"schedule: {where} has start {time!r}, which is not a time: write seconds ('2s', '1.5s') or a frame index ('24')")


def parse_schedule(text: str, fps: float, transition: int) -> PromptSchedule:
    """The schedule in ``text`` (module docstring) at ``fps``; ValueError (one line naming the line and what
    fits) on any fault."""
    if not (isinstance(fps, (int, float)) and fps > 0 and fps == fps and fps != float("inf")):
        raise ValueError(f"fps={fps!r} is not allowed: it must be a finite number > 0")
    if isinstance(transition, bool) or not isinstance(transition, int) or transition < 0:
        raise ValueError(f"transition={transition!r} is not allowed: it must be a whole number of frames >= 0")
    segments: list[Segment] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.strip().startswith("#"):
            continue
        match = _LINE.match(raw)
        if match is None:
            raise ValueError(f"schedule: line {number} ({raw.strip()[:40]!r}) has no ':'; write {SYNTAX}")
        time, prompt = match.group("time"), match.group("prompt")
        where = f"schedule line {number} ({time!r})"
        if not prompt:
            raise ValueError(f"schedule: {where} has no prompt after the ':'; write {SYNTAX}")
        segment = Segment(_start_frame(time, fps, where), prompt, number, time)
        if not segments and segment.start != 0:
            raise ValueError(f"schedule: the first segment, {where}, starts at frame {segment.start}: it must start at 0 ('0s' or '0')")
        if segments:
            before = segments[-1]
            if segment.start < before.start:
                raise ValueError(
                    f"schedule: {where} starts at frame {segment.start}, before {before.where()} at frame {before.start}: "
                    "list the segments in time order"
                )
            if segment.start == before.start:
                raise ValueError(
                    f"schedule: {where} and {before.where()} both start at frame {segment.start}: segments may not "
                    f"overlap; start it at frame {before.start + max(transition, 1)} or later"
                )
            if segment.start - before.start < transition:
                raise ValueError(
                    f"schedule: {where} starts {segment.start - before.start} frames after {before.where()}, so their "
                    f"hand-overs of transition={transition} frames overlap: start it at frame {before.start + transition} or "
                    "later, or lower transition"
                )
        segments.append(segment)
    if not segments:
        raise ValueError(f"schedule is empty: write {SYNTAX}")
    return PromptSchedule(tuple(segments), transition, float(fps))


@dataclass(frozen=True, eq=False)
class EncodedSchedule:
    """SPACETIME_PROMPT_SCHEDULE: a checked schedule and one conditioning per distinct prompt (``schedule.prompts``)."""

    schedule: PromptSchedule
    conditionings: tuple[SpacetimeConditioning, ...]


def single_prompt(positive: SpacetimeConditioning) -> EncodedSchedule:
    """One prompt for the whole video: the schedule a plain ``positive`` makes."""
    return EncodedSchedule(PromptSchedule((Segment(0, "positive", 0, "0"),), 0, 16.0), (positive,))
