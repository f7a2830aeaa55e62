"""The invisible watermark of every video and image the pack writes: a fixed 32-bit payload embedded in each
frame with the ``invisible-watermark`` library's DWT-DCT-SVD transform (the one Stable Diffusion's reference
scripts used; ShieldMnt/invisible-watermark, ``imwatermark/dwtDctSvd.py``): a chroma plane's Haar low band is cut
into 4x4 blocks, and each block's largest DCT singular value is quantised to carry one bit (bit b sits on the
lattice ``(k + 1/4 + b/2) * step``). Chosen over ``blind-watermark`` by ``benchmarks/provenance.py``
(BENCHMARKS.md, "Provenance").

What we add around the library's transform (each measured there, on built-in videos):

- one canonical 32x32 grid: the frame is resampled to 32x32, marked, and the difference (the mark) resampled back
  to the frame's size and added. A reader resamples any frame to 32x32, so a resized copy (0.5x of a 64x64 video
  is exactly the grid) reads like the original; the mark is the grid's low frequencies, which H.264 keeps;
- both chroma planes: U carries bits 0-15 and V bits 16-31 (16 blocks each on the grid), every frame;
- the planes kept in float: the library truncates them to uint8 and swaps the Haar detail bands on the way
  back (rounding and the right bands alone: 37.8 -> 44.3 dB at the library's step, U plane, 64x64 grid, 10
  built-in videos), and OpenCV's uint8 conversion clips saturated reds' V, where the mark was then lost;
- the nearest lattice point of the wanted bit (the library moves the value to a point of its lattice cell, up to
  3/4 of a step away: 1.75x the squared error; 44.3 -> 45.2 dB): these pay for the larger step used here;
- soft reading: each block votes by how close its value is to the 1 lattice (a sine of its phase) instead of
  a hard 0/1, and each bit is the mean vote over its blocks in all frames;
- a crop search: a verifier does not know whether the file was cropped, so it also reads the frames as if a
  centred crop had taken ``CROP_MARGINS`` of the original side off each edge (the edges padded back), and keeps
  the reading that agrees best with the payload. More readings are more chances for an unmarked clip to pass:
  ``PRESENT_AT`` is set for that (benchmarks/provenance.py measures the false positives with the search on).

Frames smaller than ``MIN_SIDE`` are not marked.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools

import numpy as np

# "Spacetime generated" as a 32-bit pattern: 16 ones, no long runs (a flat frame reads all zeros or all ones)
PAYLOAD = tuple(int(bit) for bit in "10110010011101001100101101000111")
GRID = 32  # the canonical side the mark is embedded and read at
BLOCK = 4  # the library's block side, in Haar low-band coefficients (8x8 grid pixels)
MIN_SIDE = 32  # smaller frames are left unmarked
# OpenCV's YUV plane -> the quantisation step of its blocks' largest singular value (the library's default is
# 36 on U alone). Y is left alone: marking it lowered the bits read after H.264. 50 on both: on 50 built-in videos
# 0.970 of the bits after a 0.5x resize at 40.6 dB (every video over 38); 55 gave 0.976 at 39.2 dB (one video
# at 38.6); on 20 of them 60 gave 0.989 at 39.0 dB.
STEPS = {1: 50.0, 2: 50.0}
# the share of the original side a centred crop may have taken off each edge, per axis (x and y apart): 9 readings
CROP_MARGINS = (0.0, 0.05, 0.1)
WORK_SIDE = 4 * GRID  # larger frames are shrunk to this before the crop search pads them
# the least matching bits (of 32) to call the mark present: unmarked clips match 16 on average; 26 or more of
# random bits has a probability of 2.7e-4 per reading, at most 2.4e-3 for the best of the crop search's 9
PRESENT_AT = 26
LIBRARY = "invisible-watermark"


def available() -> bool:
    """Whether the library (and OpenCV and PyWavelets under it) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("imwatermark", "cv2", "pywt"))


@functools.cache
def _codec_class():
    """The library's embedder with the nearest lattice point and a soft reading (see the header)."""
    import cv2
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd

    class Codec(EmbedDwtDctSvd):
        def diffuse_dct_svd(self, block, wmBit, scale):
            u, s, v = np.linalg.svd(cv2.dct(block))
            offset = 0.25 + 0.5 * wmBit
            s[0] = (max(np.round(s[0] / scale - offset), 0) + offset) * scale
            return cv2.idct(u @ np.diag(s) @ v)

        def infer_dct_svd(self, block, scale):
            largest = np.linalg.svd(cv2.dct(block), compute_uv=False)[0]
            return 0.5 - 0.5 * np.sin(2 * np.pi * (largest % scale) / scale)  # 1 on the 1 lattice, 0 on the 0 one

    return Codec


def _plane_offsets() -> dict[int, int]:
    """Plane -> the payload bit its first block carries: the planes take the payload in turn."""
    blocks = (GRID // 2 // BLOCK) ** 2
    return {plane: index * blocks % len(PAYLOAD) for index, plane in enumerate(sorted(STEPS))}


def _codec(offset: int):
    bits = list(PAYLOAD[offset:] + PAYLOAD[:offset])
    return _codec_class()(bits, wmLen=len(PAYLOAD), scales=[0, 0, 0], block=BLOCK)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width < image.shape[1] and height < image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _yuv(rgb: np.ndarray) -> np.ndarray:
    """float32 RGB ``[H,W,3]`` (0..255) -> OpenCV's YUV as the library computes it from uint8 (chroma centred on
    128), but in float: neither clipped nor rounded (saturated reds have V above 255), so marking and reading
    see the same planes and the mark alone comes back as the difference."""
    import cv2

    yuv = cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2YUV)  # float input: chroma centred on 0.5
    yuv[..., 1:] += 127.5
    return yuv


def _rgb(yuv: np.ndarray) -> np.ndarray:
    import cv2

    yuv = yuv.astype(np.float32)
    yuv[..., 1:] -= 127.5
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)[..., ::-1]


def markable(height: int, width: int) -> bool:
    return min(height, width) >= MIN_SIDE


def embed(frames: np.ndarray) -> np.ndarray:
    """uint8 frames ``[N,H,W,3]`` (RGB) -> the same frames with the mark; frames below ``MIN_SIDE`` unchanged.
    Deterministic: the same frames give the same result."""
    import pywt

    _, height, width, _ = frames.shape
    if not markable(height, width):
        return frames
    codecs = {plane: _codec(offset) for plane, offset in _plane_offsets().items()}
    marked = np.empty_like(frames)
    for index, frame in enumerate(frames):
        grid = _resize(frame.astype(np.float32), GRID, GRID)
        yuv = _yuv(grid)
        for plane, step in STEPS.items():
            low, details = pywt.dwt2(yuv[..., plane].astype(np.float64), "haar")
            codecs[plane].encode_frame(low, step)  # in place
            yuv[..., plane] = pywt.idwt2((low, details), "haar")
        delta = _resize(_rgb(yuv) - grid, width, height)
        marked[index] = (frame.astype(np.float32) + delta).round().clip(0, 255).astype(np.uint8)
    return marked


def bit_scores(frames: np.ndarray) -> np.ndarray:
    """float ``[32]``: each payload bit's mean soft vote in [0, 1] (1 = reads 1) over its blocks in all uint8
    frames ``[N,H,W,3]`` of any size, read on the grid as they are (no crop search)."""
    import pywt

    offsets = _plane_offsets()
    codecs = {plane: _codec(offset) for plane, offset in offsets.items()}
    total, count = np.zeros(len(PAYLOAD)), np.zeros(len(PAYLOAD))
    for frame in frames:
        yuv = _yuv(_resize(frame.astype(np.float32), GRID, GRID))
        for plane, step in STEPS.items():
            low, _ = pywt.dwt2(yuv[..., plane].astype(np.float64), "haar")
            votes = codecs[plane].decode_frame(low, step, [[] for _ in PAYLOAD])  # votes[i]: the plane's i-th bit
            for bit, bit_votes in enumerate(votes):
                at = (bit + offsets[plane]) % len(PAYLOAD)
                total[at] += sum(bit_votes)
                count[at] += len(bit_votes)
    return total / np.maximum(count, 1)


def _uncropped(frames: np.ndarray, margin_y: float, margin_x: float) -> np.ndarray:
    """The frames padded (edge pixels repeated) back to the size they had before a centred crop that took
    ``margin`` of that size off each edge."""
    import cv2

    height, width = frames.shape[1:3]
    pad_y, pad_x = round(margin_y * height / (1 - 2 * margin_y)), round(margin_x * width / (1 - 2 * margin_x))
    if pad_y == pad_x == 0:
        return frames
    return np.stack([cv2.copyMakeBorder(f, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_REPLICATE) for f in frames])


def read_bits(frames: np.ndarray) -> tuple[int, ...]:
    """The 32 bits read from uint8 frames ``[N,H,W,3]`` of any size: of the crop search's readings (see the
    header), the one whose soft votes agree best with the payload."""
    frames = np.ascontiguousarray(frames)
    if max(frames.shape[1:3]) > WORK_SIDE:  # the search pads; pad small copies
        frames = np.stack([_resize(f, WORK_SIDE, WORK_SIDE) for f in frames])
    sign = 2 * np.asarray(PAYLOAD) - 1
    best, best_agreement = None, -np.inf
    for margin_y, margin_x in itertools.product(CROP_MARGINS, CROP_MARGINS):
        scores = bit_scores(_uncropped(frames, margin_y, margin_x))
        agreement = float(np.mean(sign * (2 * scores - 1)))
        if agreement > best_agreement:
            best, best_agreement = scores, agreement
    return tuple(int(score > 0.5) for score in best)


def matching_bits(bits: tuple[int, ...]) -> int:
    return sum(int(a == b) for a, b in zip(bits, PAYLOAD))


def present(bits: tuple[int, ...]) -> bool:
    return matching_bits(bits) >= PRESENT_AT
