"""TeaCache rescaling polynomials (``step_cache``): which cheap input a set is fitted on, its coefficients
(highest power first, as ``numpy.poly1d``), and where they come from; and which set a model preset takes.

Published sets: ali-vilab/TeaCache, ``TeaCache4Wan2.1/teacache_generate.py`` (commit 7c10efc, 2025-06-08), the
``coefficients`` assigned in ``main`` for ``--use_ret_steps`` (fitted on the time modulation ``e0``; retention of
the first 5 of 50 steps, cutoff at the last) and without it (fitted on the time embedding ``e``; first and last
step kept). TeaCache publishes no set for Wan 2.1 FLF2V or Wan 2.2 (TI2V-5B, A14B): those models take
``fbcache`` or an explicit set. A Wan 2.2 A14B expert has the shapes of Wan 2.1 T2V-14B, and a single file of it
is detected as that preset, so ``auto`` gives it the 2.1 14B set (an approximation, not a published fit).

The built-in model's set is fitted by the repo: ``python benchmarks/step_cache_calibrate.py`` (see there).
"""
from __future__ import annotations

from dataclasses import dataclass

ESTIMATE_INPUTS = ("time_modulation", "time_embedding")


@dataclass(frozen=True)
class TeaCacheCoefficients:
    estimate: str  # which cheap input the polynomial maps: ESTIMATE_INPUTS
    polynomial: tuple[float, ...]  # highest power first
    source: str


_TEACACHE_WAN21 = "ali-vilab/TeaCache TeaCache4Wan2.1/teacache_generate.py"

COEFFICIENTS: dict[str, TeaCacheCoefficients] = {
    # use_ret_steps=True: fitted on e0 (our time modulation)
    "wan2.1-t2v-1.3b": TeaCacheCoefficients(
        "time_modulation", (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02), _TEACACHE_WAN21),
    "wan2.1-t2v-14b": TeaCacheCoefficients(
        "time_modulation", (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01), _TEACACHE_WAN21),
    "wan2.1-i2v-14b-480p": TeaCacheCoefficients(
        "time_modulation", (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01), _TEACACHE_WAN21),
    "wan2.1-i2v-14b-720p": TeaCacheCoefficients(
        "time_modulation", (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02), _TEACACHE_WAN21),
    # use_ret_steps=False: fitted on e (our time embedding)
    "wan2.1-t2v-1.3b-embedding": TeaCacheCoefficients(
        "time_embedding", (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01), _TEACACHE_WAN21),
    "wan2.1-t2v-14b-embedding": TeaCacheCoefficients(
        "time_embedding", (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404), _TEACACHE_WAN21),
    "wan2.1-i2v-14b-480p-embedding": TeaCacheCoefficients(
        "time_embedding", (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01), _TEACACHE_WAN21),
    "wan2.1-i2v-14b-720p-embedding": TeaCacheCoefficients(
        "time_embedding", (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683), _TEACACHE_WAN21),
    # fitted by this repo: `python benchmarks/step_cache_calibrate.py --prompts 8` (20 steps, cfg 5, shift 5, unipc;
    # 304 pairs, x in [0.014, 0.21]; rms 0.086 around a mean change of 0.126: on this model the time modulation
    # predicts little beyond "about 11% per step, more at the end", so the threshold acts almost as a step stride)
    "builtin-tiny": TeaCacheCoefficients(
        "time_modulation", (-5.00465307e+02, 1.46076590e+02, 1.19082949e-01, -1.19272757e+00, 1.50469843e-01),
        "benchmarks/step_cache_calibrate.py"),
}

# The one place that says which set a model takes: its DiT preset (``wan_dit.DIT_PRESETS``) -> a COEFFICIENTS name.
# Wan 2.1 I2V 480p and 720p share one architecture: auto takes the 480p set (choose the 720p one explicitly).
PRESET_COEFFICIENTS: dict[str, str] = {
    "wan2.1-t2v-1.3b": "wan2.1-t2v-1.3b",
    "wan2.1-t2v-14b": "wan2.1-t2v-14b",
    "wan2.1-i2v-14b": "wan2.1-i2v-14b-480p",
    "builtin-tiny": "builtin-tiny",
}


def coefficients_for_preset(preset: str | None) -> str | None:
    """The COEFFICIENTS name ``auto`` gives a model of ``preset``, or None when none is published or fitted."""
    return PRESET_COEFFICIENTS.get(preset) if preset else None
