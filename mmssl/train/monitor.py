"""Online evaluation during pretraining: a validation loss and k-NN accuracy every ``eval_every`` steps.

Both are measured on fixed data so that evaluations are comparable across steps: the first
``eval_items`` items of the validation split (cut with the trainer's ``max_len``) and, as the k-NN
bank, the first ``knn_bank`` items of the train split, read once and kept in memory (CPU).

- Validation loss: the objective's own ``forward`` in eval mode without gradients, under the trainer's
  autocast, with the random generators forked and seeded, so every evaluation draws the same masks and
  the training stream of random numbers is left exactly as it was (resume stays exact, and a run gives
  the same training losses with the monitor on or off). Objectives whose targets exist for training
  items only (HuBERT's units) declare ``no_val_loss``; the record then carries that reason.
- k-NN accuracy, per tower of the objective: each encoder's pooled features of the bank and of the
  validation items, DINO's temperature-weighted vote (eval/knn.py), top-1 accuracy; only where the
  data has class labels.

Under DDP every rank computes the same thing on the same items (collectives inside objectives stay
matched; contrastive objectives gather across ranks in training only, so a validation batch is scored
as one batch, never as world copies of itself); the trainer's logger writes on rank 0 only. Knows
nothing of modalities."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mmssl.data.loader import DataSource, MaxLen, iter_split
from mmssl.eval.knn import knn_classify
from mmssl.objectives.base import Objective
from mmssl.types import Batch

KNN_T = 0.07  # DINO's temperature


def take(batches: Iterator[Batch], n: int) -> list[Batch]:
    """The first ``n`` items of a stream of batches, as batches (the last one cut to fit)."""
    out: list[Batch] = []
    have = 0
    for b in batches:
        size = int(b["sample_id"].shape[0])
        if have + size > n:
            b = {k: v[: n - have] for k, v in b.items()}
            size = n - have
        out.append(b)
        have += size
        if have >= n:
            break
    return out


def class_labels(batches: list[Batch]) -> torch.Tensor | None:
    """[n] labels of the batches, or None where any item lacks a class label."""
    if not batches or any("label" not in b or b["label"].dim() != 1 for b in batches):
        return None
    y = torch.cat([b["label"] for b in batches])
    return None if bool((y < 0).any()) else y


class Monitor:
    """``due(step, max_steps)`` says when; ``evaluate(step)`` returns the ``event: eval`` record."""

    def __init__(self, objective: Objective, source: DataSource, t: dict[str, Any], device: torch.device,
                 max_len: MaxLen, autocast_dtype: torch.dtype | None,
                 call: Callable[..., Any] | None = None) -> None:
        self.objective, self.source, self.device = objective, source, device
        # how an encoder is called outside the objective's forward (FSDP gathers the root's shards first)
        self.call = call or (lambda fn, *a, **k: fn(*a, **k))
        self.max_len, self.autocast_dtype = max_len, autocast_dtype
        self.every = int(t.get("eval_every", 0) or 0)
        self.items = int(t.get("eval_items", 512))
        self.bank_items = int(t.get("knn_bank", 2000))
        self.k = int(t.get("knn_k", 20))
        self.batch_size = int(t["batch_size"])  # a loss that depends on the batch (contrastive) stays comparable
        self.seed = int(t.get("seed", 0))
        self.val_split = str(t.get("eval_split", "val"))
        self._val: list[Batch] | None = None
        self._bank: list[Batch] | None = None
        self._missing: str | None = None

    def due(self, step: int, max_steps: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == max_steps)

    def _data(self) -> None:
        if self._val is not None or self._missing is not None:
            return
        try:
            self._val = take(iter_split(self.source, self.val_split, self.batch_size, max_len=self.max_len),
                             self.items)
            self._bank = take(iter_split(self.source, "train", self.batch_size, max_len=self.max_len),
                              self.bank_items)
        except KeyError as e:  # no validation split
            self._missing = str(e.args[0]) if e.args else str(e)
            return
        if not self._val:
            self._missing = f"split {self.val_split!r} has no usable items"

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _on_device(self, b: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in b.items()}

    def _val_loss(self) -> dict[str, Any]:
        assert self._val is not None
        total, n = 0.0, 0
        metrics: dict[str, float] = {}
        for b in self._val:
            size = int(b["sample_id"].shape[0])
            with self._autocast():
                out = self.objective(self._on_device(b))
            # the objective's loss is a mean over its batch: weigh batches by their items
            total += float(out.loss) * size
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) * size
            n += size
        return {"val_loss": total / n, **{f"val_{k}": v / n for k, v in metrics.items()}}

    def _embed(self, name: str, batches: list[Batch]) -> torch.Tensor:
        enc = self.objective.encoders[name]
        feats = []
        for b in batches:
            with self._autocast():
                feats.append(self.call(enc.embed, self._on_device(b)).float())
        return torch.cat(feats)

    def _knn(self) -> dict[str, Any]:
        assert self._val is not None and self._bank is not None
        y_bank, y_val = class_labels(self._bank), class_labels(self._val)
        if y_bank is None or y_val is None:
            return {"knn_skipped": "the data has no class labels"}
        C = max(self.source.num_classes, int(y_bank.max()) + 1, int(y_val.max()) + 1)
        rec: dict[str, Any] = {}
        for name in self.objective.encoders:
            scores = knn_classify(self._embed(name, self._bank), y_bank.to(self.device),
                                  self._embed(name, self._val), self.k, KNN_T, C)
            rec[f"knn_acc/{name}"] = float((scores.argmax(1).cpu() == y_val).float().mean())
        rec["knn_bank"] = int(y_bank.numel())
        return rec

    def _reseed(self) -> None:
        torch.random.default_generator.manual_seed(self.seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(self.seed)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        obj = self.objective
        was_training = obj.training
        rec: dict[str, Any] = {"step": step, "event": "eval"}
        devices = [self.device] if self.device.type == "cuda" else []
        # a private, seeded stream: the same masks at every evaluation, the training stream untouched
        with torch.random.fork_rng(devices=devices):
            self._reseed()
            self._data()
            self._reseed()  # reading may draw (random crops), and only the first evaluation reads
            if self._missing is not None:
                rec["eval_skipped"] = self._missing
            else:
                obj.eval()
                try:
                    rec["eval_items"] = sum(int(b["sample_id"].shape[0]) for b in self._val or [])
                    if obj.no_val_loss:
                        rec["val_loss_skipped"] = obj.no_val_loss
                    else:
                        rec.update(self._val_loss())
                    rec.update(self._knn())
                finally:
                    obj.train(was_training)
        rec["eval_seconds"] = round(time.perf_counter() - t0, 3)
        return rec


def describe(rec: dict[str, Any]) -> str:
    """One line for the console."""
    parts = [f"step {rec['step']} eval:"]
    if "val_loss" in rec:
        parts.append(f"val_loss {rec['val_loss']:.4f}")
    parts += [f"{k} {v:.3f}" for k, v in rec.items() if k.startswith("knn_acc/")]
    parts += [f"({k}: {v})" for k, v in rec.items() if k.endswith("_skipped")]
    parts.append(f"{rec['eval_seconds']:.1f}s")
    return " ".join(parts)
