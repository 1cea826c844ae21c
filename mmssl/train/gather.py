"""Gathering per-rank features into the global batch, for contrastive losses under DDP.

A contrastive loss compares every sample with every other one, so under ``torchrun`` each rank needs
the features of the whole global batch, not only its own ``b`` samples. ``gather_with_grad``
concatenates them in rank order **with gradients**, and every rank then computes the full
global-batch loss (open_clip's ``gather_with_grad=True, local_loss=False``).

Why with gradients: rank r's loss ``L`` depends on the features of every rank. The backward of
``torch.distributed.nn.functional.all_gather`` sends each slice of ``dL/d(all features)`` back to the
rank that owns it and sums over ranks (a reduce-scatter; gloo emulates it with all-to-all), so rank
r's local features receive ``world * dL/d(own features)`` (every rank computed the same ``L``).
DDP then averages parameter gradients over ranks, dividing by ``world``: the result is exactly the
single-process gradient of ``L`` on the whole batch. Parameters used directly in the loss (a logit
scale) get ``dL/dscale`` on every rank, which averaging leaves unchanged. A gather without gradients
(open_clip's default, or ml-jku/cloob's ``aggregate``) only lets gradients flow through a rank's own
features and so does not reproduce the single-process gradient.

All ranks must pass the same local batch size (``all_gather`` needs equal shapes): drop the last
incomplete batch, as the shard loader does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x: [b, ...] this rank's slice -> [world * b, ...] every rank's slice in rank order, differentiable.

    Identity (the same tensor) in a single process. Gradients flowing into slice r are summed over
    ranks and returned to rank r (see the module docstring for why that gives exact DDP gradients)."""
    _, world = rank_world()
    if world == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """x: [b, ...] -> [world * b, ...] in rank order, without gradients (metrics, retrieval evaluation).

    Returns ``x.detach()`` in a single process."""
    _, world = rank_world()
    if world == 1:
        return x.detach()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)
