"""Honest statistics for evaluations: label-fraction subsets, seeds, bootstrap confidence intervals.

Every accuracy an evaluator reports comes from ``summarise``: the mean over seeds, their standard
deviation (0 with one seed), and a percentile-bootstrap 95% interval that resamples the test items
(the same resample for every seed, so the interval covers test-set sampling; the spread over seeds
covers training noise)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def label_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a stratified random ``fraction`` of the items, at least one per class present.

    labels: [n] int64 (single-label) or [n, K] multi-hot (then a plain random subset) -> [m] int64."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"eval.label_fraction values must lie in (0, 1], got {fraction}")
    n = labels.shape[0]
    if fraction == 1.0:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    if labels.dim() > 1:
        m = max(1, round(fraction * n))
        return torch.randperm(n, generator=g)[:m].sort().values
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        m = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:m]])
    return torch.cat(keep).sort().values


def bootstrap_ci(correct: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """correct: [S, n] (seeds x test items) or [n], per-item scores in [0, 1] -> (low, high) of the
    percentile bootstrap of the mean score (items resampled with replacement, seeds averaged)."""
    c = correct.float().reshape(-1, correct.shape[-1])
    n = c.shape[1]
    if n == 0:
        raise ValueError("no test items to bootstrap")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(n, (n_boot, n), generator=g)
    per_item = c.mean(0)  # averaging seeds first is exact: the resample is shared
    means = per_item[idx].mean(1)
    a = (1.0 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1.0 - a], dtype=means.dtype)).tolist()
    return float(lo), float(hi)


def summarise(correct_per_seed: Sequence[torch.Tensor], prefix: str = "", name: str = "accuracy",
              n_boot: int = 1000) -> dict[str, Any]:
    """correct_per_seed: one [n] tensor of per-item scores (1/0 for accuracy) per seed ->
    {prefix+name: mean, ..._std, ..._ci95: [low, high], ..._per_seed: [...]}."""
    stacked = torch.stack([c.float().cpu() for c in correct_per_seed])
    per_seed = stacked.mean(1)
    lo, hi = bootstrap_ci(stacked, n_boot=n_boot)
    k = prefix + name
    return {k: float(per_seed.mean()),
            f"{k}_std": float(per_seed.std(unbiased=True)) if len(per_seed) > 1 else 0.0,
            f"{k}_ci95": [lo, hi],
            f"{k}_per_seed": [float(v) for v in per_seed]}


def fractions_and_seeds(ecfg: dict[str, Any]) -> tuple[list[float], list[int]]:
    """``eval.label_fraction`` (a number or a list), ``eval.seeds`` (how many) and ``eval.seed`` (the
    first) -> (fractions, seeds)."""
    n = int(ecfg["seeds"])
    if n < 1:
        raise ValueError(f"eval.seeds must be at least 1, got {n}")
    fr = ecfg["label_fraction"]
    fractions = [float(f) for f in (fr if isinstance(fr, (list, tuple)) else [fr])]
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"eval.label_fraction values must lie in (0, 1], got {f}")
    first = int(ecfg["seed"])
    return fractions, list(range(first, first + n))
