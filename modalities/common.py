"""Helpers the modality adapters share: random token masking, the masked per-token MSE, fixed sin-cos
positions, per-patch target normalisation, and the ``views`` config merge.

Each helper performs the operations the adapters used to write out themselves, in the same order, on
the same device and in the same dtypes. Keep it so: training runs are seeded and their figures are
published, and one more (or one moved) random draw, or a reordered float reduction, changes them.

Shapes: B batch items, N tokens per item, P values per token, F frequencies."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: noise given to tokens that must rank after every drawn one (uniform noise lies in [0, 1))
_LAST = 2.0


# -- random masking -------------------------------------------------------------------------------------
def cpu_uniform(*size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise in [0, 1) of shape ``size``, always drawn on the CPU (``generator``, or torch's
    global CPU RNG when None): a seeded CPU generator then gives the same masks whether the batch is on
    the CPU or a GPU. Callers that rank on the batch's device move the noise there themselves."""
    return torch.rand(*size, generator=generator, device="cpu")


def mae_keep_count(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """lengths [B] real tokens per item -> [B] int64 tokens MAE keeps visible: ``int(L * (1 - ratio))``.

    In float64, as Python's float: the product rounds (and so floors) exactly as MAE's
    ``int(L * (1 - mask_ratio))``; in float32 it could land on the other side of an integer."""
    return (lengths.double() * (1.0 - ratio)).floor().long()


def noise_ranks(noise: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """noise [B, N] (uniform noise, or priorities below 2), last [B, N] bool -> [B, N] int64: each
    token's rank in its row by ascending noise (0 = lowest). ``last`` tokens (padding, tokens that may
    not be hidden) rank after all others, so "the k lowest ranks" only ever picks allowed tokens.

    The double argsort turns a sort order into per-token ranks without a scatter; it runs on
    ``noise``'s device."""
    return torch.argsort(torch.argsort(noise.masked_fill(last, _LAST), 1), 1)


def random_token_mask(pad: torch.Tensor, ratio: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """MAE's per-sample random masking. pad [B, N] bool (True = padding) -> hidden [B, N] bool on
    ``pad``'s device: of each item's L real tokens the ``mae_keep_count`` with the lowest noise stay
    visible and the rest are hidden; padding is never hidden. The noise [B, N] is drawn on the CPU and
    ranked there (one device-to-host copy of ``pad``)."""
    pad_cpu = pad.cpu()
    B, N = pad_cpu.shape
    n_keep = mae_keep_count((~pad_cpu).sum(1), ratio)
    rank = noise_ranks(cpu_uniform(B, N, generator=generator), pad_cpu)
    return ((rank >= n_keep[:, None]) & ~pad_cpu).to(pad.device)


# -- reconstruction losses ------------------------------------------------------------------------------
def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target [B, N, P] -> [B, N, P] float32 squared differences (in float32 whatever the
    prediction's dtype: bf16 squares of small errors lose their digits)."""
    return (pred.float() - target.float()) ** 2


def masked_token_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """err [B, N] per-token errors, mask [B, N] bool (True = count) -> scalar mean over the counted
    tokens; 0 (not 0 / 0 = NaN) when none is counted, keeping the graph for an all-visible batch."""
    m = mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss. pred, target [B, N, P], mask [B, N] bool (True = count) -> scalar: each token's MSE
    over its P values, averaged over the counted tokens."""
    return masked_token_mean(squared_error(pred, target).mean(-1), mask)


def normalise_patches(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix`` target: t [..., P] -> [..., P], each patch (last dim) shifted to mean 0 and
    divided by ``sqrt(var + eps)`` with the unbiased variance (MAE's ``var``, not the population one)."""
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + eps) ** 0.5


# -- positions ------------------------------------------------------------------------------------------
def sincos(angles: torch.Tensor) -> torch.Tensor:
    """angles [..., F] -> [..., 2F] ``[sin(angles), cos(angles)]``: sines first, the channel layout of
    MAE's tables and the Transformer's."""
    return torch.cat([angles.sin(), angles.cos()], -1)


def sincos_grid(shape: Sequence[int], dim: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """MAE's fixed sin-cos position table (``get_2d_sincos_pos_embed``) for a grid of any number n of
    axes: -> [prod(shape), dim] float32, row-major (the first axis varies slowest).

    Each axis takes 2F channels, F = dim // (2n): ``[sin(p * omega), cos(p * omega)]`` with
    omega_k = 1 / 10000^(k / F), p the integer position on that axis. The axes' channels run from the
    last axis to the first (MAE's ``meshgrid(grid_w, grid_h)`` puts the column before the row); the
    ``dim - 2nF`` channels left over are zero. Computed in float64 and rounded to float32 once, as
    MAE's numpy is. Which widths are acceptable is the caller's choice (F = 0: an all-zero table)."""
    f = dim // (2 * len(shape))
    f64 = {"dtype": torch.float64, "device": device}
    omega = 1.0 / 10000 ** (torch.arange(f, **f64) / f)
    axes = torch.meshgrid(*(torch.arange(s, **f64) for s in shape), indexing="ij")
    table = torch.cat([sincos(a.reshape(-1, 1) * omega[None]) for a in reversed(axes)], -1)
    return F.pad(table, (0, dim - table.shape[-1])).float()


# -- tensors and config ---------------------------------------------------------------------------------
def kept_first(keep: torch.Tensor) -> torch.Tensor:
    """keep [B, N] bool -> [B, N] int64 indices that move each row's kept entries to the front, kept and
    dropped entries each in their original order (a stable sort of the drop flag)."""
    return torch.argsort((~keep).to(torch.int8), dim=1, stable=True)


def float_pair(v: Any) -> tuple[float, float]:
    """A two-element config value (a list from yaml, a tuple from the defaults) -> (float, float)."""
    a, b = v
    return float(a), float(b)


def view_config(modality: str, defaults: Mapping[str, Any],
                given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The modality yaml's ``adapter.views`` over the adapter's ``defaults``. An unknown key is an
    error: a misspelt one would otherwise leave its default silently in place."""
    unknown = set(given or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {modality} views keys {sorted(unknown)}; known: {', '.join(defaults)}")
    return {**defaults, **(given or {})}
