"""A list of videos to generate, one per line: ``prompt | width | height | frames``.

The format of the packed sampler's text box. The prompt is everything before the last three ``|`` (so a
prompt may itself hold ``|``); blank lines and lines starting with ``#`` are skipped. Errors name the
line (counted from 1, as an editor shows it) and what is wrong with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model_defs.sizes import SizeRules

LINE_FORMAT = "prompt | width | height | frames"


@dataclass(frozen=True)
class VideoRequest:
    prompt: str
    width: int
    height: int
    frames: int
    line: int  # 1-based line number in the text it came from

    @property
    def name(self) -> str:
        """How errors and logs refer to this video: ``line 3 (96x64x9)``."""
        return f"line {self.line} ({self.width}x{self.height}x{self.frames})"


def _whole_number(line: int, field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"line {line}: {field} {text!r} is not a whole number; write '{LINE_FORMAT}'") from None


def parse_video_list(text: str, rules: SizeRules) -> list[VideoRequest]:
    """Every request in ``text``, checked against ``rules`` (the VAE's ``video_rules``)."""
    requests = []
    for line, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = [field.strip() for field in stripped.rsplit("|", 3)]
        if len(fields) != 4:
            raise ValueError(f"line {line}: expected '{LINE_FORMAT}' (4 fields separated by '|'), got {len(fields)} field(s): {stripped!r}")
        prompt, width_text, height_text, frames_text = fields
        if not prompt:
            raise ValueError(f"line {line}: the prompt is empty; write '{LINE_FORMAT}'")
        width = _whole_number(line, "width", width_text)
        height = _whole_number(line, "height", height_text)
        frames = _whole_number(line, "frames", frames_text)
        try:
            rules.check_size(width, height, frames)
        except ValueError as exc:
            raise ValueError(f"line {line}: {exc}") from None
        requests.append(VideoRequest(prompt, width, height, frames, line))
    if not requests:
        raise ValueError(f"the video list is empty; write one video per line as '{LINE_FORMAT}'")
    return requests
