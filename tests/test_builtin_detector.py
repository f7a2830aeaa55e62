"""The analytic detector behind the built-in model's quality numbers, checked on ground-truth clips of
every class, so the metric itself can be trusted to fail when a video is wrong."""
import itertools

import numpy as np
import pytest

from comfyui_spacetime.training.detector import detect
from comfyui_spacetime.training.procedural import (
    BACKGROUNDS, COLOURS, HELD_OUT, MOTIONS, SHAPES, ClipSpec, render, sample_spec,
)

PLAIN = ("grey", "black", "dark blue")


def _clip(shape, colour, motion, background="grey", seed=0):
    return render(ClipSpec(shape, colour, motion, background, "", seed))


@pytest.mark.parametrize("shape, motion", list(itertools.product(SHAPES, MOTIONS)))
def test_every_shape_and_motion_is_recognised(shape, motion):
    for seed, background in enumerate(PLAIN):
        found = detect(_clip(shape, "red" if seed % 2 else "cyan", motion, background, seed))
        assert (found.shape, found.motion) == (shape, motion), (background, found)


@pytest.mark.parametrize("colour", sorted(COLOURS))
def test_every_colour_is_recognised(colour):
    for seed, background in enumerate(BACKGROUNDS):
        if background == "white" and colour in ("yellow", "cyan", "pink"):
            continue  # light colours on white: not in the palette's distinguishable set there either
        assert detect(_clip("square", colour, "still", background, seed)).colour == colour, background


def test_an_empty_or_wrong_video_does_not_pass():
    blank = np.full((17, 64, 64, 3), 0.5, np.float32)
    assert detect(blank).shape is None and detect(blank).colour is None and detect(blank).motion is None
    found = detect(_clip("circle", "blue", "left"))
    assert (found.colour, found.shape, found.motion) != ("red", "square", "right")
    reversed_clip = _clip("circle", "blue", "left")[::-1]
    assert detect(reversed_clip).motion == "right"


def test_accuracy_on_random_training_clips():
    specs = [sample_spec(seed) for seed in range(60)]
    hits = np.array([[d.colour == s.colour, d.shape == s.shape, d.motion == s.motion]
                     for s, d in ((s, detect(render(s))) for s in specs)])
    assert hits.mean(axis=0).min() >= 0.93, hits.mean(axis=0)


def test_held_out_combinations_never_appear_in_training_and_cover_every_class():
    seen = {(s.shape, s.colour, s.motion) for s in (sample_spec(seed) for seed in range(3000))}
    assert not seen & set(HELD_OUT)
    assert {c[0] for c in HELD_OUT} == set(SHAPES) and {c[2] for c in HELD_OUT} == set(MOTIONS)
    assert {c[1] for c in HELD_OUT} == set(COLOURS)
    held_captions = {sample_spec(seed, held_out=True).caption for seed in range(200)}
    train_captions = {s.caption for s in (sample_spec(seed) for seed in range(3000))}
    assert not held_captions & train_captions
