"""Contrastive losses: CLIP against open_clip's real ClipLoss; InfoLOOB, Hopfield retrieval and CLOOB
against hand-computed values and an independent loop formulation."""
from __future__ import annotations

import math

import pytest
import torch
from open_clip.loss import ClipLoss

from mmssl.objectives.contrastive_loss import (
    MAX_LOG_SCALE,
    clamp_log_scale_,
    clip_loss,
    cloob_loss,
    hopfield_retrieval,
    info_loob,
    normalise,
)

torch.set_num_threads(1)


def _pair(n: int = 8, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return normalise(torch.randn(n, d, generator=g)), normalise(torch.randn(n, d, generator=g))


# ----------------------------------------------------------------------------------------------- CLIP

def test_clip_loss_equals_open_clip_value_and_gradients() -> None:
    a0, b0 = _pair()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    ours = clip_loss(a, b, log_scale)
    ours.backward()

    ra, rb = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    ref_log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    ref = ClipLoss()(ra, rb, logit_scale=ref_log_scale.exp())
    ref.backward()

    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(log_scale.grad, ref_log_scale.grad, rtol=1e-5, atol=1e-7)


def test_clip_loss_clamps_scale_at_100() -> None:
    a, b = _pair(seed=1)
    log_scale = torch.tensor(math.log(200.0), requires_grad=True)
    ours = clip_loss(a, b, log_scale)
    ref = ClipLoss()(a, b, logit_scale=torch.tensor(100.0))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    ours.backward()
    assert log_scale.grad.item() == 0.0  # clamped in the forward: no gradient above the clamp
    # within range the clamp does nothing
    inside = torch.tensor(math.log(50.0))
    torch.testing.assert_close(clip_loss(a, b, inside), ClipLoss()(a, b, logit_scale=torch.tensor(50.0)))
    # the in-place clamp for after_step, as open_clip does after the optimizer step
    p = torch.nn.Parameter(torch.tensor(math.log(200.0)))
    clamp_log_scale_(p)
    assert p.item() == pytest.approx(MAX_LOG_SCALE)


def test_clip_loss_hand_computed_2x2() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    s = 2.0
    # logits = s * [[0.6, 0.8], [0.8, 0.6]], symmetric, so both directions give the same CE
    row0 = -s * 0.6 + math.log(math.exp(s * 0.6) + math.exp(s * 0.8))
    row1 = -s * 0.6 + math.log(math.exp(s * 0.8) + math.exp(s * 0.6))
    expected = (row0 + row1) / 2
    assert clip_loss(a, b, torch.tensor(math.log(s))).item() == pytest.approx(expected, rel=1e-6)


# -------------------------------------------------------------------------------------------- InfoLOOB

def test_info_loob_2x2_by_hand() -> None:
    # one negative per row: loss_i = tau * (inv_tau * s_ij - inv_tau * s_ii) = s_ij - s_ii
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    for inv_tau in (1.0, 30.0):
        assert info_loob(x, y, inv_tau).item() == pytest.approx(((0.8 - 0.6) + (0.8 - 0.6)) / 2, abs=1e-6)


def test_info_loob_3x3_by_hand() -> None:
    # x = identity, so the similarity s_ij = x_i . y_j is y_j[i]: the matrix S = y.T written out below
    S = [[0.9, 0.1, -0.3],
         [0.2, 0.5, 0.4],
         [-0.6, 0.7, 0.8]]
    x = torch.eye(3)
    y = torch.tensor(S).T.contiguous()
    t = 2.0  # inverse temperature
    rows = []
    for i in range(3):
        denominator = sum(math.exp(t * S[i][j]) for j in range(3) if j != i)  # the positive left out
        rows.append(-t * S[i][i] + math.log(denominator))
    expected = (sum(rows) / 3) / t
    assert info_loob(x, y, t).item() == pytest.approx(expected, rel=1e-6)

    # InfoNCE would put the positive in the denominator: a different number
    nce = sum(-t * S[i][i] + math.log(sum(math.exp(t * S[i][j]) for j in range(3))) for i in range(3)) / 3 / t
    assert abs(nce - expected) > 0.05


def test_info_loob_positive_not_in_denominator() -> None:
    x = torch.eye(3)
    y = torch.tensor([[0.9, 0.1, -0.3], [0.2, 0.5, 0.4], [-0.6, 0.7, 0.8]]).T.contiguous().requires_grad_()
    t = 5.0
    loss = info_loob(x, y, t)
    loss.backward()
    # s_ii = y[i, i]: only the numerator sees it, so d loss / d s_ii = tau * (-t) / B = -1/B exactly,
    # whatever the other similarities (InfoNCE would give -(1 - softmax_ii)/B)
    torch.testing.assert_close(y.grad.diagonal(), torch.full((3,), -1 / 3), rtol=0, atol=1e-7)
    # and the loss is linear in s_ii: raising s_00 by 0.25 lowers the loss by exactly 0.25 / 3
    y2 = y.detach().clone()
    y2[0, 0] += 0.25
    assert (loss - info_loob(x, y2, t)).item() == pytest.approx(0.25 / 3, abs=1e-6)


def test_info_loob_needs_a_negative() -> None:
    with pytest.raises(ValueError):
        info_loob(torch.ones(1, 4), torch.ones(1, 4), 30.0)


# ------------------------------------------------------------------------------------------- Hopfield

def test_hopfield_retrieval_by_hand() -> None:
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # beta = ln 3, query e1: scores [ln 3, 0] -> softmax [3/4, 1/4] -> [0.75, 0.25], then unit norm
    out = hopfield_retrieval(torch.tensor([[1.0, 0.0]]), memory, math.log(3.0))
    n = math.sqrt(0.75 ** 2 + 0.25 ** 2)
    torch.testing.assert_close(out, torch.tensor([[0.75 / n, 0.25 / n]]))
    # beta = 1, query (0.6, 0.8): weights e^0.6, e^0.8 normalised; the retrieved pattern is the weights
    w0, w1 = math.exp(0.6), math.exp(0.8)
    p0, p1 = w0 / (w0 + w1), w1 / (w0 + w1)
    n = math.sqrt(p0 ** 2 + p1 ** 2)
    out = hopfield_retrieval(torch.tensor([[0.6, 0.8]]), memory, 1.0)
    torch.testing.assert_close(out, torch.tensor([[p0 / n, p1 / n]]))


def test_hopfield_retrieval_memory_of_another_size() -> None:
    q, m = _pair(4, 8, seed=2)[0], _pair(6, 8, seed=3)[0]
    out = hopfield_retrieval(q, m, 8.0)
    assert out.shape == (4, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))


# ---------------------------------------------------------------------------------------------- CLOOB

def _loop_hopfield(queries: list[list[float]], memory: list[list[float]], beta: float) -> list[list[float]]:
    out = []
    for q in queries:
        w = [math.exp(beta * sum(qi * ki for qi, ki in zip(q, k))) for k in memory]
        z = sum(w)
        u = [sum(w[j] / z * memory[j][d] for j in range(len(memory))) for d in range(len(q))]
        n = math.sqrt(sum(v * v for v in u))
        out.append([v / n for v in u])
    return out


def _loop_info_loob(x: list[list[float]], y: list[list[float]], inv_tau: float) -> float:
    def dot(u: list[float], v: list[float]) -> float:
        return sum(a * b for a, b in zip(u, v))

    total = 0.0
    for i in range(len(x)):
        negatives = sum(math.exp(inv_tau * dot(x[i], y[j])) for j in range(len(y)) if j != i)
        total += math.log(negatives) - inv_tau * dot(x[i], y[i])
    return total / len(x) / inv_tau


def test_cloob_loss_against_loop_formulation() -> None:
    x, y = _pair(5, 4, seed=4)
    inv_tau, beta = 30.0, 8.0
    xs, ys = x.double().tolist(), y.double().tolist()
    u_xx = _loop_hopfield(xs, xs, beta)  # image queries, image memory
    u_xy = _loop_hopfield(ys, xs, beta)  # text queries, image memory
    u_yy = _loop_hopfield(ys, ys, beta)
    u_yx = _loop_hopfield(xs, ys, beta)  # image queries, text memory
    expected = _loop_info_loob(u_xx, u_xy, inv_tau) + _loop_info_loob(u_yy, u_yx, inv_tau)
    assert cloob_loss(x, y).item() == pytest.approx(expected, rel=1e-5)
    assert cloob_loss(x, y, inv_tau, beta).item() == pytest.approx(expected, rel=1e-5)
    # swapping the modalities swaps the two terms: the same loss
    assert cloob_loss(y, x).item() == pytest.approx(expected, rel=1e-5)


def test_cloob_loss_learnable_temperatures_and_bf16() -> None:
    x, y = _pair(6, 8, seed=5)
    inv_tau = torch.tensor(30.0, requires_grad=True)
    beta = torch.tensor(8.0, requires_grad=True)
    x = x.requires_grad_()
    loss = cloob_loss(x, y, inv_tau, beta)
    loss.backward()
    assert torch.isfinite(inv_tau.grad) and torch.isfinite(beta.grad) and beta.grad != 0
    assert torch.isfinite(x.grad).all()
    low = cloob_loss(x.detach().bfloat16(), y.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(loss.item(), abs=0.05)
