"""The invisible watermark of every video and image the pack writes: a fixed 32-bit payload embedded in each
frame with the ``blind-watermark`` library (DWT, then DCT + SVD quantisation of 4x4 blocks; Guo Fei,
github.com/guofei9987/blind_watermark), chosen over ``invisible-watermark`` by ``benchmarks/provenance.py``
(BENCHMARKS.md, "Provenance").

Frames of any size are marked on one canonical 64x64 grid: the frame is resampled to 64x64, the library
marks that, and the difference (the mark) is resampled back to the frame's size and added. Detection
resamples any frame to 64x64, reads the bits of every frame and takes the per-bit majority over frames. The
mark lives in the DWT's low band (32x32 detail), so a 0.5x resize keeps it and the reader needs no original
size. Frames smaller than ``MIN_SIDE`` are not marked (the mark would not survive their resampling).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io

import numpy as np

# "Spacetime generated" as a 32-bit pattern: 16 ones, no long runs (a flat frame reads all zeros or all ones)
PAYLOAD = tuple(int(bit) for bit in "10110010011101001100101101000111")
GRID = 64  # the canonical side the mark is embedded and read at
MIN_SIDE = 32  # smaller frames are left unmarked
# the least matching bits (of 32) to call the mark present: unmarked clips match 16 on average; 26 or more by
# chance has a probability of 3e-4 for random bits (benchmarks/provenance.py measures false positives on clips)
PRESENT_AT = 26
# quantisation steps of the library's two singular values (its defaults: 36, 20); larger: more robust, lower PSNR
STRENGTH = (36, 20)
LIBRARY = "blind-watermark"


def available() -> bool:
    """Whether the library (and OpenCV and PyWavelets under it) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("blind_watermark", "cv2", "pywt"))


def _watermark():
    import multiprocessing

    # blind_watermark.pool calls multiprocessing.set_start_method('fork') at import: a process-wide switch (and a
    # RuntimeError once anything in the process has fixed the start method). We run it in its serial mode, which
    # needs no processes, so its import runs with that call made a no-op.
    set_start_method = multiprocessing.set_start_method
    multiprocessing.set_start_method = lambda *args, **kwargs: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the library prints a banner at first use, and its progress
            from blind_watermark import WaterMark

            mark = WaterMark(password_wm=1, password_img=1)
    finally:
        multiprocessing.set_start_method = set_start_method
    mark.bwm_core.d1, mark.bwm_core.d2 = STRENGTH
    return mark


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width < image.shape[1] and height < image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def markable(height: int, width: int) -> bool:
    return min(height, width) >= MIN_SIDE


def embed(frames: np.ndarray) -> np.ndarray:
    """uint8 frames ``[N,H,W,3]`` (RGB) -> the same frames with the mark; frames below ``MIN_SIDE`` unchanged.
    Deterministic: the same frames give the same result."""
    _, height, width, _ = frames.shape
    if not markable(height, width):
        return frames
    marked = np.empty_like(frames)
    for index, frame in enumerate(frames):
        grid = _resize(frame.astype(np.float32), GRID, GRID).round().clip(0, 255)
        mark = _watermark()
        with contextlib.redirect_stdout(io.StringIO()):
            mark.read_img(img=grid[..., ::-1].copy())  # it takes OpenCV's BGR order
            mark.read_wm(list(map(bool, PAYLOAD)), mode="bit")
            out = mark.embed()[..., ::-1]
        delta = _resize((out - grid).astype(np.float32), width, height)
        marked[index] = (frame.astype(np.float32) + delta).round().clip(0, 255).astype(np.uint8)
    return marked


def read_bits(frames: np.ndarray) -> tuple[int, ...]:
    """The 32 bits read from uint8 frames ``[N,H,W,3]`` of any size: the per-bit majority over frames."""
    votes = np.zeros(len(PAYLOAD))
    for frame in frames:
        grid = _resize(frame, GRID, GRID).astype(np.float32)
        mark = _watermark()
        with contextlib.redirect_stdout(io.StringIO()):
            bits = mark.extract(embed_img=grid[..., ::-1].copy(), wm_shape=len(PAYLOAD), mode="bit")
        votes += np.asarray(bits, dtype=np.float64) > 0.5
    return tuple(int(v) for v in (votes > len(frames) / 2))


def matching_bits(bits: tuple[int, ...]) -> int:
    return sum(int(a == b) for a, b in zip(bits, PAYLOAD))


def present(bits: tuple[int, ...]) -> bool:
    return matching_bits(bits) >= PRESENT_AT
