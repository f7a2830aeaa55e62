"""An analytic detector for the built-in model's videos: which colour, shape and motion does a clip show?

No learning: the background is the median colour of the frame border, the foreground the pixels far
from it; colour is the nearest palette entry to the foreground's median colour; shape comes from two
geometric ratios of the middle frame's mask (area / bounding box, area / convex hull); motion from the
centroid's path and the area's change between the first and last frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .procedural import COLOURS

FOREGROUND_DISTANCE = 0.22  # RGB distance from the background that counts as foreground
MIN_PIXELS = 12


@dataclass(frozen=True)
class Detection:
    colour: str | None
    shape: str | None
    motion: str | None


def _foreground(frame: np.ndarray) -> np.ndarray:
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(frame - background, axis=-1) > FOREGROUND_DISTANCE


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob (texture speckles and edge noise removed)."""
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, current = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        current += 1
        stack, size = [start], 0
        labels[start] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of pixel squares (corners of each pixel), by Andrew's monotone chain."""
    corners = np.concatenate([points + offset for offset in ((0, 0), (0, 1), (1, 0), (1, 1))])
    pts = sorted(set(map(tuple, corners.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def classify_shape(mask: np.ndarray) -> str | None:
    points = np.argwhere(mask)
    if len(points) < MIN_PIXELS:
        return None
    area = float(len(points))
    (y0, x0), (y1, x1) = points.min(0), points.max(0)
    fill = area / ((y1 - y0 + 1) * (x1 - x0 + 1))
    solidity = area / max(_hull_area(points), 1.0)
    if solidity < 0.8:
        return "star"
    if fill > 0.88:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def classify_colour(frame: np.ndarray, mask: np.ndarray) -> str | None:
    if mask.sum() < MIN_PIXELS:
        return None
    median = np.median(frame[mask], axis=0)
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names])
    return names[int(np.argmin(np.linalg.norm(palette - median, axis=1)))]


def classify_motion(masks: list[np.ndarray], size: int) -> str | None:
    first, last = masks[0], masks[-1]
    if first.sum() < MIN_PIXELS or last.sum() < MIN_PIXELS:
        return None
    area_ratio = last.sum() / first.sum()
    if area_ratio > 1.5:
        return "growing"
    if area_ratio < 1 / 1.5:
        return "shrinking"
    (y0, x0), (y1, x1) = np.argwhere(first).mean(0), np.argwhere(last).mean(0)
    dx, dy = x1 - x0, y1 - y0
    if max(abs(dx), abs(dy)) < size * 0.12:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def detect(video: np.ndarray) -> Detection:
    """``video [T, H, W, 3]`` in 0..1 -> the colour, shape and motion it shows (None where nothing is found)."""
    masks = [_largest_component(_foreground(frame)) for frame in video]
    middle = len(video) // 2
    # colour and shape from the frame where the object is largest (clearest), motion from the path
    clearest = max(range(len(video)), key=lambda t: masks[t].sum())
    return Detection(
        colour=classify_colour(video[clearest], masks[clearest]),
        shape=classify_shape(masks[middle] if masks[middle].sum() >= MIN_PIXELS else masks[clearest]),
        motion=classify_motion([masks[0], masks[-1]], video.shape[2]),
    )
