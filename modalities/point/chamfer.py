"""Chamfer distance (L2), Point-MAE's reconstruction loss.

Point-MAE's ``ChamferDistanceL2`` for a predicted set A and a target set B is

    CD(A, B) = mean_{a in A} min_{b in B} |a - b|^2  +  mean_{b in B} min_{a in A} |a - b|^2

(squared distances, each direction averaged over its own set, the two directions summed). Over many
groups it is averaged; with equal set sizes per group that equals Point-MAE's mean over all points."""
from __future__ import annotations

import torch


def chamfer_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred [..., n, 3], target [..., m, 3] -> [...] Chamfer L2 distance of each pair of sets.

    Computed in float32 (squared distances of nearby points lose their digits in bf16)."""
    a, b = pred.float(), target.float()
    # |a - b|^2 by direct differences, not the |a|^2 + |b|^2 - 2ab expansion: exact for tiny groups
    d = ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1)  # [..., n, m]
    return d.min(-1).values.mean(-1) + d.min(-2).values.mean(-1)


def masked_chamfer_l2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target [B, N, k*3] flattened groups of k points; mask [B, N] bool (True = count) -> the
    mean Chamfer L2 distance over the counted groups (0 when none is counted)."""
    if pred.shape[-1] % 3 or target.shape[-1] % 3:
        raise ValueError(f"point groups must flatten k x 3 coordinates, got widths {pred.shape[-1]}, "
                         f"{target.shape[-1]}")
    m = mask.bool()
    if not bool(m.any()):
        return pred.sum() * 0.0  # keeps the graph (and DDP's unused-parameter checks) intact
    # only the counted groups: the [n, m] distance tables of the rest would be wasted work
    p = pred[m].reshape(-1, pred.shape[-1] // 3, 3)
    t = target[m].reshape(-1, target.shape[-1] // 3, 3)
    return chamfer_l2(p, t).mean()
