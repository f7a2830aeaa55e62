"""What several nodes share: widget specs (in the order workflows' ``widgets_values`` rely on), the solver
settings they make, and the checks ComfyUI runs at validation (``VALIDATE_INPUTS``), before any model
loads or any step runs."""
from __future__ import annotations

import math

from ..model_defs.bundles import any_vae_rules
from ..model_defs.flow_matching import SOLVERS, SolverSettings
from ..model_defs.vae_tiles import check_tile_size

MAX_SEED = 0xFFFFFFFFFFFFFFFF
KNOWN_FRAMES = "SPACETIME_KNOWN_FRAMES"
CLIP_VISION = "SPACETIME_CLIP_VISION"

SEED = ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True})
# The solver settings every sampler node offers, in this order.
SOLVER_WIDGETS = {
    "steps": ("INT", {"default": 20, "min": 1, "max": 1000}),
    "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
    "shift": ("FLOAT", {"default": 5.0, "min": 0.01, "max": 100.0, "step": 0.1, "tooltip": "Timestep shift (Wan: 5 for 720p, 3 for 480p)."}),
    "scheduler": (list(SOLVERS), {
        "default": SOLVERS[0],
        "tooltip": "unipc/euler/heun: Wan's schedule (20+ steps with cfg). Few-step LoRAs at cfg 1: lcm (estimate, then re-noise "
                   "from the seed; lightx2v Wan 2.1, CausVid) or euler_distill (plain Euler; the built-in few-step LoRA), both on "
                   "the distillation levels t = 1000 (1 - i/steps), shifted (lightx2v's [1000, 750, 500, 250] at 4 steps).",
    }),
}
SWITCH_STEP = ("INT", {
    "default": -1, "min": -1, "max": 1000,
    "tooltip": "-1: switch experts at the model's published boundary (any step count). n >= 0: the high-noise expert runs the first n steps.",
})
CFG_LOW_NOISE = ("FLOAT", {
    "default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
    "tooltip": "The low-noise expert's cfg; 0: the sampler's cfg for both (Wan 2.2 T2V uses 4.0 high, 3.0 low).",
})
DENOISE = ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "< 1 keeps part of the input latent (video-to-video)."})
_RULES = any_vae_rules()  # the widgets' steps: every supported family's sizes are on them
WIDTH = ("INT", {"default": 64, "min": _RULES.width_unit, "max": 8192, "step": _RULES.width_unit})
HEIGHT = ("INT", {"default": 64, "min": _RULES.height_unit, "max": 8192, "step": _RULES.height_unit})
FRAMES = ("INT", {"default": 17, "min": 1, "max": 4097, "step": _RULES.temporal_factor, "tooltip": f"1 + {_RULES.temporal_factor}k frames."})
TILE_SIZE = ("INT", {
    "default": 0, "min": 0, "max": 4096, "step": 32,
    "tooltip": "Pixels per spatial tile (a multiple of the VAE's factor: 8 for Wan 2.1, 16 for Wan 2.2), tiles overlap and are "
               "blended; 0: auto (untiled up to 1280x720, else 256-px tiles). Smaller tiles: less memory, more time.",
})
STRENGTH = ("FLOAT", {
    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
    "tooltip": "1 keeps the given frames exactly; lower blends them with what the model generates; 0 ignores them.",
})


def seed_of(seed: int, index: int) -> int:
    """The seed of the ``index``-th video or chunk made from ``seed``."""
    return (seed + index) % (MAX_SEED + 1)


def solver_settings(steps: int, cfg: float, shift: float, scheduler: str, denoise: float = 1.0) -> SolverSettings:
    return SolverSettings(steps=steps, cfg=cfg, shift=shift, scheduler=scheduler, denoise=denoise)


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message stays one readable line whatever a file holds."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-2:]}"


def widget_problem(kind, options: dict, value) -> str | None:
    """What is wrong with a literal ``value`` for a widget of ``kind`` (a combo list, INT, FLOAT, STRING,
    BOOLEAN) and ``options`` (min, max), or None. The one rule for widget values: ComfyUI's own checks
    (which it skips for the inputs a VALIDATE_INPUTS takes), plus finite numbers and real text."""
    if isinstance(kind, (list, tuple)):
        return None if value in kind else f"value {short_repr(value)} is not allowed; allowed values: {list(kind)}"
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}.get(kind)
    if expected is None:
        return f"expects a connection of type {kind}, got the value {short_repr(value)}"
    if not isinstance(value, expected) or (kind in ("INT", "FLOAT") and isinstance(value, bool)):
        return f"expects {kind}, got {short_repr(value)}"
    if kind == "STRING":
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON can spell half a surrogate pair; tokenizers and file systems then fail
            return f"not valid text: {value[exc.start]!r} at index {exc.start} is half of a surrogate pair; allowed: any Unicode text"
        return None
    if kind == "BOOLEAN":
        return None
    low, high = options.get("min"), options.get("max")
    if isinstance(value, float) and not math.isfinite(value):  # NaN compares False with every bound
        return f"{value} is not a finite number; allowed: {low} to {high}"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{value} is out of range; allowed: {low} to {high}"
    return None


def validate_inputs(node_class, values: dict, *rules) -> bool | str:
    """A ``VALIDATE_INPUTS`` result: True, or the first problem as one line. ``values`` are the node's
    literal inputs (ComfyUI leaves out or passes None for linked ones); each is checked against its widget
    spec (ComfyUI skips its own range and choice checks for inputs its VALIDATE_INPUTS takes), then every
    ``rule(values)`` whose inputs are all literal may raise ValueError."""
    spec = node_class.INPUT_TYPES()
    entries = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, value in values.items():
        if value is None or name not in entries:
            continue
        kind, options = entries[name][0], (entries[name][1] if len(entries[name]) > 1 else {})
        problem = widget_problem(kind, options, value)
        if problem:
            return f"{name}: {problem}"
    for rule in rules:
        try:
            rule(values)
        except (KeyError, TypeError):
            continue  # an input the rule needs is linked: checked when the node runs
        except ValueError as exc:
            return str(exc)
    return True


def literal_values(values: dict, *names: str) -> list:
    """The values of ``names``; KeyError (the rule is skipped) when one is linked, i.e. not known yet."""
    found = [values.get(name) for name in names]
    if any(value is None for value in found):
        raise KeyError("linked input")
    return found


def size_rule(values: dict) -> None:
    """width, height and frames as any supported VAE takes them (the loaded one's rules at run time)."""
    width, height, frames = literal_values(values, "width", "height", "frames")
    any_vae_rules().check_size(width, height, frames)


def tile_rule(values: dict) -> None:
    """tile_size as any supported VAE takes it (the smallest factor); the loaded VAE's factor is checked at run time."""
    (tile_size,) = literal_values(values, "tile_size")
    check_tile_size(tile_size, _RULES.spatial_factor)


def solver_rule(values: dict) -> None:
    steps, cfg, shift, scheduler = literal_values(values, "steps", "cfg", "shift", "scheduler")
    denoise = values.get("denoise")
    solver_settings(steps, cfg, shift, scheduler, 1.0 if denoise is None else denoise)
