"""Learning-rate schedules as multipliers of the peak rate, by optimizer step.

Every run warms up from 0 over ``trainer.warmup_steps``, including a continual run started with
``init=`` (learning-rate re-warming: the new run's optimizer state is fresh, so it ramps up again).
``trainer_schedule(t)`` reads the trainer keys, so the training loop and the plot of the schedule
(``plots/schedule.png``) compute the very same rates."""
from __future__ import annotations

import math
from typing import Any

KINDS = ("cosine", "constant", "infinite")


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine", min_factor: float = 0.0,
              cooldown: float = 0.1, const_factor: float = 0.5, anneal: float = 0.1) -> float:
    """Multiplier at ``step`` (0-based) of ``total`` steps.

    cosine: linear warm-up ((step + 1) / warmup), then cosine decay to ``min_factor``.
    constant: linear warm-up, then 1.
    infinite (continual pretraining, Ibrahim et al. 2024): warm-up; a cosine cool-down from 1 to
    ``const_factor`` over ``int(cooldown * total)`` steps; constant at ``const_factor``; linear
    annealing towards ``min_factor`` over the last ``int(anneal * total)`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(total - warmup, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "infinite":
        cool_end, anneal_start = _infinite_bounds(total, warmup, cooldown, anneal)
        if step < cool_end:
            t = (step - warmup) / max(cool_end - warmup, 1)
            return const_factor + (1 - const_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if step < anneal_start:
            return const_factor
        t = (step - anneal_start) / max(total - anneal_start, 1)
        return const_factor + (min_factor - const_factor) * t
    raise ValueError(f"unknown schedule {kind!r}; choose one of: {', '.join(KINDS)}")


def _infinite_bounds(total: int, warmup: int, cooldown: float, anneal: float) -> tuple[int, int]:
    """(end of the cool-down, start of the annealing) of the infinite schedule."""
    return warmup + int(cooldown * total), total - int(anneal * total)


def trainer_schedule(t: dict[str, Any]) -> dict[str, Any]:
    """``lr_factor``'s keyword arguments from the trainer config (checked: one-line errors)."""
    kw = {"total": int(t["max_steps"]), "warmup": int(t.get("warmup_steps", 0) or 0),
          "kind": str(t.get("schedule", "cosine")), "min_factor": float(t.get("min_lr_factor", 0.0)),
          "cooldown": float(t.get("cooldown_fraction", 0.1)), "const_factor": float(t.get("constant_factor", 0.5)),
          "anneal": float(t.get("anneal_fraction", 0.1))}
    check_schedule(**kw)
    return kw


def check_schedule(total: int, warmup: int, kind: str, min_factor: float, cooldown: float,
                   const_factor: float, anneal: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown trainer.schedule {kind!r}; choose one of: {', '.join(KINDS)}")
    if warmup < 0:
        raise ValueError(f"trainer.warmup_steps must be >= 0, got {warmup}")
    if kind != "infinite":
        return
    for key, v in (("cooldown_fraction", cooldown), ("anneal_fraction", anneal)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"trainer.{key} must lie in [0, 1], got {v}")
    if not 0.0 < const_factor <= 1.0:
        raise ValueError(f"trainer.constant_factor must lie in (0, 1], got {const_factor}")
    cool_end, anneal_start = _infinite_bounds(total, warmup, cooldown, anneal)
    if cool_end > anneal_start:
        raise ValueError(f"trainer.schedule=infinite: warm-up ({warmup} steps) + cool-down ({int(cooldown * total)}) "
                         f"+ annealing ({int(anneal * total)}) exceed trainer.max_steps={total}; "
                         f"lower trainer.cooldown_fraction / trainer.anneal_fraction")


def phases(total: int, warmup: int, kind: str = "cosine", cooldown: float = 0.1, anneal: float = 0.1,
           **_: Any) -> list[tuple[str, int, int]]:
    """The schedule's named phases as (name, first step, end step), empty ones left out."""
    if kind == "infinite":
        cool_end, anneal_start = _infinite_bounds(total, warmup, cooldown, anneal)
        out = [("warm-up", 0, warmup), ("cool-down", warmup, cool_end), ("constant", cool_end, anneal_start),
               ("anneal", anneal_start, total)]
    else:
        out = [("warm-up", 0, min(warmup, total)), ("cosine decay" if kind == "cosine" else "constant",
                                                     min(warmup, total), total)]
    return [(n, a, b) for n, a, b in out if b > a]
