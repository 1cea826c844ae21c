"""The helpers the modality adapters share (mmssl.modalities.common), each against a written-out
reference: Python's own arithmetic, closed forms, or small hand-computed tensors."""
from __future__ import annotations

import math

import pytest
import torch

from mmssl.modalities.common import (
    cpu_uniform,
    float_pair,
    kept_first,
    mae_keep_count,
    masked_mse,
    masked_token_mean,
    noise_ranks,
    normalise_patches,
    random_token_mask,
    sincos,
    sincos_grid,
    squared_error,
    view_config,
)


# -- random masking -------------------------------------------------------------------------------------
def test_cpu_uniform_is_torch_rand_on_the_cpu_from_the_generator() -> None:
    got = cpu_uniform(3, 5, generator=torch.Generator().manual_seed(4))
    assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == (3, 5)
    assert torch.equal(got, torch.rand(3, 5, generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(9)
    glob = cpu_uniform(4)
    torch.manual_seed(9)
    assert torch.equal(glob, torch.rand(4))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.9, 1.0])
def test_mae_keep_count_rounds_down_like_python_int(ratio: float) -> None:
    L = torch.arange(0, 300)
    want = torch.tensor([int(n * (1 - ratio)) for n in range(300)])
    assert torch.equal(mae_keep_count(L, ratio), want)


def test_noise_ranks_by_hand() -> None:
    noise = torch.tensor([[0.3, 0.1, 0.9, 0.5], [0.3, 0.1, 0.9, 0.5]])
    last = torch.tensor([[False, False, False, True], [False, True, False, False]])
    # row 0: 0.1 < 0.3 < 0.9, the last one pinned last; row 1: 0.1 pinned last, 0.3 < 0.5 < 0.9
    assert noise_ranks(noise, last).tolist() == [[1, 0, 2, 3], [0, 3, 2, 1]]
    # priorities below 0 (eeg's whole channels) rank before any uniform noise
    none_last = torch.zeros(1, 3, dtype=torch.bool)
    assert noise_ranks(torch.tensor([[0.2, -1.0, 0.1]]), none_last).tolist() == [[2, 0, 1]]


def _pad_rows(lengths: list[int], N: int) -> torch.Tensor:
    return torch.arange(N)[None] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 0.9, 1.0])
def test_random_token_mask_hides_maes_count_of_real_tokens_never_padding(ratio: float) -> None:
    lengths = [16, 13, 7, 1, 0, 10]
    pad = _pad_rows(lengths, 16)
    hidden = random_token_mask(pad, ratio, torch.Generator().manual_seed(0))
    assert hidden.dtype == torch.bool and hidden.shape == pad.shape
    assert not bool((hidden & pad).any())
    assert hidden.sum(1).tolist() == [n - int(n * (1 - ratio)) for n in lengths]


def test_random_token_mask_hides_the_real_tokens_of_highest_noise() -> None:
    lengths = [12, 9, 5, 12]
    pad = _pad_rows(lengths, 12)
    hidden = random_token_mask(pad, 0.6, torch.Generator().manual_seed(7))
    noise = torch.rand(4, 12, generator=torch.Generator().manual_seed(7))  # the same draw, by hand
    for b, n in enumerate(lengths):
        n_hide = n - int(n * 0.4)
        top = sorted(range(n), key=lambda i: -float(noise[b, i]))[:n_hide]
        assert hidden[b].nonzero().flatten().tolist() == sorted(top)


def test_random_token_mask_draws_from_the_generator_or_the_global_rng() -> None:
    pad = _pad_rows([10, 8, 3], 10)
    a = random_token_mask(pad, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, random_token_mask(pad, 0.5, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, random_token_mask(pad, 0.5, torch.Generator().manual_seed(2)))
    torch.manual_seed(3)
    glob = random_token_mask(pad, 0.5)
    assert torch.equal(glob, random_token_mask(pad, 0.5, torch.Generator().manual_seed(3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_random_token_mask_on_a_gpu_batch_matches_the_cpu_one() -> None:
    pad = _pad_rows([10, 8, 3], 10)
    cpu = random_token_mask(pad, 0.75, torch.Generator().manual_seed(5))
    gpu = random_token_mask(pad.cuda(), 0.75, torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


# -- reconstruction losses ------------------------------------------------------------------------------
def test_squared_error_is_float32() -> None:
    pred = torch.tensor([[[1.0, -2.0]]], dtype=torch.bfloat16)
    got = squared_error(pred, torch.tensor([[[0.5, 1.0]]], dtype=torch.bfloat16))
    assert got.dtype == torch.float32 and got.tolist() == [[[0.25, 9.0]]]


def test_masked_token_mean_by_hand() -> None:
    err = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert float(masked_token_mean(err, mask)) == pytest.approx((1.0 + 3.0 + 4.0) / 3)
    assert float(masked_token_mean(err, torch.zeros_like(mask))) == 0.0


def test_masked_mse_by_hand() -> None:
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], [[1.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    # per-token MSE: [2.5, 12.5, 0] and [0.5, 2.0, 0]; counted: 2.5, 0, 0.5, 2.0
    assert float(masked_mse(pred, target, mask)) == pytest.approx((2.5 + 0.0 + 0.5 + 2.0) / 4)


def test_masked_mse_of_nothing_counted_is_zero_and_keeps_the_graph() -> None:
    pred = torch.ones(2, 3, 4, requires_grad=True)
    loss = masked_mse(pred, torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) == 0.0


def test_normalise_patches_uses_the_unbiased_variance() -> None:
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    var = (1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3  # n - 1
    want = [(v - 2.5) / math.sqrt(var + 1e-6) for v in (1.0, 2.0, 3.0, 4.0)]
    got = normalise_patches(t)
    assert got[0].tolist() == pytest.approx(want, rel=1e-6)
    assert got[1].tolist() == [0.0, 0.0, 0.0, 0.0]


# -- positions ------------------------------------------------------------------------------------------
def test_sincos_puts_sines_then_cosines() -> None:
    got = sincos(torch.tensor([[0.0, math.pi / 2]]))
    assert got.shape == (1, 4) and got[0].tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0], abs=1e-7)


def _axis(p: int, f: int) -> list[float]:
    """One axis of MAE's table at integer position p: [sin(p w_k)]_k then [cos(p w_k)]_k,
    w_k = 10000^(-k/f)."""
    w = [10000 ** (-k / f) for k in range(f)]
    return [math.sin(p * x) for x in w] + [math.cos(p * x) for x in w]


def test_sincos_grid_2d_closed_form() -> None:
    rows, cols, dim = 3, 4, 8
    got = sincos_grid((rows, cols), dim)
    assert got.shape == (rows * cols, dim) and got.dtype == torch.float32
    for r in range(rows):
        for c in range(cols):  # row-major tokens; the column's channels first (MAE)
            assert got[r * cols + c].tolist() == pytest.approx(_axis(c, 2) + _axis(r, 2), abs=1e-6)


def test_sincos_grid_3d_closed_form_with_zero_leftover_channels() -> None:
    d, h, w, dim = 2, 3, 2, 14  # 14 // 6 = 2 frequencies per axis, 2 channels left over
    got = sincos_grid((d, h, w), dim)
    assert got.shape == (d * h * w, dim)
    for i in range(d):
        for j in range(h):
            for k in range(w):
                want = _axis(k, 2) + _axis(j, 2) + _axis(i, 2) + [0.0, 0.0]
                assert got[(i * h + j) * w + k].tolist() == pytest.approx(want, abs=1e-6)


def test_sincos_grid_1d_and_the_float64_rounding() -> None:
    got = sincos_grid((50,), 6)
    assert got[37].tolist() == pytest.approx(_axis(37, 3), abs=1e-6)
    # computed in float64, rounded to float32 once: equal to the rounding of the exact values
    exact = torch.tensor([_axis(p, 3) for p in range(50)], dtype=torch.float64).float()
    assert torch.equal(got, exact)


def test_sincos_grid_without_a_frequency_per_axis_is_all_zero() -> None:
    assert torch.equal(sincos_grid((2, 2), 3), torch.zeros(4, 3))


# -- tensors and config ---------------------------------------------------------------------------------
def test_kept_first_is_stable() -> None:
    keep = torch.tensor([[False, True, False, True, True], [True, True, False, False, True]])
    assert kept_first(keep).tolist() == [[1, 3, 4, 0, 2], [0, 1, 4, 2, 3]]
    # rows long enough that an unstable sort reorders ties
    keep = torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    for row, order in zip(keep.tolist(), kept_first(keep).tolist()):
        assert order == [i for i, k in enumerate(row) if k] + [i for i, k in enumerate(row) if not k]


def test_float_pair() -> None:
    got = float_pair([1, 2])
    assert got == (1.0, 2.0) and all(isinstance(v, float) for v in got)
    with pytest.raises(ValueError):
        float_pair([1, 2, 3])


def test_view_config_merges_and_rejects_unknown_keys() -> None:
    defaults = {"flip_p": 0.5, "scale": (0.8, 1.25)}
    assert view_config("image", defaults, None) == defaults
    merged = view_config("image", defaults, {"flip_p": 0.0})
    assert merged == {"flip_p": 0.0, "scale": (0.8, 1.25)} and defaults["flip_p"] == 0.5
    with pytest.raises(ValueError, match=r"unknown mri views keys \['flp_p'\]; known: flip_p, scale"):
        view_config("mri", defaults, {"flp_p": 0.0})
