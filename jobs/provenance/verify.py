"""Read a file's provenance: its C2PA manifest (valid / tampered / absent / unsupported format) and its invisible
watermark (present / absent, with the bits read). ``python verify.py FILE...`` (the repo's root script) prints
one line per file and exits 1 when a file could not be read."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from . import credentials, watermark


@dataclass(frozen=True)
class Verdict:
    path: str
    manifest: str  # valid, tampered, absent, unsupported, unavailable (c2pa-python missing)
    manifest_detail: str
    watermark: str  # present, absent, unavailable (invisible-watermark missing), too small
    bits: str  # the 32 bits read, e.g. "1011...", "" when not read
    matching_bits: int
    generation: dict | None = None  # models, workflow hash and signer note from the manifest

    def line(self) -> str:
        mark = f"watermark {self.watermark}" + (f" ({self.matching_bits}/{len(watermark.PAYLOAD)} bits match, bits {self.bits})" if self.bits else "")
        return f"{self.path}: manifest {self.manifest} ({self.manifest_detail}); {mark}"


def verify(path: str | Path) -> Verdict:
    """The provenance of an .mp4, .webm, .webp or .png; a file that is none of them, or does not decode, is a
    one-line ValueError."""
    from ..video_files import read_frames

    path = Path(path)
    frames = read_frames(path)  # first: a file that is no video is an error, not an "absent" verdict
    if credentials.available():
        report = credentials.read_manifest(path)
        state, detail, generation = report.state, report.detail, credentials.generation_of(report)
    else:
        state, detail, generation = "unavailable", "c2pa-python is not installed", None
    bits, matches = "", 0
    if not watermark.available():
        mark = "unavailable"
    elif not watermark.markable(*frames.shape[1:3]):
        mark = "too small"
    else:
        read = watermark.read_bits(frames)
        bits, matches = "".join(map(str, read)), watermark.matching_bits(read)
        mark = "present" if watermark.present(read) else "absent"
    return Verdict(str(path), state, detail, mark, bits, matches, generation)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Read the C2PA manifest and the invisible watermark of videos and images.")
    parser.add_argument("files", nargs="+", help=".mp4, .webm, .webp or .png files")
    args = parser.parse_args(argv)
    status = 0
    for name in args.files:
        try:
            print(verify(name).line())
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status
