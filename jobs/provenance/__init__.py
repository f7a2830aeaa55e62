"""Provenance on save: every video and image the pack writes carries an invisible watermark in its frames
(``watermark.py``) and a signed C2PA manifest (``credentials.py``); ``verify.py`` reads both back.

Both are on by default, each with its own switch (``Provenance``). A missing optional package turns its part
off with one log line; nothing here is imported when the pack is imported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import credentials, watermark

log = logging.getLogger(__name__)
_TOLD: set[str] = set()  # each "package missing" line is logged once per process


@dataclass(frozen=True)
class Provenance:
    """What a save marks: ``watermark`` and ``c2pa`` switches, ``certificate`` (a PEM file with the chain and
    key; "" for the local certificate), and what the manifest names: the models and the workflow's hash."""

    watermark: bool = True
    c2pa: bool = True
    certificate: str = ""
    models: tuple[str, ...] = ()
    workflow_sha256: str = ""

    def check(self) -> None:
        """Before work starts: a given certificate must parse (one-line ValueError)."""
        if self.c2pa and self.certificate and credentials.available():
            credentials.load_identity(self.certificate)


OFF = Provenance(watermark=False, c2pa=False)


def _tell_once(key: str, line: str) -> None:
    if key not in _TOLD:
        _TOLD.add(key)
        log.warning(line)


def watermark_on(settings: Provenance) -> bool:
    if settings.watermark and not watermark.available():
        _tell_once("watermark", "provenance: invisible watermark off: the invisible-watermark package (with opencv-python and "
                                "PyWavelets) is not installed; pip install -r requirements.txt")
        return False
    return settings.watermark


def c2pa_on(settings: Provenance) -> bool:
    if settings.c2pa and not credentials.available():
        _tell_once("c2pa", "provenance: C2PA manifests off: the c2pa-python package is not installed; pip install -r requirements.txt")
        return False
    return settings.c2pa


def mark_frames(frames: np.ndarray, settings: Provenance) -> tuple[np.ndarray, bool]:
    """uint8 frames ``[N,H,W,3]`` with the watermark when it is on (and the frames are large enough), and
    whether they got it."""
    if not watermark_on(settings):
        return frames, False
    if not watermark.markable(*frames.shape[1:3]):
        _tell_once(f"small{frames.shape[1:3]}", f"provenance: frames of {frames.shape[2]}x{frames.shape[1]} are below "
                                                f"the watermark's {watermark.MIN_SIDE}-pixel minimum side: not watermarked")
        return frames, False
    return watermark.embed(frames), True


def sign_written(tmp: Path, final: Path, settings: Provenance, watermarked: bool) -> None:
    """Sign, in place, the complete file at ``tmp`` that will be renamed to ``final`` (whose suffix says the format)."""
    if not c2pa_on(settings):
        return
    suffix = final.suffix.lower()
    if suffix not in credentials.MIME_TYPES:
        _tell_once(f"format{suffix}", f"provenance: C2PA cannot embed a manifest in {suffix} files (c2pa has no handler "
                                      "for it): they carry the watermark only")
        return
    identity = credentials.load_identity(settings.certificate)
    if identity.local:
        _tell_once("local", "provenance: C2PA manifests are signed with the local self-signed certificate "
                            f"({credentials.config_dir() / credentials.LOCAL_SIGNER_FILE}); the manifest says so")
    definition = credentials.manifest(final.name, settings.models, settings.workflow_sha256, watermarked, identity.local)
    credentials.sign_file(tmp, credentials.MIME_TYPES[suffix], definition, identity)


MODEL_SUFFIXES = (".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin")


def prompt_provenance(prompt, switches: Provenance = Provenance()) -> Provenance:
    """``switches`` with the models and hash of an API-format prompt (``{id: {"class_type", "inputs"}}``): the
    models are what loaders name (inputs called ``*_name``, ComfyUI's convention: ``model_name``, ``vae_name``,
    ``lora_name``, ...) and any other input holding a model file's name."""
    models: list[str] = []
    if isinstance(prompt, dict):
        for node in prompt.values():
            inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
            for name, value in inputs.items():
                named = str(name).endswith("_name") or (isinstance(value, str) and value.lower().endswith(MODEL_SUFFIXES))
                if isinstance(value, str) and value and named and value not in models:
                    models.append(value)
    return Provenance(switches.watermark, switches.c2pa, switches.certificate, tuple(models),
                      credentials.workflow_hash(prompt) if prompt is not None else "")
