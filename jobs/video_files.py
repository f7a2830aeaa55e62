"""Writing IMAGE frames ``[N,H,W,3]`` (0..1) as H.264 .mp4 and VP9 .webm (PyAV/FFmpeg), animated .webp and
.png (Pillow), with provenance (``provenance``: the watermark in the frames, a signed C2PA manifest in the
file); reading a video or image file's frames back (the verifier).

Files are written to a temporary name beside the target, marked, and renamed when complete, so a failure
never leaves a half-written (or an unsigned) file behind.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..model_defs.hub import relative_path_problem
from .provenance import OFF, Provenance, mark_frames, sign_written


def frames_to_uint8(images: torch.Tensor) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be IMAGE frames [N,H,W,3], got shape {tuple(images.shape)}")
    return (images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy())


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.partial")


def _finish(tmp: Path, path: Path, provenance: Provenance, watermarked: bool) -> None:
    sign_written(tmp, path, provenance, watermarked)
    os.replace(tmp, path)


def write_mp4(images: torch.Tensor, path: Path, fps: float, crf: int = 19, provenance: Provenance = OFF) -> Path:
    """H.264 (yuv420p) .mp4; odd sizes are padded by one edge pixel, as yuv420p needs even sides."""
    return _write_av(images, path, fps, "mp4", "libx264", {"crf": str(crf), "x264-params": "mbtree=0"}, provenance)


def write_webm(images: torch.Tensor, path: Path, fps: float, crf: int = 30, provenance: Provenance = OFF) -> Path:
    """VP9 (yuv420p) .webm, constant quality ``crf``; odd sizes padded as for .mp4."""
    return _write_av(images, path, fps, "webm", "libvpx-vp9", {"crf": str(crf), "b": "0", "row-mt": "0", "threads": "1"}, provenance)


def _write_av(images: torch.Tensor, path: Path, fps: float, container_format: str, codec: str, options: dict,
              provenance: Provenance) -> Path:
    import av

    frames, watermarked = mark_frames(frames_to_uint8(images), provenance)
    _, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    tmp = _atomic_target(path)
    try:
        with av.open(str(tmp), mode="w", format=container_format) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = width + pad_w, height + pad_h
            stream.pix_fmt = "yuv420p"
            # x264 without macroblock-tree rate control: with it, the same frames encoded to different videos run
            # to run (even on one thread), so no saved .mp4 was deterministic; VP9 on one thread, likewise
            stream.options = options
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        _finish(tmp, path, provenance, watermarked)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_webp(images: torch.Tensor, path: Path, fps: float, lossless: bool = True, quality: int = 80, method: int = 4,
               provenance: Provenance = OFF) -> Path:
    from PIL import Image

    marked, watermarked = mark_frames(frames_to_uint8(images), provenance)
    frames = [Image.fromarray(frame) for frame in marked]
    tmp = _atomic_target(path)
    try:
        frames[0].save(
            tmp, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
            loop=0, lossless=lossless, quality=quality, method=method,
        )
        _finish(tmp, path, provenance, watermarked)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_png(images: torch.Tensor, path: Path, fps: float, provenance: Provenance = OFF) -> Path:
    """One frame: a .png; several: an animated .png (APNG) at ``fps``."""
    from PIL import Image

    marked, watermarked = mark_frames(frames_to_uint8(images), provenance)
    frames = [Image.fromarray(frame) for frame in marked]
    tmp = _atomic_target(path)
    try:
        if len(frames) == 1:
            frames[0].save(tmp, format="PNG")
        else:
            frames[0].save(tmp, format="PNG", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
        _finish(tmp, path, provenance, watermarked)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# the longest file name most file systems take (NAME_MAX, in bytes), and what numbering adds to the prefix's last part
NAME_MAX = 255
NUMBERING = len("_00001_.webp")
PREFIX_ALLOWED = "a name inside the output folder, '/' between sub-folders, e.g. 'spacetime/t2v'"


def check_filename_prefix(filename_prefix: str) -> None:
    """A save node's ``filename_prefix`` must name a file inside the output folder, whichever folder that is:
    the shared path rule (relative, no '..', no Windows form, no NUL, not empty), and parts short enough
    to be file names once numbered. A one-line ValueError says what is wrong and what is allowed."""
    problem = relative_path_problem(filename_prefix)
    if problem is None and any(len(part.encode()) > NAME_MAX - NUMBERING for part in filename_prefix.split("/")):
        problem = f"has a part longer than {NAME_MAX - NUMBERING} bytes (too long for a file name)"
    if problem is not None:
        shown = repr(filename_prefix) if len(filename_prefix) <= 80 else f"{filename_prefix[:60]!r}... ({len(filename_prefix)} characters)"
        raise ValueError(f"filename_prefix={shown} {problem}; allowed: {PREFIX_ALLOWED}")


def next_output_path(output_dir: Path, filename_prefix: str, extension: str) -> Path:
    """ComfyUI-style ``<prefix>_00001_.<ext>`` numbering; the prefix may contain sub-folders. The prefix was
    checked before the run (the save nodes' VALIDATE_INPUTS); it is checked again here, and the target
    resolved against the output folder, so a link inside it that points out cannot be written through."""
    check_filename_prefix(filename_prefix)
    target = (output_dir / filename_prefix).resolve()
    if output_dir.resolve() not in target.parents:
        raise ValueError(f"filename_prefix={filename_prefix!r} points outside the output folder {output_dir}")
    folder, stem = target.parent, target.name
    folder.mkdir(parents=True, exist_ok=True)
    taken = [p.name for p in folder.glob(f"{stem}_*_.{extension}")]
    counter = 1 + max((int(n[len(stem) + 1:-len(extension) - 2]) for n in taken if n[len(stem) + 1:-len(extension) - 2].isdigit()), default=0)
    return folder / f"{stem}_{counter:05d}_.{extension}"


VIDEO_SUFFIXES = (".mp4", ".webm", ".webp", ".png")


def read_frames(path: Path) -> np.ndarray:
    """uint8 RGB frames ``[N,H,W,3]`` of an .mp4/.webm (PyAV) or a (possibly animated) .webp/.png (Pillow);
    a file that is none of these, or does not decode, is a one-line ValueError."""
    allowed = f"allowed: a video or image file ending in {', '.join(VIDEO_SUFFIXES)}"
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: not a video or image the pack writes; {allowed}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file; {allowed}")
    try:
        if path.suffix.lower() in (".mp4", ".webm"):
            import av

            with av.open(str(path)) as container:
                frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        else:
            from PIL import Image, ImageSequence

            with Image.open(path) as image:
                frames = [np.array(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    except Exception as exc:  # PyAV and Pillow raise many kinds; the user needs one line naming the file
        raise ValueError(f"{path}: does not decode as {path.suffix} ({type(exc).__name__}: {exc}); {allowed}") from None
    if not frames:
        raise ValueError(f"{path}: holds no frames; {allowed}")
    return np.stack(frames)
