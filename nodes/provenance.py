"""Saving with provenance, and reading it back: Spacetime Save Video writes IMAGE frames as .mp4, .webm, .webp or
.png with the invisible watermark and a signed C2PA manifest (each with its own switch); Spacetime Verify reads
both from a file."""
from __future__ import annotations

from pathlib import Path

from ..jobs.provenance import Provenance, prompt_provenance
from ..jobs.provenance.verify import verify
from ..jobs.video_files import VIDEO_SUFFIXES, check_filename_prefix, next_output_path, write_mp4, write_png, write_webm, write_webp
from . import comfy_glue
from .widgets import validate_inputs

WRITERS = {"mp4": write_mp4, "webm": write_webm, "webp": write_webp, "png": write_png}


def _prefix_rule(values: dict) -> None:
    check_filename_prefix(values["filename_prefix"])


def _certificate_rule(values: dict) -> None:
    if values.get("c2pa") is not False and values["certificate"]:
        Provenance(certificate=values["certificate"]).check()


class SpacetimeSaveVideo:
    """ComfyUI's SaveVideo / SaveAnimatedWEBP, plus provenance: the watermark in the frames, the manifest in the file."""

    CATEGORY = "spacetime/output"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    DESCRIPTION = "Saves frames as a video or animated image that carries an invisible watermark and signed C2PA content credentials."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "spacetime/video", "tooltip": "Inside the output folder; '/' makes sub-folders."}),
                "format": (list(WRITERS), {"default": "mp4", "tooltip": "mp4: H.264; webm: VP9 (C2PA cannot embed in WebM: watermark only); "
                                                                    "webp, png: animated, lossless."}),
                "fps": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "watermark": ("BOOLEAN", {"default": True, "tooltip": "Embed the invisible watermark (python verify.py FILE reads it)."}),
                "c2pa": ("BOOLEAN", {"default": True, "tooltip": "Sign a C2PA manifest into the file: made by a trained model, which models, the workflow's hash."}),
                "certificate": ("STRING", {"default": "", "tooltip": "A PEM file with your ES256 certificate chain and private key; "
                                                                    "empty: a local self-signed certificate generated on first use."}),
            },
            "hidden": {"prompt": "PROMPT"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, _prefix_rule, _certificate_rule)

    def save(self, images, filename_prefix, format, fps, watermark, c2pa, certificate, prompt=None):
        switches = Provenance(watermark=watermark, c2pa=c2pa, certificate=certificate)
        switches.check()
        folder = comfy_glue.output_dir()
        path = WRITERS[format](images, next_output_path(folder, filename_prefix, format), fps, provenance=prompt_provenance(prompt, switches))
        subfolder = str(path.parent.relative_to(folder.resolve())) if path.parent != folder.resolve() else ""
        shown = {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}
        return {"ui": {"images": [shown], "animated": (images.shape[0] > 1,), "files": [str(path)]}}


def _file_rule(values: dict) -> None:
    _resolve(values["file"])


def _resolve(file: str) -> Path:
    """A file path as given, or relative to the output folder; one-line ValueError when it is no such file."""
    allowed = f"allowed: a path (absolute, or inside the output folder) of a {', '.join(VIDEO_SUFFIXES)} file"
    if not file:
        raise ValueError(f"file: empty; {allowed}")
    path = Path(file).expanduser()
    candidates = [path] if path.is_absolute() else [comfy_glue.output_dir() / path, path]
    for candidate in candidates:
        if candidate.is_file():
            if candidate.suffix.lower() not in VIDEO_SUFFIXES:
                raise ValueError(f"file={file!r}: not a video or image the pack writes; {allowed}")
            return candidate
    raise ValueError(f"file={file!r}: no such file; {allowed}")


class SpacetimeVerify:
    """Reads a file's C2PA manifest and invisible watermark."""

    CATEGORY = "spacetime/output"
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("report", "manifest", "watermark")
    FUNCTION = "verify"
    OUTPUT_NODE = True
    DESCRIPTION = "manifest: valid / tampered / absent / unsupported; watermark: present / absent, with the bits read."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": ("STRING", {"default": "", "tooltip": "An .mp4, .webm, .webp or .png: a path, or a name inside the output folder."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, _file_rule)

    def verify(self, file):
        verdict = verify(_resolve(file))
        return {"ui": {"text": [verdict.line()]}, "result": (verdict.line(), verdict.manifest, verdict.watermark)}
