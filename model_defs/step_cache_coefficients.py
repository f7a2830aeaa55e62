"""Calibration data of the step caches (``step_cache``), and which set a model preset takes: TeaCache rescaling
polynomials (which cheap input a set is fitted on, its coefficients highest power first, as ``numpy.poly1d``) and
MagCache magnitude ratios (per step, the mean over tokens of |residual_i| / |residual_i-1|).

Published sets: ali-vilab/TeaCache, ``TeaCache4Wan2.1/teacache_generate.py`` (commit 7c10efc, 2025-06-08), the
``coefficients`` assigned in ``main`` for ``--use_ret_steps`` (fitted on the time modulation ``e0``; retention of
the first 5 of 50 steps, cutoff at the last) and without it (fitted on the time embedding ``e``; first and last
step kept). TeaCache publishes no set for Wan 2.1 FLF2V or Wan 2.2 (TI2V-5B, A14B): those models take
``fbcache`` or an explicit set. A Wan 2.2 A14B expert has the shapes of Wan 2.1 T2V-14B, and a single file of it
is detected as that preset, so ``auto`` gives it the 2.1 14B set (an approximation, not a published fit).

MagCache ratios: Zehong-Ma/MagCache, ``MagCache4Wan2.1/magcache_generate.py`` (commit df81cb1, 2025-11-17),
``mag_ratios`` for T2V 1.3B/14B (50 steps) and I2V 14B 480p/720p (40 steps): their arrays interleave the
conditional and unconditional branch, which agree to the third decimal; we keep the conditional one (our branches
are rows of one evaluation). Their Wan 2.2 ratios span both A14B experts in one array and are not taken.

The built-in model's sets are fitted by the repo: ``python benchmarks/step_cache_calibrate.py`` (see there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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



@dataclass(frozen=True)
class MagnitudeRatios:
    ratios: tuple[float, ...]  # one per step of the calibrated run, step 0's 1.0 (it has no previous step)
    source: str


_MAGCACHE_WAN21 = "Zehong-Ma/MagCache MagCache4Wan2.1/magcache_generate.py"

MAG_RATIOS: dict[str, MagnitudeRatios] = {
    "wan2.1-t2v-1.3b": MagnitudeRatios((1.0, 1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957, 0.99511,
        0.99535, 0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415, 0.99419, 0.99396, 0.99388, 0.99349, 0.99309,
        0.9927, 0.99228, 0.99171, 0.99137, 0.99068, 0.99005, 0.98944, 0.98849, 0.98758, 0.98644, 0.98504, 0.9836, 0.98202, 0.97977,
        0.97717, 0.9741, 0.97003, 0.96538, 0.9593, 0.95086, 0.94013, 0.92402, 0.90241, 0.86821, 0.81838), _MAGCACHE_WAN21),
    "wan2.1-t2v-14b": MagnitudeRatios((1.0, 1.02504, 1.00025, 0.9985, 0.99779, 0.9966, 0.99482, 0.99467, 0.99664, 0.99434, 0.99533,
        0.99468, 0.99438, 0.99516, 0.99384, 0.99404, 0.99517, 0.99409, 0.99428, 0.99347, 0.99418, 0.99271, 0.99313, 0.99215, 0.99218,
        0.99216, 0.99163, 0.99138, 0.98982, 0.98996, 0.9887, 0.98772, 0.98767, 0.98573, 0.98501, 0.9838, 0.98177, 0.98037, 0.97678,
        0.97546, 0.97184, 0.96711, 0.96349, 0.95629, 0.94926, 0.93964, 0.92511, 0.90693, 0.8796, 0.86111), _MAGCACHE_WAN21),
    "wan2.1-i2v-14b-480p": MagnitudeRatios((1.0, 0.98783, 0.97559, 0.98311, 0.98202, 0.9888, 0.98762, 0.98957, 0.99052, 0.99383,
        0.98857, 0.99065, 0.98845, 0.99057, 0.98957, 0.98601, 0.98823, 0.98756, 0.98808, 0.98721, 0.98571, 0.98543, 0.98157, 0.98411,
        0.97952, 0.98149, 0.9774, 0.97825, 0.97355, 0.97085, 0.97056, 0.96588, 0.96113, 0.9567, 0.94961, 0.93973, 0.93217, 0.91878,
        0.90955, 0.92617), _MAGCACHE_WAN21),
    "wan2.1-i2v-14b-720p": MagnitudeRatios((1.0, 0.99428, 0.98588, 0.98273, 0.99018, 0.98911, 0.98646, 0.99454, 0.9891, 0.99124,
        0.99102, 0.99215, 0.99515, 0.99576, 0.99068, 0.99097, 0.99166, 0.99041, 0.99201, 0.99101, 0.98599, 0.98845, 0.98848, 0.98862,
        0.98718, 0.98497, 0.98264, 0.98389, 0.97938, 0.97535, 0.97498, 0.973, 0.96827, 0.96261, 0.95335, 0.94649, 0.93397, 0.91636,
        0.89088, 0.8679), _MAGCACHE_WAN21),
    # `python benchmarks/step_cache_calibrate.py --prompts 8`: 20 steps, cfg 5, shift 5, unipc
    "builtin-tiny": MagnitudeRatios((1.0, 1.05112, 1.01596, 1.0051, 0.98961, 0.97741, 0.98121, 0.97813, 0.9724, 0.97429, 0.97351,
        0.96179, 0.95953, 0.95382, 0.94697, 0.93011, 0.91774, 0.89942, 0.87637, 0.86605), "benchmarks/step_cache_calibrate.py"),
}
PRESET_MAG_RATIOS: dict[str, str] = {
    "wan2.1-t2v-1.3b": "wan2.1-t2v-1.3b",
    "wan2.1-t2v-14b": "wan2.1-t2v-14b",
    "wan2.1-i2v-14b": "wan2.1-i2v-14b-480p",
    "builtin-tiny": "builtin-tiny",
}


def ratios_for_steps(ratios: Sequence[float], steps: int) -> tuple[float, ...]:
    """Calibrated per-step ratios mapped to a run of ``steps`` steps by nearest index, as MagCache does
    (``nearest_interp``: the first and the last step map onto the first and the last)."""
    if steps == 1:
        return (ratios[-1],)
    scale = (len(ratios) - 1) / (steps - 1)
    return tuple(ratios[int(round(i * scale))] for i in range(steps))
