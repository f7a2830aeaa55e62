"""Wan 2.2 A14B's two experts: a high-noise DiT runs the first steps of a sampling run (layout and
motion), a low-noise DiT the rest (detail), switched once, at the step where the noise level drops
below the published boundary.

Source: Wan-Video/Wan2.2 ``wan/configs/wan_t2v_A14B.py`` (boundary 0.875, shift 12.0, guide scales
3.0 low-noise / 4.0 high-noise, 40 steps) and ``wan/configs/wan_i2v_A14B.py`` (boundary 0.900, shift
5.0, guide scales 3.5 / 3.5, 40 steps); ``wan/text2video.py`` switches when the step's timestep drops
below ``boundary * 1000``, which for our noise levels is ``sigma < boundary`` (timesteps are
``1000 * sigma``, or its integer part, and the boundaries are whole thousandths).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The published switch points, by the experts' kind (the DiT config's model_type).
BOUNDARIES = {"t2v": 0.875, "i2v": 0.900}


@dataclass(frozen=True)
class ExpertSwitch:
    """When a sampling run hands over from the high-noise to the low-noise expert: at the first step whose
    noise level is below ``boundary``, or, when ``switch_step`` is set, after that many steps (0: the
    low-noise expert only; ``steps``: the high-noise one only). ``cfg_low_noise``: the low-noise
    expert's guidance scale (None: the sampler's cfg for both)."""

    boundary: float
    switch_step: int | None = None
    cfg_low_noise: float | None = None

    def __post_init__(self):
        if not 0.0 < self.boundary < 1.0:
            raise ValueError(f"boundary={self.boundary!r} is not allowed: it must be in (0, 1)")
        if self.switch_step is not None and (isinstance(self.switch_step, bool) or self.switch_step < 0):
            raise ValueError(f"switch_step={self.switch_step!r} is not allowed: it must be >= 0 (or unset: by the boundary)")

    def first_low_noise_step(self, sigmas: torch.Tensor) -> int:
        """The index of the first step the low-noise expert runs, for a run over ``sigmas`` (steps + 1
        levels); equal to the step count when it never runs."""
        steps = len(sigmas) - 1
        if self.switch_step is not None:
            return min(self.switch_step, steps)
        below = [i for i in range(steps) if float(sigmas[i]) < self.boundary]
        return below[0] if below else steps

    def describe(self, sigmas: torch.Tensor) -> str:
        steps = len(sigmas) - 1
        first = self.first_low_noise_step(sigmas)
        rule = f"switch_step={self.switch_step}" if self.switch_step is not None else f"boundary {self.boundary}"
        parts = ([f"high-noise expert for steps 1-{first}"] if first > 0 else []) + (
            [f"low-noise expert for steps {first + 1}-{steps}"] if first < steps else [])
        return f"{', '.join(parts)} of {steps} ({rule})"


def default_boundary(model_type: str) -> float:
    """The published boundary for experts of ``model_type``."""
    kind = "i2v" if model_type in ("i2v", "flf2v") else "t2v"
    return BOUNDARIES[kind]
