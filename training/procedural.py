"""Procedural captioned videos: coloured shapes moving over plain or textured backgrounds.

Deterministic from a seed. Clips are ``[T, H, W, 3]`` float32 in 0..1 with the ground truth
(shape, colour, motion, background) and an English caption drawn from paraphrase templates. Some
shape x colour x motion combinations and some caption templates are held out of training, for
measuring whether the model follows prompts it never saw.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.70, 0.24),
    "blue": (0.16, 0.32, 0.88),
    "yellow": (0.92, 0.84, 0.16),
    "purple": (0.60, 0.24, 0.80),
    "orange": (0.95, 0.55, 0.12),
    "cyan": (0.16, 0.80, 0.84),
    "pink": (0.96, 0.52, 0.72),
}
MOTIONS = ("left", "right", "up", "down", "growing", "shrinking", "still")
BACKGROUNDS = {  # name -> (base colour, texture)
    "grey": ((0.5, 0.5, 0.5), None),
    "black": ((0.06, 0.06, 0.06), None),
    "white": ((0.94, 0.94, 0.94), None),
    "dark blue": ((0.08, 0.10, 0.22), None),
    "striped": ((0.42, 0.42, 0.42), "stripes"),
    "checkered": ((0.55, 0.55, 0.55), "checks"),
}
_MOTION_PHRASES = {
    "left": ("drifts to the left", "moving left", "slides left", "travels to the left", "goes left"),
    "right": ("drifts to the right", "moving right", "slides right", "travels to the right", "goes right"),
    "up": ("rises", "moving up", "floats upward", "travels up", "goes up"),
    "down": ("falls", "moving down", "sinks downward", "travels down", "goes down"),
    "growing": ("grows", "getting bigger", "expands", "growing larger", "swells up"),
    "shrinking": ("shrinks", "getting smaller", "contracts", "shrinking away", "dwindles"),
    "still": ("stays still", "not moving", "sits motionless", "resting in place", "holds still"),
}
_TEMPLATES = (
    "a {colour} {shape} {motion}",
    "{size} {colour} {shape} {motion} over a {background} background",
    "a {colour} {shape} {motion} on a {background} background",
    "{background} background, a {colour} {shape} {motion}",
    "the {colour} {shape} {motion}",
    "one {size} {colour} {shape}, {motion}",
)
HELD_OUT_TEMPLATES = (1, 4)  # indices into _TEMPLATES never used in training
HELD_OUT_MOTION_PHRASES = 4  # the last phrase of each motion is never used in training


def held_out_combinations() -> tuple[tuple[str, str, str], ...]:
    """28 (shape, colour, motion) triples never shown in training, each shape x motion pair once
    (4 x 7 = 28), colours spread over them: every class of every attribute is evaluated."""
    colours = tuple(COLOURS)
    return tuple(sorted((SHAPES[i % 4], colours[(3 * i) % 8], MOTIONS[i % 7]) for i in range(28)))


HELD_OUT = held_out_combinations()


@dataclass(frozen=True)
class ClipSpec:
    shape: str
    colour: str
    motion: str
    background: str
    caption: str
    seed: int

    @property
    def combo_held_out(self) -> bool:
        return (self.shape, self.colour, self.motion) in HELD_OUT


def _caption(rng: random.Random, shape: str, colour: str, motion: str, background: str, held_out: bool) -> str:
    templates = [i for i in range(len(_TEMPLATES)) if (i in HELD_OUT_TEMPLATES) == held_out]
    phrases = _MOTION_PHRASES[motion]
    phrase = phrases[HELD_OUT_MOTION_PHRASES] if held_out and rng.random() < 0.5 else phrases[rng.randrange(HELD_OUT_MOTION_PHRASES)]
    template = _TEMPLATES[rng.choice(templates)]
    return template.format(colour=colour, shape=shape, motion=phrase, background=background, size=rng.choice(("small", "little", "bright")))


def sample_spec(seed: int, held_out: bool = False) -> ClipSpec:
    """A training clip (never a held-out combination or phrasing) or, with ``held_out``, an evaluation one."""
    rng = random.Random(seed)
    if held_out:
        shape, colour, motion = HELD_OUT[rng.randrange(len(HELD_OUT))]
    else:
        while (combo := (rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(MOTIONS))) in HELD_OUT:
            pass
        shape, colour, motion = combo
    background = rng.choice(tuple(BACKGROUNDS))
    return ClipSpec(shape, colour, motion, background, _caption(rng, shape, colour, motion, background, held_out), seed)


def recaption(spec: ClipSpec, seed: int, **changes: str) -> str:
    """Another caption of the same clip (same shape, colour, motion and background), drawn from ``seed``
    among the templates and phrasings of the clip's own split (training or held out). ``changes`` (e.g.
    ``motion="left"``) change attributes and nothing else: the same template, size word and phrase slot,
    so only the changed attributes' words differ from the caption without them."""
    changed = replace(spec, **changes)
    return _caption(random.Random(seed), changed.shape, changed.colour, changed.motion, changed.background, spec.combo_held_out)


# Each motion played backwards: the clips' motions are symmetric in time (``render``), so a clip reversed
# frame by frame is the clip of the opposite motion.
BACKWARDS = {"left": "right", "right": "left", "up": "down", "down": "up", "growing": "shrinking", "shrinking": "growing",
             "still": "still"}


def _background(name: str, height: int, width: int, rng: random.Random) -> np.ndarray:
    base, texture = BACKGROUNDS[name]
    image = np.ones((height, width, 3), np.float32) * np.array(base, np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if texture == "stripes":
        period, angle = rng.uniform(10, 18), rng.uniform(0, math.pi)
        wave = np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period)
        image += 0.08 * wave[..., None]
    elif texture == "checks":
        cell = rng.choice((8, 16))
        image += np.where(((x // cell + y // cell) % 2) == 0, 0.1, -0.1)[..., None]
    return np.clip(image, 0, 1)


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int, supersample: int = 4, height: int | None = None) -> np.ndarray:
    """Anti-aliased coverage ``[height, size]`` (``height`` defaults to ``size``) of a shape centred at
    (cx, cy) with the given radius."""
    height = size if height is None else height
    y, x = (np.mgrid[0:height * supersample, 0:size * supersample].astype(np.float32) + 0.5) / supersample
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= radius * radius
    elif shape == "square":
        half = radius * 0.85
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # pointing up, centred on its bounding box
        half = radius
        top, bottom = -radius, radius * 0.8
        width_at = (dy - top) / (bottom - top) * half
        inside = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= width_at)
    elif shape == "star":  # five points: radius varies between outer and inner with the angle
        angle = np.arctan2(dy, dx) + math.pi / 2
        sector = (angle % (2 * math.pi / 5)) / (2 * math.pi / 5)  # 0..1 within one point
        outer, inner = radius * 1.1, radius * 0.45
        edge = inner + (outer - inner) * np.abs(1 - 2 * sector)
        inside = np.sqrt(dx * dx + dy * dy) <= edge
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {SHAPES}")
    return inside.reshape(height, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)


def render(spec: ClipSpec, frames: int = 17, size: int = 64, coverage_out: np.ndarray | None = None,
           height: int | None = None) -> np.ndarray:
    """The clip ``[frames, height, size, 3]`` float32 in 0..1 (``size`` wide, ``height`` tall, by default
    square); ``coverage_out [frames, height, size]``, when given, receives the shape's coverage (0
    background .. 1 shape), e.g. to weight a training loss. The shape scales with the shorter side; a
    motion travels the same fraction of the side it moves along."""
    height = size if height is None else height
    rng = random.Random(spec.seed * 7919 + 1)
    background = _background(spec.background, height, size, rng)
    colour = np.array(COLOURS[spec.colour], np.float32) * rng.uniform(0.9, 1.05)
    radius = min(size, height) * rng.uniform(0.16, 0.22)
    travel = rng.uniform(0.35, 0.5)
    cx, cy = size / 2 + rng.uniform(-4, 4), height / 2 + rng.uniform(-4, 4)
    tx, ty = travel * size / 2, travel * height / 2
    start = {"left": (tx, 0), "right": (-tx, 0), "up": (0, ty), "down": (0, -ty)}.get(spec.motion, (0, 0))
    video = np.empty((frames, height, size, 3), np.float32)
    for t in range(frames):
        progress = t / max(frames - 1, 1)
        x, y, r = cx + start[0], cy + start[1], radius
        if spec.motion in ("left", "right", "up", "down"):
            x, y = cx + start[0] * (1 - 2 * progress), cy + start[1] * (1 - 2 * progress)
        elif spec.motion == "growing":
            r = radius * (0.55 + 0.9 * progress)
        elif spec.motion == "shrinking":
            r = radius * (1.45 - 0.9 * progress)
        coverage = shape_mask(spec.shape, x, y, r, size, height=height)[..., None]
        if coverage_out is not None:
            coverage_out[t] = coverage[..., 0]
        video[t] = background * (1 - coverage) + np.clip(colour, 0, 1) * coverage
    return video
