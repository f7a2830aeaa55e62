"""The built-in model's prompt extension (issue 22, item 2): free-form text -> the words the built-in model was
trained on. Its captions (``training/procedural.py``) name one of 8 colours, 4 shapes, 7 motions and 6
backgrounds in a few templates; a prompt in other words ("a crimson ball rolling leftwards") reaches its
text encoder as a caption it never saw. This maps synonyms and paraphrases onto that vocabulary and writes
the caption in a training template. No model: a word table, checked against the training vocabulary by a test.
"""
from __future__ import annotations

import re

# canonical word -> other words for it (the canonical words are training/procedural.py's vocabulary)
COLOURS = {
    "red": ("crimson", "scarlet", "ruby", "cherry", "vermilion", "maroon", "blood"),
    "green": ("emerald", "lime", "jade", "olive", "grass", "leaf", "mint"),
    "blue": ("azure", "cobalt", "sapphire", "ultramarine", "sky", "royal"),
    "yellow": ("golden", "gold", "lemon", "sunny", "canary", "mustard"),
    "purple": ("violet", "lilac", "lavender", "plum", "mauve", "indigo", "amethyst"),
    "orange": ("tangerine", "apricot", "amber", "rust", "copper", "pumpkin"),
    "cyan": ("turquoise", "teal", "aqua", "aquamarine"),
    "pink": ("rose", "salmon", "fuchsia", "magenta", "rosy", "coral"),
}
SHAPES = {
    "circle": ("ball", "disc", "disk", "dot", "orb", "sphere", "round", "ring", "bubble", "coin", "circular", "blob"),
    "square": ("box", "cube", "block", "rectangle", "tile", "quad", "cubic", "brick", "crate"),
    "triangle": ("pyramid", "wedge", "triangular", "cone", "arrowhead"),
    "star": ("starburst", "pentagram", "asterisk", "sparkle", "starfish", "star-shaped"),
}
MOTIONS = {  # checked in this order: a direction word wins over "moves", a size change over "stays"
    "left": ("leftward", "leftwards", "westward", "westwards", "left"),
    "right": ("rightward", "rightwards", "eastward", "eastwards", "right"),
    "up": ("upward", "upwards", "rises", "rising", "rise", "ascends", "ascending", "climbs", "climbing", "soars", "lifts", "floats up", "up"),
    "down": ("downward", "downwards", "falls", "falling", "fall", "drops", "dropping", "descends", "descending", "sinks", "sinking",
             "plummets", "down"),
    "growing": ("grows", "growing", "grow", "enlarges", "expands", "expanding", "inflates", "swells", "swelling", "bigger", "larger"),
    "shrinking": ("shrinks", "shrinking", "shrink", "contracts", "contracting", "deflates", "dwindles", "smaller", "tinier"),
    "still": ("motionless", "static", "stationary", "stays", "staying", "rests", "resting", "unmoving", "frozen", "idle", "still",
              "not moving", "does not move", "doesn't move", "sits"),
}
BACKGROUNDS = {
    "dark blue": ("navy", "midnight", "dark-blue", "deep blue", "dark blue"),
    "grey": ("gray", "silver", "ash", "slate", "grey"),
    "black": ("dark", "night", "pitch", "ebony", "black"),
    "white": ("snowy", "pale", "ivory", "blank", "white"),
    "striped": ("stripes", "stripy", "lines", "lined", "banded", "striped"),
    "checkered": ("checkerboard", "chequered", "checks", "checked", "grid", "chessboard", "tiled", "checkered"),
}
# the training phrase of each motion (training/procedural.py's first phrase) and a training template
MOTION_PHRASES = {"left": "drifts to the left", "right": "drifts to the right", "up": "rises", "down": "falls", "growing": "grows",
                  "shrinking": "shrinks", "still": "stays still"}
_BACKGROUND_SPAN = re.compile(r"((?:[\w-]+\s+){0,3}?)(?:background|backdrop|backdrops|backgrounds)\b")


def _stem(word: str) -> str:
    """A crude English stem, enough to match "plummeting", "plummets" and "plummet"."""
    for suffix in ("ing", "es", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _stems(text: str) -> str:
    """``text`` as space-separated stems between spaces (hyphens split words: "cherry-red" -> "cherry red")."""
    return " " + " ".join(_stem(word) for word in re.findall(r"[a-z']+", text.lower())) + " "


def _find(text: str, table: dict[str, tuple[str, ...]]) -> str | None:
    """The canonical word whose own word or synonym occurs first in ``text`` (whole words, stemmed)."""
    stems, best = _stems(text), None
    for canonical, others in table.items():
        for word in (canonical, *others):
            at = stems.find(_stems(word))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, canonical)
    return best[1] if best else None


def _find_motion(text: str) -> str | None:
    stems = _stems(text)
    for canonical, words in MOTIONS.items():
        if any(_stems(word) in stems for word in words):
            return canonical
    return None


def builtin_caption(prompt: str) -> tuple[str, str]:
    """(caption in the built-in model's words, note). What is not recognised is left out and the note names it;
    a prompt with nothing recognised comes back unchanged."""
    text = " " + prompt.lower().replace("colored", "").replace("coloured", "") + " "
    background = None
    span = _BACKGROUND_SPAN.search(text)
    if span:
        background = _find(span.group(1), BACKGROUNDS)
        text = text[: span.start()] + " " + text[span.end():]  # the background's words do not name the shape's colour
    colour, shape, motion = _find(text, COLOURS), _find(text, SHAPES), _find_motion(text)
    missing = [name for name, value in (("colour", colour), ("shape", shape), ("motion", motion)) if value is None]
    if colour is None and shape is None and motion is None:
        return prompt, "nothing in the prompt names a colour, shape or motion the built-in model knows: passed through"
    words = " ".join(w for w in (colour, shape or "shape") if w)
    caption = f"a {words} {MOTION_PHRASES[motion]}" if motion else f"a {words}"
    if background:
        caption += f" on a {background} background"
    note = f"not recognised: {', '.join(missing)}" if missing else ""
    return caption, note
