"""Learning-rate schedule: linear warm-up, then a half cosine down to a floor."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """The lr multiplier of optimiser step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` during warm-up (so the first step is not wasted at lr 0),
    reaching 1 at step ``warmup_steps - 1``; then ``min_ratio + (1 - min_ratio) * (1 +
    cos(pi * t)) / 2`` with ``t`` going from 0 at ``warmup_steps`` to 1 at ``total_steps``
    (and held at ``min_ratio`` after it).

    Args:
        step: optimiser steps taken so far.
        total_steps: steps of the whole run (>= 1).
        warmup_steps: warm-up length (0: none).
        min_ratio: the multiplier at the end, in [0, 1].
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_steps_for(total_steps: int, warmup: int | float) -> int:
    """``warmup`` as steps: an int is taken as is (capped at ``total_steps - 1``), a float
    is a share of ``total_steps``."""
    steps = warmup if isinstance(warmup, int) else round(float(warmup) * total_steps)
    return max(0, min(int(steps), total_steps - 1))


def build_scheduler(
    optimizer: Optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine`; call ``step()`` after each optimiser
    step. Its ``state_dict()`` is plain numbers (JSON-able), so runs resume without pickle."""
    for n in (total_steps, warmup_steps):
        if n < 0:
            raise ValueError(f"steps must be >= 0, got {n}")

    def factor(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup_steps, min_ratio)

    return LambdaLR(optimizer, factor)
