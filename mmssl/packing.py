"""Packed token rows (MosaicBERT / NaViT-style unpadded batches): the real tokens of several items
share one row, and a block-diagonal attention mask keeps each item to itself.

A padded batch [B, N, D] spends the transformer's projections and FFNs on every padding slot. Packing
moves each item's real tokens (its prefix tokens included) into rows of the same length N, first fit
in decreasing length, so the rows R <= B hold the same tokens with less padding; attention is allowed
only within an item, so every token sees exactly the keys it sees in the padded batch, and the outputs,
unpacked, are the padded batch's (to float rounding). The adapter front-ends still run on the padded
batch: packing starts where the backbone does."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    """Where each real token goes. ``src`` [M]: flat index into the padded [B * N]; ``dst`` [M]: flat
    index into the packed [R * L]; ``segment`` [R, L]: the item each slot holds (-1: padding)."""

    src: torch.Tensor
    dst: torch.Tensor
    segment: torch.Tensor
    batch: int
    length: int

    @property
    def rows(self) -> int:
        return self.segment.shape[0]

    def padding_fraction(self) -> float:
        """The share of packed slots that hold no token."""
        return float((self.segment < 0).float().mean()) if self.segment.numel() else 0.0


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Items (by index) into rows of ``capacity`` slots, longest first, each into the first row with
    room (first-fit decreasing: at most 11/9 OPT + 1 rows). Ties keep the items' order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an item of {n} tokens does not fit a row of {capacity}")
        r = next((r for r, left in enumerate(room) if left >= n), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return rows


def plan(pad: torch.Tensor) -> Packing:
    """The packing of a padded batch: pad [B, N] bool (True = padding) -> Packing into rows of N.

    Two host synchronisations (the item lengths, and the real tokens' positions), which is what lets
    the rows be fewer."""
    B, N = pad.shape
    real = ~pad
    lengths = real.sum(1).tolist()
    rows = first_fit(lengths, N)
    # each item's start within its row, in the rows' order
    row_of = [0] * B
    start = [0] * B
    for r, items in enumerate(rows):
        at = 0
        for i in items:
            row_of[i], start[i] = r, at
            at += lengths[i]
    dev = pad.device
    b, n = real.nonzero(as_tuple=True)  # row-major: item by item, token by token
    order = real.long().cumsum(1) - 1  # [B, N]: a real token's rank within its item
    row_t = torch.tensor(row_of, device=dev)
    start_t = torch.tensor(start, device=dev)
    dst = row_t[b] * N + start_t[b] + order[b, n]
    segment = torch.full((len(rows) * N,), -1, dtype=torch.long, device=dev)
    segment[dst] = b
    return Packing(src=b * N + n, dst=dst, segment=segment.view(len(rows), N), batch=B, length=N)


def pack(x: torch.Tensor, p: Packing) -> torch.Tensor:
    """x [B, N, D] -> [R, N, D], zeros at packed padding."""
    D = x.shape[-1]
    out = x.new_zeros(p.rows * p.length, D)
    out[p.dst] = x.reshape(-1, D)[p.src]
    return out.view(p.rows, p.length, D)


def unpack(y: torch.Tensor, p: Packing) -> torch.Tensor:
    """y [R, N, D] -> [B, N, D], zeros at the padded batch's padding."""
    D = y.shape[-1]
    out = y.new_zeros(p.batch * p.length, D)
    out[p.src] = y.reshape(-1, D)[p.dst]
    return out.view(p.batch, p.length, D)


def block_mask(p: Packing) -> torch.Tensor:
    """[R, 1, N, N] bool (True = may attend): a token attends the tokens of its own item; a padding
    slot attends only itself (a query with no key would be NaN, and its output is dropped anyway)."""
    seg = p.segment
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    eye = torch.eye(p.length, dtype=torch.bool, device=seg.device)[None]
    return (same | (eye & (seg[:, :, None] < 0)))[:, None]
