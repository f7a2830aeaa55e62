"""The few native ComfyUI nodes our shipped workflows use (to save results, to pick frames),
implemented for the headless runner with the same node ids, inputs and widget order as ComfyUI's, so
one workflow file runs in both. (Inside ComfyUI these are never registered: ComfyUI's own run.) The save
nodes mark what they write (``provenance``, from the runner's switches); ComfyUI's own do not: inside
ComfyUI, the pack's Spacetime Save Video node does."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model_defs.hub import relative_path_problem
from ..jobs.provenance import OFF, Provenance
from ..jobs.video_files import check_filename_prefix, next_output_path, write_mp4, write_webp

WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}


def video_inputs_problem(filename_prefix: str | None = None, fps: float | None = None) -> bool | str:
    """VALIDATE_INPUTS of Create Video and the save nodes, before anything runs: True, or what is wrong. None is an
    input that is linked (known only when the node runs) or that the node does not have."""
    if filename_prefix is not None:
        try:
            check_filename_prefix(filename_prefix)
        except ValueError as exc:
            return str(exc)
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        return f"fps={fps} is not allowed; allowed: a finite number of frames per second above 0"
    return True


@dataclass(frozen=True, eq=False)
class VideoFrames:
    """VIDEO for the runner: frames plus frame rate (ComfyUI's VIDEO holds the same)."""

    images: torch.Tensor
    fps: float


class SaveAnimatedWEBP:
    CATEGORY = "image/animation"
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "lossless": ("BOOLEAN", {"default": True}),
                "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
                "method": (list(WEBP_METHODS), {"default": "default"}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None, fps=None):
        return video_inputs_problem(filename_prefix, fps)

    def save_images(self, images, filename_prefix, fps, lossless, quality, method, output_dir: Path, provenance: Provenance = OFF):
        path = write_webp(images, next_output_path(output_dir, filename_prefix, "webp"), fps, lossless, quality, WEBP_METHODS[method],
                          provenance=provenance)
        return {"ui": {"files": [str(path)]}}


class CreateVideo:
    CATEGORY = "image/video"
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}),
            },
            "optional": {"audio": ("AUDIO",)},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, fps=None):
        return video_inputs_problem(fps=fps)

    def create(self, images, fps, audio=None):
        if audio is not None:
            raise ValueError("CreateVideo: the headless runner does not mux audio; disconnect the audio input")
        return (VideoFrames(images, fps),)


class SaveVideo:
    CATEGORY = "image/video"
    RETURN_TYPES = ()
    FUNCTION = "save_video"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": ("VIDEO",),
                "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                "format": (["auto", "mp4"], {"default": "auto"}),
                "codec": (["auto", "h264"], {"default": "auto"}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return video_inputs_problem(filename_prefix)

    def save_video(self, video, filename_prefix, format, codec, output_dir: Path, provenance: Provenance = OFF):
        path = write_mp4(video.images, next_output_path(output_dir, filename_prefix, "mp4"), video.fps, provenance=provenance)
        return {"ui": {"files": [str(path)]}}


class ImageFromBatch:
    """Frames ``batch_index`` .. ``batch_index + length - 1`` of an IMAGE batch; both clamped to the batch,
    as ComfyUI's node does (the image-to-video workflow takes one frame of a generated clip with it)."""

    CATEGORY = "image/batch"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "frombatch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095}),
                "length": ("INT", {"default": 1, "min": 1, "max": 4096}),
            }
        }

    def frombatch(self, image, batch_index, length):
        first = min(batch_index, image.shape[0] - 1)
        return (image[first: first + length].clone(),)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_INPUT_DIR = Path("input")  # ComfyUI's input folder; run_workflow.py --input-dir


def input_images(input_dir: Path) -> list[str]:
    """The image files of the input folder (sub-folders included, '/'-separated), sorted, as LoadImage offers them."""
    if not input_dir.is_dir():
        return []
    return sorted(p.relative_to(input_dir).as_posix() for p in input_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class LoadImage:
    """ComfyUI's Load Image (nodes.py ``LoadImage``): a file of the input folder -> IMAGE ``[N,H,W,3]`` (N > 1 for an
    animated file whose frames have one size) and MASK ``[N,H,W]`` (1 - alpha; a 64x64 zero mask without alpha).
    Saved UI workflows hold ``[file name, "image"]``: the second value is the frontend's upload button, no input.
    The input folder is a class attribute: the runner uses ``LoadImage.in_folder(--input-dir)``."""

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    input_dir: Path = DEFAULT_INPUT_DIR

    @classmethod
    def in_folder(cls, input_dir: str | Path) -> type["LoadImage"]:
        return type(cls.__name__, (cls,), {"input_dir": Path(input_dir)})

    @classmethod
    def INPUT_TYPES(cls):
        # ComfyUI offers the input folder's files as a combo; checked by VALIDATE_INPUTS here, which names the folder
        return {"required": {"image": ("STRING", {"image_upload": True, "tooltip": "A file in the input folder."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, image=None):
        if image is None:
            return True
        name = image.removesuffix(" [input]")  # ComfyUI's annotated name for the input folder
        problem = relative_path_problem(name)
        if problem is None and not (cls.input_dir / name).is_file():
            problem = f"is not a file in the input folder {cls.input_dir} (run_workflow.py --input-dir)"
        if problem is None:
            return True
        return f"image: {image!r} {problem}; files there: {input_images(cls.input_dir)}"

    def load_image(self, image: str):
        from PIL import Image, ImageOps, ImageSequence

        verdict = self.VALIDATE_INPUTS(image)
        if verdict is not True:
            raise ValueError(verdict)
        images, masks = [], []
        with Image.open(self.input_dir / image.removesuffix(" [input]")) as file:
            for frame in ImageSequence.Iterator(file):
                frame = ImageOps.exif_transpose(frame)
                if frame.mode == "I":  # 16-bit greyscale, as ComfyUI scales it
                    frame = frame.point(lambda v: v * (1 / 255))
                rgb = frame.convert("RGB")
                if images and rgb.size != (images[0].shape[2], images[0].shape[1]):
                    continue  # frames of another size are skipped, as ComfyUI does
                images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])  # [1,H,W,3]
                if "A" in frame.getbands() or (frame.mode == "P" and "transparency" in frame.info):
                    alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
                    masks.append(1.0 - torch.from_numpy(alpha)[None])  # [1,H,W]
                else:
                    masks.append(torch.zeros((1, 64, 64), dtype=torch.float32))
            several = len(images) > 1 and file.format != "MPO"  # MPO: a photo with previews, the first only
        if several:
            return (torch.cat(images), torch.cat(masks))
        return (images[0], masks[0])


NATIVE_NODE_CLASS_MAPPINGS = {
    "LoadImage": LoadImage,
    "SaveAnimatedWEBP": SaveAnimatedWEBP,
    "CreateVideo": CreateVideo,
    "SaveVideo": SaveVideo,
    "ImageFromBatch": ImageFromBatch,
}
