"""Feature extraction for evaluators: pooled encoder features and the adapter's classical baseline."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from mmssl.data.loader import DataSource, iter_split
from mmssl.encoder import Encoder
from mmssl.types import Batch


@torch.no_grad()
def extract(fn: Callable[[Batch], torch.Tensor], source: DataSource, split: str, device: torch.device,
            batch_size: int = 32, bad: Counter | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fn(batch) -> [B, F] over a whole split -> (features [n, F] float32 cpu, labels [n], sample ids [n])."""
    feats, labels, ids = [], [], []
    for batch in iter_split(source, split, batch_size, bad):
        b = {k: v.to(device) for k, v in batch.items()}
        feats.append(fn(b).float().cpu())
        labels.append(batch.get("label", torch.full_like(batch["sample_id"], -1)))
        ids.append(batch["sample_id"])
    if not feats:
        raise ValueError(f"split {split!r} of {source.root} has no usable samples")
    return torch.cat(feats), torch.cat(labels), torch.cat(ids)


def encoder_fn(encoder: Encoder, layer: int = -1) -> Callable[[Batch], torch.Tensor]:
    encoder.eval()
    return lambda b: encoder.embed(b, layer=layer)


def baseline_fn(encoder: Encoder) -> Callable[[Batch], torch.Tensor]:
    return lambda b: encoder.adapter.baseline_features(b)
