"""Spacetime Step Cache: a model in, the same model with step caching out (``model_defs/step_cache.py``)."""
from __future__ import annotations

from ..model_defs.step_cache import AUTO_COEFFICIENTS, CACHE_METHODS, MAX_THRESHOLD, StepCacheSettings
from ..model_defs.step_cache_coefficients import COEFFICIENTS, MAG_RATIOS
from .widgets import literal_values, validate_inputs

_DEFAULTS = StepCacheSettings()


def _settings_rule(values: dict) -> None:
    """The settings as one value, checked as the run will check them (start below end, ...)."""
    StepCacheSettings(*literal_values(values, "method", "threshold", "start", "end", "coefficients"))


class SpacetimeStepCache:
    DESCRIPTION = (
        "Skips the DiT's blocks on sampling steps whose change is estimated to be small and reuses the last computed "
        "residual instead (TeaCache, MagCache or first-block cache): fewer DiT evaluations for a small change in the video. "
        "threshold 0 is off; larger skips more. Chain it after Load LoRA or Pair Experts; a later Step Cache replaces "
        "an earlier one. The sampler logs how many evaluations it computed and reused."
    )
    CATEGORY = "spacetime/loaders"
    RETURN_TYPES = ("SPACETIME_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SPACETIME_MODEL",),
                "method": (list(CACHE_METHODS), {
                    "default": _DEFAULTS.method,
                    "tooltip": "teacache: estimates the change from the timestep's modulation through a polynomial fitted "
                               "per model. magcache: from the residual's per-step magnitude ratios calibrated per model. "
                               "fbcache: runs the first block and compares its residual; any model.",
                }),
                "threshold": ("FLOAT", {
                    "default": 0.25, "min": 0.0, "max": MAX_THRESHOLD, "step": 0.01,
                    "tooltip": "0: off. The accumulated estimated change allowed before a step is computed again. Built-in "
                               "model: teacache 0.25 (2.2x fewer evaluations, adherence -0.02); Wan 2.1 (TeaCache's settings): 1.3B 0.05-0.1, 14B 0.1-0.2, I2V 0.2-0.3.",
                }),
                "start": ("FLOAT", {
                    "default": _DEFAULTS.start, "min": 0.0, "max": 0.99, "step": 0.01,
                    "tooltip": "Fraction of the steps always computed first (the early steps shape the video).",
                }),
                "end": ("FLOAT", {
                    "default": _DEFAULTS.end, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "Fraction of the steps after which every step is computed again (1: cache to the end).",
                }),
                "coefficients": ([AUTO_COEFFICIENTS, *COEFFICIENTS, *(name for name in MAG_RATIOS if name not in COEFFICIENTS)], {
                    "default": AUTO_COEFFICIENTS,
                    "tooltip": "teacache's polynomial or magcache's magnitude ratios: auto picks the model's (Wan 2.1: published "
                               "by TeaCache / MagCache; the built-in model: fitted by this pack); fbcache ignores it.",
                }),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, _settings_rule)

    def apply(self, model, method: str, threshold: float, start: float = _DEFAULTS.start, end: float = _DEFAULTS.end,
              coefficients: str = AUTO_COEFFICIENTS):
        return (model.with_step_cache(StepCacheSettings(method, threshold, start, end, coefficients)),)
