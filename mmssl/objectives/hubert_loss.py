"""HuBERT's masked-prediction loss as small pure functions.

Reference (fairseq HubertModel.compute_nce): logits = cos(x, [pos; negs]) / T with the positive at
index 0, negatives identical to the positive set to -inf, cross-entropy against index 0. Here the
negatives are all other cluster embeddings, so the same value comes from one matmul against every
embedding with the target as the class: no broadcast cosine, no gather of positives."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def unit_logits(proj: torch.Tensor, embeddings: torch.Tensor, temperature: float,
                target: torch.Tensor | None = None) -> torch.Tensor:
    """proj: [M, F], embeddings: [K, F], target: [M] (optional) -> logits [M, K].

    Cosine similarity over temperature. With ``target``, other embeddings exactly equal to the
    target's are excluded (-inf), as fairseq excludes negatives identical to the positive."""
    logits = F.normalize(proj.float(), dim=-1, eps=1e-8) @ F.normalize(embeddings.float(), dim=-1, eps=1e-8).T
    logits = logits / temperature
    if target is not None:
        e = embeddings.detach()
        dup = (e[:, None, :] == e[None, :, :]).all(-1)
        dup.fill_diagonal_(False)  # [K, K]: j duplicates i (j != i)
        logits = logits.masked_fill(dup[target], float("-inf"))
    return logits


def hubert_loss(proj: torch.Tensor, embeddings: torch.Tensor, target: torch.Tensor, temperature: float = 0.1,
                reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """proj: [M, F] projected frames, embeddings: [K, F], target: [M] unit ids ->
    (cross-entropy, correct [M] bool). reduction: 'mean' | 'sum'."""
    logits = unit_logits(proj, embeddings, temperature, target)
    loss = F.cross_entropy(logits, target, reduction=reduction)
    return loss, logits.argmax(-1) == target
