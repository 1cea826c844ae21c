"""HuBERT's loss against the reference formulation (fairseq's compute_nce) on hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmssl.objectives.hubert_loss import hubert_loss, unit_logits


def reference_nce(x: torch.Tensor, emb: torch.Tensor, target: torch.Tensor, temp: float) -> torch.Tensor:
    """fairseq HubertModel.compute_nce, written out: positive first, all embeddings as negatives,
    negatives identical to the positive set to -inf, cross-entropy against index 0 (mean)."""
    losses = []
    for i in range(x.shape[0]):
        pos = emb[target[i]][None]
        negs = emb
        neg_is_pos = (pos == negs).all(-1)
        targets = torch.cat([pos, negs], 0)
        logits = F.cosine_similarity(x[i][None].float(), targets.float(), dim=-1) / temp
        logits[1:][neg_is_pos] = float("-inf")
        losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean()


def test_hand_computed_two_units() -> None:
    # x is at 0 degrees, unit 0 at 0 degrees, unit 1 at 90 degrees: cosines 1 and 0.
    x = torch.tensor([[2.0, 0.0]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    loss, correct = hubert_loss(x, emb, torch.tensor([0]), temperature=0.1)
    expected = -math.log(math.exp(10.0) / (math.exp(10.0) + math.exp(0.0)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert bool(correct[0])
    loss1, correct1 = hubert_loss(x, emb, torch.tensor([1]), temperature=0.1)
    assert loss1.item() == pytest.approx(-math.log(math.exp(0.0) / (math.exp(10.0) + 1.0)), rel=1e-6)
    assert not bool(correct1[0])


def test_matches_reference_on_random_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=g)
    emb = torch.randn(11, 16, generator=g)
    target = torch.randint(0, 11, (37,), generator=g)
    loss, _ = hubert_loss(x, emb, target, temperature=0.1)
    assert loss.item() == pytest.approx(reference_nce(x, emb, target, 0.1).item(), rel=1e-5)


def test_negatives_equal_to_positive_are_excluded() -> None:
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(5, 8, generator=g)
    emb[3] = emb[1]  # a duplicate of unit 1
    x = torch.randn(6, 8, generator=g)
    target = torch.tensor([1, 1, 3, 0, 2, 4])
    logits = unit_logits(x, emb, 0.1, target)
    assert torch.isinf(logits[0, 3]) and torch.isinf(logits[2, 1])  # the twin is not a negative
    assert torch.isfinite(logits[3]).all()  # targets without a twin keep every negative
    loss, _ = hubert_loss(x, emb, target, temperature=0.1)
    assert loss.item() == pytest.approx(reference_nce(x, emb, target, 0.1).item(), rel=1e-5)
    # counting the twin as a negative would give a larger loss: the exclusion matters
    naive = F.cross_entropy(unit_logits(x, emb, 0.1), target)
    assert naive.item() > loss.item() + 1e-3


def test_gradient_flows_to_embeddings_and_inputs() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    emb = torch.randn(6, 8, requires_grad=True)
    loss, _ = hubert_loss(x, emb, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert emb.grad is not None and emb.grad[:4].abs().sum() > 0
