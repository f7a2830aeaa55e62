"""The learning-rate schedule every training stage uses."""
from __future__ import annotations

import math


def cosine_lr(peak: float, step: int, total: int, warmup: int = 0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine decay to zero at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
