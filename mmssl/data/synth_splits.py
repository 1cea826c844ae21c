"""What every embedded generator shares: split streams and balanced labels, each a pure function of
(generator version, seed, split), so a generated data set can be rebuilt exactly."""
from __future__ import annotations

import zlib

import numpy as np


def split_code(split: str) -> int:
    """A stable number per split name: disjoint random streams for train, val and test."""
    return zlib.crc32(split.encode("utf-8")) & 0xFFFFFFFF


def split_count(split: str, n: int | None, seed: int, sizes: dict[str, int]) -> tuple[int, int]:
    """(n, seed) checked: ``n`` defaults to the split's nominal size; any split name is accepted when
    ``n`` is given."""
    if n is None:
        if split not in sizes:
            raise ValueError(f"unknown split {split!r}; known: {sorted(sizes)} (or pass n)")
        n = sizes[split]
    n, seed = int(n), int(seed)
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be >= 0 (got n={n}, seed={seed})")
    return n, seed


def balanced_labels(version: int, seed: int, split: str, total: int, num_classes: int) -> np.ndarray:
    """A shuffled repetition of 0..num_classes-1 over ``total`` items (the split's nominal size, so a
    prefix of the split keeps the same labels)."""
    rng = np.random.default_rng([version, seed, split_code(split), 2])
    return rng.permutation(np.arange(total) % num_classes)
