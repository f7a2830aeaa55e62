"""How robust and how cheap is the invisible watermark? Generates built-in videos (the t2v workflow's settings:
64x64, 17 frames, 20 steps, cfg 5, shift 5) through the same nodes the workflows use, marks each as the save
nodes do, writes it as the pack's .mp4 (H.264, CRF 19), then reads the watermark back:

- after a re-encode at H.264 CRF 23,
- after a 0.5x resize (bicubic) and a re-encode at CRF 23,
- after a 10% crop (5% off each edge) and a re-encode at CRF 23;
- (reported beside the goals) after 0.75x and 2x resizes and a re-encode at CRF 23;

bit accuracy is the share of the 32 payload bits read right (the verifier's reading: soft votes over frames, the
best of its crop search).
False positives: unmarked procedural clips (the training renderer), saved as .mp4 without provenance, that the
verifier calls marked. PSNR: marked vs unmarked frames, before encoding (the mark's own cost).

``--library blind-watermark`` measures the alternative (on a 64x64 grid) for the choice in BENCHMARKS.md. Last line:
``provenance: bits_h264=X bits_resize=Y bits_crop=Z false_pos=W psnr=P``.

Usage: python benchmarks/provenance.py [--videos 50] [--unmarked 200] [--steps 20] [--library invisible-watermark]
                                      [--cache videos.npz] [--source builtin|procedural]
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spacetime_bootstrap import load_package  # noqa: E402

FPS = 16


def builtin_videos(count: int, steps: int, log) -> list[np.ndarray]:
    """uint8 ``[17,64,64,3]`` videos of the built-in model for held-out prompts."""
    from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL, BUILTIN_TEXT_ENCODER, BUILTIN_VAE
    from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeTextEncoderLoader, SpacetimeVAELoader
    from comfyui_spacetime.nodes.sampling import SpacetimeEmptyLatentVideo, SpacetimeSampler, SpacetimeTextEncode
    from comfyui_spacetime.nodes.vae import SpacetimeVAEDecode
    from comfyui_spacetime.training.procedural import sample_spec

    (model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "fp32", "auto")
    (vae,) = SpacetimeVAELoader().load(BUILTIN_VAE, "fp32")
    (encoder,) = SpacetimeTextEncoderLoader().load(BUILTIN_TEXT_ENCODER, "default")
    (negative,) = SpacetimeTextEncode().encode(encoder, "")
    videos = []
    for i in range(count):
        spec = sample_spec(20_000 + i, held_out=True)
        (positive,) = SpacetimeTextEncode().encode(encoder, spec.caption)
        (latent,) = SpacetimeEmptyLatentVideo().generate(vae, 64, 64, 17, 1)
        (samples,) = SpacetimeSampler().sample(model, positive, negative, latent, i, steps, 5.0, 5.0, "unipc", 1.0)
        (images,) = SpacetimeVAEDecode().decode(vae, samples)
        videos.append((images.clamp(0, 1) * 255).round().byte().numpy())
        log(f"video {i + 1}/{count}: {spec.caption!r}")
    return videos


def encode_decode(frames: np.ndarray, crf: int) -> np.ndarray:
    """H.264 (yuv420p) at ``crf`` in memory, decoded back; odd sides padded as the pack's writer does."""
    import av

    height, width = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    buffer.seek(0)
    with av.open(buffer) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])[:, :height, :width]


def resize(frames: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    height, width = frames.shape[1:3]
    size = (round(width * factor), round(height * factor))
    return np.stack([np.array(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])


def crop(frames: np.ndarray, share: float) -> np.ndarray:
    height, width = frames.shape[1:3]
    dh, dw = round(height * share / 2), round(width * share / 2)
    return frames[:, dh:height - dh, dw:width - dw]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


class BlindWatermark:
    """blind-watermark (DWT, then DCT + SVD quantisation of 4x4 blocks in all three YUV planes, steps 36 and 20) on
    a 64x64 grid (its blocks need 32 per plane), with its per-frame bit decision and a per-bit majority over
    frames: the alternative measured against invisible-watermark."""

    GRID = 64  # the grid it was measured on (its 4x4 blocks need 32 of them per plane)

    def __init__(self):
        from comfyui_spacetime.jobs.provenance import watermark

        self.w = watermark

    @staticmethod
    def _library():
        import contextlib
        import multiprocessing

        # blind_watermark.pool calls multiprocessing.set_start_method('fork') at import (a RuntimeError once the
        # start method is fixed): one reason it is not the pack's choice; made a no-op for its import here
        set_start_method = multiprocessing.set_start_method
        multiprocessing.set_start_method = lambda *args, **kwargs: None
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                from blind_watermark import WaterMark

                return WaterMark(password_wm=1, password_img=1)
        finally:
            multiprocessing.set_start_method = set_start_method

    def embed(self, frames):
        import contextlib

        w, out = self.w, []
        for frame in frames:
            height, width = frame.shape[:2]
            grid = w._resize(frame.astype(np.float32), self.GRID, self.GRID).round().clip(0, 255)
            mark = self._library()
            with contextlib.redirect_stdout(io.StringIO()):
                mark.read_img(img=grid[..., ::-1].copy())
                mark.read_wm(list(map(bool, w.PAYLOAD)), mode="bit")
                marked = mark.embed()[..., ::-1]
            out.append((frame.astype(np.float32) + w._resize((marked - grid).astype(np.float32), width, height)).round().clip(0, 255).astype(np.uint8))
        return np.stack(out)

    def read_bits(self, frames):
        import contextlib

        w, votes = self.w, np.zeros(len(self.w.PAYLOAD))
        for frame in frames:
            mark = self._library()
            with contextlib.redirect_stdout(io.StringIO()):
                bits = mark.extract(embed_img=w._resize(frame, self.GRID, self.GRID).astype(np.float32)[..., ::-1].copy(),
                                    wm_shape=len(w.PAYLOAD), mode="bit")
            votes += np.asarray(bits, dtype=np.float64) > 0.5
        return tuple(int(v) for v in (votes > len(frames) / 2))


def evaluate(videos: int, unmarked: int, steps: int, library: str, cache: Path | None = None, source: str = "builtin",
             log=print) -> dict:
    load_package()
    from comfyui_spacetime.jobs.provenance import watermark
    from comfyui_spacetime.training.clips import render_pool

    marker = watermark if library == "invisible-watermark" else BlindWatermark()

    def accuracy(frames: np.ndarray) -> float:
        return watermark.matching_bits(marker.read_bits(frames)) / len(watermark.PAYLOAD)

    start = time.time()
    if source == "procedural":  # the training renderer's clips: no sampling, for quick runs
        clean = list(render_pool(videos, seed=777)[0])
    elif cache is not None and cache.is_file() and len(np.load(cache)["videos"]) >= videos:
        clean = list(np.load(cache)["videos"][:videos])
    else:
        clean = builtin_videos(videos, steps, log)
        if cache is not None:
            np.savez_compressed(cache, videos=np.stack(clean))
    log(f"generated (or loaded) {videos} videos in {time.time() - start:.0f} s")
    start = time.time()
    scores = {"saved": [], "h264": [], "resize": [], "crop": [], "resize_0.75": [], "resize_2": [], "psnr": []}
    for frames in clean:
        marked = marker.embed(frames)
        saved = encode_decode(marked, 19)  # the pack's .mp4
        scores["psnr"].append(psnr(marked, frames))
        scores["saved"].append(accuracy(saved))
        scores["h264"].append(accuracy(encode_decode(saved, 23)))
        scores["resize"].append(accuracy(encode_decode(resize(saved, 0.5), 23)))
        scores["crop"].append(accuracy(encode_decode(crop(saved, 0.1), 23)))
        for factor in (0.75, 2):
            scores[f"resize_{factor}"].append(accuracy(encode_decode(resize(saved, factor), 23)))
    log(f"marked and attacked {videos} videos in {time.time() - start:.0f} s")
    start = time.time()
    pool, _ = render_pool(unmarked, seed=31337)
    matches = [watermark.matching_bits(marker.read_bits(encode_decode(clip, 19))) for clip in pool]
    false_pos = sum(m >= watermark.PRESENT_AT for m in matches) / max(unmarked, 1)
    log(f"read {unmarked} unmarked clips in {time.time() - start:.0f} s; most matching bits {max(matches, default=0)}/32")
    result = {key: float(np.mean(value)) for key, value in scores.items()}
    result |= {f"min_{key}": float(np.min(value)) for key, value in scores.items()}
    result |= {"false_pos": false_pos, "max_matching_unmarked": max(matches, default=0),
               "detected_h264": float(np.mean([s * 32 >= watermark.PRESENT_AT for s in scores["h264"]])),
               "detected_resize": float(np.mean([s * 32 >= watermark.PRESENT_AT for s in scores["resize"]])),
               "detected_crop": float(np.mean([s * 32 >= watermark.PRESENT_AT for s in scores["crop"]]))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Watermark robustness and cost on built-in videos.")
    parser.add_argument("--videos", type=int, default=50)
    parser.add_argument("--unmarked", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--library", choices=("invisible-watermark", "blind-watermark"), default="invisible-watermark")
    parser.add_argument("--cache", type=Path, help="keep the generated videos in this .npz, to measure another library on the same ones")
    parser.add_argument("--source", choices=("builtin", "procedural"), default="builtin",
                        help="builtin: videos of the built-in model; procedural: the training renderer's clips (quick)")
    args = parser.parse_args()
    r = evaluate(args.videos, args.unmarked, args.steps, args.library, args.cache, args.source)
    print(f"library={args.library} source={args.source} videos={args.videos} unmarked={args.unmarked}; bit accuracy as saved {r['saved']:.3f}; "
          f"worst video: h264 {r['min_h264']:.3f} resize {r['min_resize']:.3f} crop {r['min_crop']:.3f} psnr {r['min_psnr']:.2f}; "
          f"mark detected (>= 26/32 bits): h264 {r['detected_h264']:.2f} resize {r['detected_resize']:.2f} crop {r['detected_crop']:.2f}; "
          f"unmarked clips' most matching bits {r['max_matching_unmarked']}/32; "
          f"bits after a 0.75x resize {r['resize_0.75']:.3f} (worst {r['min_resize_0.75']:.3f}), after a 2x one {r['resize_2']:.3f} "
          f"(worst {r['min_resize_2']:.3f})")
    print(f"provenance: bits_h264={r['h264']:.3f} bits_resize={r['resize']:.3f} bits_crop={r['crop']:.3f} "
          f"false_pos={r['false_pos']:.3f} psnr={r['psnr']:.2f}")


if __name__ == "__main__":
    main()
