"""The invisible watermark of every video and image the pack writes: a fixed 32-bit payload embedded in each
frame with the ``invisible-watermark`` library's DWT-DCT-SVD method (the one Stable Diffusion's reference scripts
used; ShieldMnt/invisible-watermark): the chroma (U) plane's Haar low band is cut into 4x4 blocks, and each
block's largest DCT singular value is quantised to carry one bit. Chosen over ``blind-watermark`` by
``benchmarks/provenance.py`` (BENCHMARKS.md, "Provenance"): more robust to H.264 and resizing at a higher PSNR.

Frames of any size are marked on one canonical 64x64 grid: the frame is resampled to 64x64, the library
marks that, and the difference (the mark) is resampled back to the frame's size and added. (The library's own
``WatermarkEncoder`` refuses images under 256x256 pixels; its embedder class has no such limit.) Detection
resamples any frame to 64x64 and decides each bit by the share of its blocks, over all frames, that read 1, so
the reader needs no original size. Frames smaller than ``MIN_SIDE`` are not marked.
"""
from __future__ import annotations

import importlib.util

import numpy as np

# "Spacetime generated" as a 32-bit pattern: 16 ones, no long runs (a flat frame reads all zeros or all ones)
PAYLOAD = tuple(int(bit) for bit in "10110010011101001100101101000111")
GRID = 64  # the canonical side the mark is embedded and read at
MIN_SIDE = 32  # smaller frames are left unmarked
# the least matching bits (of 32) to call the mark present: unmarked clips match 16 on average; 26 or more by
# chance has a probability of 3e-4 for random bits (benchmarks/provenance.py measures false positives on clips)
PRESENT_AT = 26
# the quantisation step of the U plane's singular values (the library's default); the Y plane is left alone:
# marking it too lowered both the PSNR and the bits read after H.264 (benchmarks/provenance.py, on clips)
SCALES = (0, 36)
LIBRARY = "invisible-watermark"


def available() -> bool:
    """Whether the library (and OpenCV and PyWavelets under it) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("imwatermark", "cv2", "pywt"))


def _embedder(bits=()):
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd

    return EmbedDwtDctSvd(list(bits), wmLen=len(PAYLOAD), scales=list(SCALES) + [0])


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
    embedder = _embedder(PAYLOAD)
    marked = np.empty_like(frames)
    for index, frame in enumerate(frames):
        grid = _resize(frame.astype(np.float32), GRID, GRID).round().clip(0, 255).astype(np.uint8)
        out = embedder.encode(grid[..., ::-1].copy())[..., ::-1].astype(np.float32)  # the library takes OpenCV's BGR
        delta = _resize(out - grid.astype(np.float32), width, height)
        marked[index] = (frame.astype(np.float32) + delta).round().clip(0, 255).astype(np.uint8)
    return marked


def read_bits(frames: np.ndarray) -> tuple[int, ...]:
    """The 32 bits read from uint8 frames ``[N,H,W,3]`` of any size: each bit by the share of its blocks, over
    all frames, that read 1 (every frame has 64 blocks per plane, each bit 2 of them)."""
    import cv2
    import pywt

    reader = _embedder()
    scores: list[list[float]] = [[] for _ in PAYLOAD]
    for frame in frames:
        grid = _resize(frame, GRID, GRID)
        yuv = cv2.cvtColor(np.ascontiguousarray(grid[..., ::-1]), cv2.COLOR_BGR2YUV)
        for channel, scale in enumerate(SCALES):
            if scale > 0:
                low, _ = pywt.dwt2(yuv[..., channel].astype(np.float64), "haar")
                scores = reader.decode_frame(low, scale, scores)
    return tuple(int(np.mean(bit_scores) > 0.5) for bit_scores in scores)


def matching_bits(bits: tuple[int, ...]) -> int:
    return sum(int(a == b) for a, b in zip(bits, PAYLOAD))


def present(bits: tuple[int, ...]) -> bool:
    return matching_bits(bits) >= PRESENT_AT
