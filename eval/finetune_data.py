"""Fine-tuning's data: the training split kept as items (label subsets and epochs re-batch them), val and
test as fixed batches, and each epoch's batches (a seeded shuffle, then length-sorted pools)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mmssl.data.loader import DataSource, iter_split
from mmssl.data.shards import read_samples, split_paths
from mmssl.eval.protocol import train_pool
from mmssl.types import Batch

#: training batches are formed from pools of this many batches sorted by length: little padding for
#: variable-length inputs, while each pool is a fresh random draw every epoch
BUCKET = 4


@dataclass
class SplitData:
    """A split materialised once: items (train, re-batched each epoch) or fixed batches (val, test)."""

    labels: torch.Tensor  # [n] or [n, K]
    items: list[dict[str, Any]] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)


def load_train_items(source: DataSource, split: str, bad: Counter, max_train: int | None) -> SplitData:
    """Every usable decoded sample of the training split (the same reader and decoder as
    ``iter_split``), kept as items so label subsets and epochs can re-batch them."""
    items = list(read_samples(split_paths(source.root, split), source.decode, bad))
    if not items:
        raise ValueError(f"split {split!r} of {source.root} has no usable samples")
    if any("label" not in it for it in items):
        raise ValueError(f"{source.root} has unlabelled {split} samples: fine-tuning needs labels")
    items = [items[i] for i in train_pool(len(items), max_train).sort().values.tolist()]
    return SplitData(labels=torch.as_tensor([it["label"] for it in items]), items=items)


def load_eval_batches(source: DataSource, split: str, batch_size: int, bad: Counter,
                      max_len: int | None) -> SplitData:
    """The split's batches in ``iter_split``'s fixed order (so per-item scores line up over seeds)."""
    batches = list(iter_split(source, split, batch_size, bad, max_len=max_len))
    if not batches:
        raise ValueError(f"split {split!r} of {source.root} has no usable samples")
    if any("label" not in b for b in batches):
        raise ValueError(f"{source.root} has unlabelled {split} samples: fine-tuning needs labels")
    return SplitData(labels=torch.cat([b["label"] for b in batches]), batches=batches)


def _pools(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of the length-sorting pools over n shuffled items: ``BUCKET`` batches each; a
    last pool of a single item joins the one before (batch statistics need two items)."""
    size = batch_size * BUCKET
    bounds = [(i, min(i + size, n)) for i in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches cut from a pool of n items: full batches and the rest, which joins the
    batch before when it would hold a single item."""
    sizes = [min(batch_size, n - k) for k in range(0, n, batch_size)]
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2] += sizes.pop()
    return sizes


def batches_per_epoch(n: int, batch_size: int) -> int:
    return sum(len(_batch_sizes(e - s, batch_size)) for s, e in _pools(n, batch_size))


def epoch_batches(source: DataSource, items: list[dict[str, Any]], batch_size: int, max_len: int | None,
                  g: torch.Generator, crop_generator: torch.Generator | None = None) -> Iterator[Batch]:
    """One epoch: a random permutation, pools of ``BUCKET`` batches sorted by length, batches in a
    random order; no batch holds a single item. ``crop_generator``: the codec's random crops
    (training augmentation), else its deterministic evaluation preprocessing."""
    perm = torch.randperm(len(items), generator=g).tolist()
    chunks: list[list[dict[str, Any]]] = []
    for s, e in _pools(len(items), batch_size):
        part = sorted((items[j] for j in perm[s:e]), key=source.length)
        start = 0
        for size in _batch_sizes(len(part), batch_size):
            chunks.append(part[start:start + size])
            start += size
    for k in torch.randperm(len(chunks), generator=g).tolist():
        yield source.collate(chunks[k], max_len, crop_generator)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

