"""Learning-rate schedules as multipliers of the peak rate, by optimizer step."""
from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine", min_factor: float = 0.0,
              cooldown: float = 0.1, const_factor: float = 0.5, anneal: float = 0.1) -> float:
    """Multiplier at ``step`` (0-based) of ``total`` steps.

    cosine: linear warm-up, then cosine decay to ``min_factor``.
    constant: linear warm-up, then 1.
    infinite: warm-up; cosine cool-down over ``cooldown`` of the steps to ``const_factor``; constant;
    linear annealing to ``min_factor`` over the last ``anneal`` of the steps (continual pretraining)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(total - warmup, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "infinite":
        cool_end = warmup + int(cooldown * total)
        anneal_start = total - int(anneal * total)
        if step < cool_end:
            t = (step - warmup) / max(cool_end - warmup, 1)
            return const_factor + (1 - const_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if step < anneal_start:
            return const_factor
        t = (step - anneal_start) / max(total - anneal_start, 1)
        return const_factor + (min_factor - const_factor) * t
    raise ValueError(f"unknown schedule {kind!r}; choose one of: cosine, constant, infinite")
