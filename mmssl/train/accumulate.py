"""Gradient accumulation over the micro-batches of one optimizer step (``trainer.accumulate=N``).

Two ways, chosen by what the objective declares:

- **plain** (every objective): each micro-batch's loss divided by N is back-propagated on its own, so
  the step's gradient is the mean of the micro-batches' gradients: the big batch's gradient wherever
  the loss is a mean over items.
- **feature accumulation** (objectives with ``accumulates_features = True``: the contrastive family;
  open_clip's ``accum_freq``): a contrastive loss compares every item with every other, so averaging
  N small-batch losses would keep only 1/N of the negatives. Instead:

  1. each micro-batch's features are computed without gradients and cached (``FeatureCache``), with
     the RNG state before each pass recorded;
  2. for each micro-batch j, its forward is run again *with* gradients (the RNG state of step 1
     restored, so dropout draws the same features), its fresh features replace its cached ones, the
     loss is computed over the whole accumulated batch and back-propagated.

  The loss of every pass is the big batch's loss, and each item's features receive exactly the big
  batch's gradient (only through its own pass), so every encoder and projection gradient equals the
  big batch's. Parameters used by the loss itself (a logit scale) would receive dL/dscale in each of
  the N passes (open_clip's implementation does that); here they are live in the first pass only and
  detached in the others, so they also get exactly the big batch's gradient.

Under DDP the gradient all-reduce runs on the last pass only (``no_sync`` before); contrastive objectives
gather the accumulated features of every rank, so the negatives are N x batch x world.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mmssl.train.checkpoint import rng_state, set_rng_state
from mmssl.types import Batch

#: a context manager factory: the precision the forward passes run under (autocast or nothing)
Precision = Callable[[], contextlib.AbstractContextManager]
#: the sync context of micro-batch i of n (DDP's no_sync on all but the last)
Sync = Callable[[int, int], contextlib.AbstractContextManager]


class FeatureCache:
    """The features of one step's micro-batches, for feature accumulation.

    ``collecting``: the objective's forward adds its features (detached) and returns a zero loss;
    otherwise micro-batch ``live`` is being re-run with gradients and the objective asks for
    ``assemble(fresh)``: every micro-batch's features, ``live``'s replaced by ``fresh``."""

    def __init__(self) -> None:
        self.features: list[dict[str, torch.Tensor]] = []
        self.collecting = True
        self.live = 0

    def add(self, feats: dict[str, torch.Tensor]) -> None:
        self.features.append({k: v.detach() for k, v in feats.items()})

    def assemble(self, fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fresh: {key: [b_live, ...]} -> {key: [sum_i b_i, ...]} in micro-batch order."""
        if not 0 <= self.live < len(self.features):
            raise IndexError(f"micro-batch {self.live} of {len(self.features)} has no cached features")
        out = {}
        for k in fresh:
            parts = [fresh[k] if i == self.live else f[k].to(fresh[k].dtype) for i, f in enumerate(self.features)]
            out[k] = torch.cat(parts, 0)
        return out

    @property
    def loss_params_live(self) -> bool:
        """Whether the loss's own parameters (temperatures) take gradients in this pass: the first
        pass only, so they receive dL/dparam once, as in the big batch."""
        return self.live == 0


def _add_metrics(into: dict[str, torch.Tensor], metrics: dict[str, Any], weight: float, device: torch.device) -> None:
    for k, v in metrics.items():
        into[k] += torch.as_tensor(v, device=device).detach().float() * weight


def plain(model: nn.Module, batches: Iterator[Batch], n: int, precision: Precision, sync: Sync,
          device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Back-propagate each of ``n`` micro-batches' loss / n. -> (the step's loss: the mean of the
    micro-batch losses, detached; metrics averaged over the micro-batches)."""
    step_loss = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    for i in range(n):
        batch = next(batches)  # drawn lazily: one micro-batch on the device at a time
        with sync(i, n), precision():
            out = model(batch)
            loss = out.loss / n
        loss.backward()
        step_loss += loss.detach()
        _add_metrics(metrics, out.metrics, 1.0 / n, device)
    return step_loss, metrics


def features(model: nn.Module, batches: list[Batch], precision: Precision, sync: Sync,
             device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Feature accumulation (module docstring) over ``batches``; ``model`` is called as
    ``model(batch, cache=FeatureCache)``. -> (the loss of the accumulated batch, detached; the
    collecting passes' metrics averaged, with ``accumulated_items``).

    The global RNG is left where the collecting passes left it, so a run's later draws do not depend
    on how many re-runs a step made."""
    n = len(batches)
    cache = FeatureCache()
    states = []
    metrics: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    with torch.no_grad():
        for batch in batches:
            states.append(rng_state())
            with precision():
                out = model(batch, cache=cache)
            _add_metrics(metrics, out.metrics, 1.0 / n, device)
    after = rng_state()
    cache.collecting = False
    losses = []
    for j, batch in enumerate(batches):
        cache.live = j
        set_rng_state(states[j])  # the same dropout as the cached features of this micro-batch
        with sync(j, n), precision():
            out = model(batch, cache=cache)
        out.loss.backward()
        losses.append(out.loss.detach())
    set_rng_state(after)
    # 0 unless a re-run drew other features than its cached pass (a non-deterministic kernel)
    metrics["accumulate_replay_gap"] = torch.stack(losses).sub(losses[0]).abs().max()
    metrics["accumulated_items"] = torch.tensor(float(sum(next(iter(f.values())).shape[0] for f in cache.features)),
                                                device=device)
    # every pass computed the same loss (same features, same values); its first is the step's
    return losses[0], metrics
