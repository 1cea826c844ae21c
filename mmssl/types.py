"""The shared data types of the contracts in DESIGN.md."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

Batch = dict[str, torch.Tensor]


@dataclass
class Tokens:
    """What an adapter hands to the Encoder.

    x:     [B, N, D] token embeddings (content).
    pos:   [B, N, D] positional embeddings; never a function of content.
    pad:   [B, N] bool, True = padding.
    index: [B, N, k] int64 coordinates of each token (frame; row, col; ...).
    coords: [B, N, C] float, optional: where each token sits in the adapter's geometric frame (point:
           its group's centre), what ``pos`` embeds; MAE's centre prediction regresses it.
    """

    x: torch.Tensor
    pos: torch.Tensor
    pad: torch.Tensor
    index: torch.Tensor
    coords: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> "Tokens":
        """Gather tokens by index. keep: [B, M] int64 -> Tokens with N = M."""
        def g(t: torch.Tensor) -> torch.Tensor:
            return torch.gather(t, 1, keep.view(*keep.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

        return Tokens(g(self.x), g(self.pos), g(self.pad), g(self.index),
                      None if self.coords is None else g(self.coords))


@dataclass
class EncoderOutput:
    """last: [B, N, D]; layers: per-block outputs [B, N, D] (empty unless asked);
    ffn: per-block FFN outputs before the block's last residual (data2vec targets);
    pad: [B, N] bool; index: [B, N, k]; keep: [B, N] int64 token positions kept (drop masking) or None;
    prefix: [B, P, D] outputs of the Encoder's prefix tokens (CLS, registers), P may be 0."""

    last: torch.Tensor
    pad: torch.Tensor
    index: torch.Tensor
    layers: list[torch.Tensor] = field(default_factory=list)
    ffn: list[torch.Tensor] = field(default_factory=list)
    keep: torch.Tensor | None = None
    prefix: torch.Tensor | None = None


class ObjectiveOutput(NamedTuple):
    """loss: scalar tensor; metrics: name -> scalar tensor or float (logged, not back-propagated).

    A NamedTuple so DistributedDataParallel finds the loss inside it."""

    loss: torch.Tensor
    metrics: dict
