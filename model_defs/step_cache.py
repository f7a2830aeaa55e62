"""Step caching: skip the DiT's block stack on sampling steps where its effect barely changes, and reuse the
residual (output of the blocks minus their input) of the last step that ran them.

Methods (the decision is the only thing that differs; the reuse is the same residual add):
- ``teacache`` — Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"
  (ali-vilab/TeaCache, ``TeaCache4Wan2.1/teacache_generate.py``): at every evaluation, the relative L1 change of a
  cheap input (for Wan: the time modulation ``e0``, or the time embedding ``e``) since the previous evaluation is
  rescaled by a polynomial fitted per model (``step_cache_coefficients``) into an estimate of the relative change
  of the blocks' output; estimates accumulate since the last computed evaluation, and the blocks are skipped
  while the sum stays below the threshold (then the sum restarts at 0 on the next computed one).
- ``magcache`` — Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache" (Zehong-Ma/MagCache,
  ``MagCache4Wan2.1/magcache_generate.py``): the per-step ratio of the residual's magnitude to the previous step's,
  calibrated once per model, is nearly prompt-independent; while skipping, the product of the ratios since the last
  computed step drifts from 1 and ``|1 - product|`` accumulates as the error; a step is skipped while the error
  stays below the threshold and at most ``MAGCACHE_MAX_SKIPS`` steps in a row (MagCache's K).
- ``fbcache`` — first-block cache (ParaAttention's "First Block Cache", chengzeyi/ParaAttention): the first block
  always runs; when the relative L1 change of its residual since the last fully computed evaluation is below the
  threshold, the other blocks are skipped and their cached residual is added. No coefficients: any model.

State lives in one ``StepCacheRun`` per sampling run and DiT (``cached``), entered by the sampler for the DiT of
each step and dropped when the run ends or the other expert of a pair takes over: nothing leaks between runs,
experts or graph branches. The guidance branches are rows of one batch (``guided_velocity`` runs cond and uncond
as 2B): the residual is cached per row, and the skip decision, one per evaluation, takes the largest per-row
estimate (a packed call is one row holding every sequence; per-frame modulation rows are rows too). Under a
parallel DiT each rank sees only its rows and tokens: the metrics are reduced over the ranks (the layout's
``relative_change``), so every rank takes the decision one process would.
Caching acts only on steps ``start * steps <= i < end * steps``; the published methods keep the first steps full.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .step_cache_coefficients import (
    COEFFICIENTS, MAG_RATIOS, PRESET_COEFFICIENTS, PRESET_MAG_RATIOS, ratios_for_steps,
)

# the calibration sets each method takes: name -> data, and model preset -> name
_SETS = {"teacache": (COEFFICIENTS, PRESET_COEFFICIENTS), "magcache": (MAG_RATIOS, PRESET_MAG_RATIOS)}

log = logging.getLogger(__name__)

CACHE_METHODS = ("teacache", "magcache", "fbcache")
MAGCACHE_MAX_SKIPS = 2  # MagCache's default K for Wan (magcache_generate.py --magcache_K)
AUTO_COEFFICIENTS = "auto"
MAX_THRESHOLD = 1.0  # published settings go up to 0.3 (TeaCache, Wan 2.1 I2V 720p); beyond 1 nothing is computed


def _fraction(name: str, value, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (0.0 < value <= 1.0 if low_open else 0.0 <= value < 1.0):
        rule = "in (0, 1]" if low_open else "in [0, 1)"
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number {rule}")


@dataclass(frozen=True)
class StepCacheSettings:
    """How a model caches steps, validated once. ``threshold`` 0 is off (every evaluation computed);
    ``start``/``end``: the fraction of the run's steps where caching may act; ``coefficients``: the name of a
    TeaCache polynomial in ``COEFFICIENTS`` or ``auto`` (by the model's preset, ``resolve``)."""

    method: str = CACHE_METHODS[0]
    threshold: float = 0.0
    start: float = 0.1  # TeaCache's use_ret_steps mode keeps the first 10% of the steps; measured on the built-in model too
    end: float = 1.0
    coefficients: str = AUTO_COEFFICIENTS

    def __post_init__(self):
        if self.method not in CACHE_METHODS:
            raise ValueError(f"method={self.method!r} is not allowed; allowed values: {list(CACHE_METHODS)}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 <= t <= MAX_THRESHOLD:
            raise ValueError(f"threshold={t!r} is not allowed: it must be a finite number from 0 (off) to {MAX_THRESHOLD}")
        _fraction("start", self.start)
        _fraction("end", self.end, low_open=True)
        if self.start >= self.end:
            raise ValueError(f"start={self.start} and end={self.end} are not allowed: start must be below end")
        known = _SETS[self.method][0] if self.method in _SETS else {}
        if self.coefficients != AUTO_COEFFICIENTS and self.method in _SETS and self.coefficients not in known:
            raise ValueError(
                f"coefficients={self.coefficients!r} is not allowed for method {self.method!r}; allowed values: "
                f"{[AUTO_COEFFICIENTS, *known]}"
            )

    @property
    def active(self) -> bool:
        return self.threshold > 0.0

    def resolve(self, preset: str | None, model_name: str) -> "StepCacheSettings":
        """These settings with ``auto`` coefficients replaced by the method's set for ``preset`` (teacache,
        magcache); ValueError naming the model when no published or fitted set exists for it."""
        if self.method not in _SETS or self.coefficients != AUTO_COEFFICIENTS:
            return self
        known, by_preset = _SETS[self.method]
        name = by_preset.get(preset) if preset else None
        if name is None:
            raise ValueError(
                f"coefficients='auto': there are no {self.method} coefficients for model {model_name} "
                f"({preset or 'unknown kind'}); choose one of {list(known)} or method 'fbcache' (needs none)"
            )
        return StepCacheSettings(self.method, self.threshold, self.start, self.end, name)

    def describe(self) -> str:
        extra = f", {self.coefficients} coefficients" if self.method in _SETS else ""
        return f"{self.method} threshold {self.threshold:g}, steps {self.start:g}-{self.end:g} of the run{extra}"


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """The largest per-row ``mean|new - old| / mean|old|`` (rows: dim 0), as one float."""
    new, old = new.float().flatten(1), old.float().flatten(1)
    change = (new - old).abs().mean(1) / old.abs().mean(1).clamp_min(1e-12)  # [rows]
    return float(change.max())


def _change(block_args: tuple, new: torch.Tensor, old: torch.Tensor, tokens: bool) -> float:
    """``relative_l1``, or, for a rank's part of a parallel forward (``parallel.sequence``: the layout, the last
    block argument, has ``relative_change``), the same number for the whole batch on every rank: they decide alike."""
    measure = getattr(block_args[-1], "relative_change", None) if block_args else None
    return relative_l1(new, old) if measure is None else measure(new, old, tokens)


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """``numpy.poly1d(coefficients)(x)``: highest power first, as TeaCache stores its coefficients."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


class StepCacheRun:
    """One sampling run's cache for one DiT: the hook ``WanDiT._transformer`` calls around its block loop.
    ``before_blocks`` returns the tokens and the blocks still to run (none when the step is skipped);
    ``after_blocks`` gets their output and returns the blocks' result (the cached residual added when skipped)."""

    def __init__(self, settings: StepCacheSettings, steps: int):
        self.settings = settings
        self.steps = steps
        self.first_step = math.ceil(settings.start * steps)
        self.end_step = math.ceil(settings.end * steps)
        self.step = 0
        self.computed = 0
        self.reused = 0
        self._estimate_input: torch.Tensor | None = None  # teacache: the cheap input of the previous evaluation
        self._accumulated = 0.0
        self._first_residual: torch.Tensor | None = None  # fbcache: block 0's residual at the last computed evaluation
        self._residual: torch.Tensor | None = None  # what the skipped blocks add, from the last computed evaluation
        self._blocks_input: torch.Tensor | None = None
        self._skip = False
        if settings.method == "teacache":
            coefficients = COEFFICIENTS[settings.coefficients]
            self._poly, self._estimate_from = coefficients.polynomial, coefficients.estimate
        if settings.method == "magcache":
            self._ratios = ratios_for_steps(MAG_RATIOS[settings.coefficients].ratios, steps)
            self._magnitude, self._skipped = 1.0, 0  # since the last computed evaluation

    def at_step(self, index: int) -> None:
        """The solver is at step ``index`` (0-based) of ``steps``."""
        self.step = index

    def _may_skip(self, x: torch.Tensor) -> bool:
        in_window = self.first_step <= self.step < self.end_step
        return in_window and self._residual is not None and self._residual.shape == x.shape

    def before_blocks(
        self, x: torch.Tensor, time_emb: torch.Tensor, time_mod: torch.Tensor, blocks: nn.ModuleList, block_args: tuple
    ) -> tuple[torch.Tensor, Sequence[nn.Module]]:
        """x ``[B,S,C]`` or ``[1,T,C]``; time_emb ``[N,C]``, time_mod ``[N,6,C]`` fp32 (rows per sample, sequence or
        frame); ``blocks(x, *block_args)`` is how a block runs. Returns (x, the blocks left to run)."""
        if self.settings.method == "teacache":
            cheap = time_mod if self._estimate_from == "time_modulation" else time_emb
            previous, self._estimate_input = self._estimate_input, cheap.detach().clone()
            self._skip = False
            if self._may_skip(x) and previous is not None and previous.shape == cheap.shape:
                self._accumulated += polynomial(self._poly, _change(block_args, cheap, previous, tokens=False))
                self._skip = self._accumulated < self.settings.threshold
            if not self._skip:
                self._accumulated = 0.0
            self._blocks_input = x
            return x, (() if self._skip else blocks)
        if self.settings.method == "magcache":
            self._skip = False
            if self._may_skip(x):
                self._magnitude *= self._ratios[min(self.step, len(self._ratios) - 1)]
                self._skipped += 1
                self._accumulated += abs(1.0 - self._magnitude)
                self._skip = self._accumulated < self.settings.threshold and self._skipped <= MAGCACHE_MAX_SKIPS
            if not self._skip:
                self._accumulated, self._magnitude, self._skipped = 0.0, 1.0, 0
            self._blocks_input = x
            return x, (() if self._skip else blocks)
        first = blocks[0](x, *block_args)  # fbcache: block 0 always runs
        first_residual = first - x
        self._skip = (
            self._may_skip(first) and self._first_residual is not None and self._first_residual.shape == first.shape
            and _change(block_args, first_residual, self._first_residual, tokens=True) < self.settings.threshold
        )
        if not self._skip:
            self._first_residual = first_residual
        self._blocks_input = first
        return first, (() if self._skip else blocks[1:])

    def after_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self._skip:
            self.reused += 1
            return self._blocks_input + self._residual
        self.computed += 1
        self._residual = x - self._blocks_input
        return x  # the computed result itself: a run that never skips is bit-identical to no cache

    def summary(self) -> str:
        total = self.computed + self.reused
        ratio = total / self.computed if self.computed else float("inf")
        return (f"Spacetime step cache ({self.settings.describe()}): {self.computed} of {total} DiT evaluations "
                f"computed, {self.reused} reused ({ratio:.2f}x fewer)")


@contextlib.contextmanager
def cached(dit: nn.Module, settings: StepCacheSettings | None, steps: int) -> Iterator[StepCacheRun | None]:
    """``with cached(dit, settings, steps) as run:`` the DiT caches steps inside the block (``run.at_step(i)``
    tells it the solver's step); None and nothing installed when ``settings`` is None or its threshold 0. On exit,
    also when the block raises, the DiT computes every step again and one line logs what the run computed."""
    if settings is None or not settings.active:
        yield None
        return
    if getattr(dit, "step_cache", None) is not None:
        raise RuntimeError("this DiT is already caching steps for another sampling run")
    run = StepCacheRun(settings, steps)
    dit.step_cache = run
    try:
        yield run
    finally:
        dit.step_cache = None
        if run.computed + run.reused:
            log.info(run.summary())
