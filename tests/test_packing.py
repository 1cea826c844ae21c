"""Packed token rows: first-fit rows, a lossless pack/unpack, and an encoder (and its MAE loss) that
gives the padded batch's outputs on packed rows, for text, speech and EEG."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmssl.config import compose
from mmssl.data.loader import iter_split, resolve_source
from mmssl.factory import build_encoder, build_objective, encoder_config
from mmssl.packing import block_mask, first_fit, pack, plan, unpack


def test_first_fit_decreasing_rows_and_a_lossless_round_trip() -> None:
    assert first_fit([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]
    with pytest.raises(ValueError, match="does not fit"):
        first_fit([7], 6)
    pad = torch.tensor([[False] * 5 + [True], [False] * 3 + [True] * 3, [False] * 4 + [True] * 2,
                        [False] * 2 + [True] * 4, [False] + [True] * 5])
    p = plan(pad)
    assert p.rows == 3 and p.padding_fraction() == pytest.approx(3 / 18)
    assert (~pad).float().mean() < 1 - p.padding_fraction()  # fewer padding slots than the padded batch
    x = torch.randn(5, 6, 4)
    y = pack(x, p)
    assert y.shape == (3, 6, 4)
    back = unpack(y, p)
    assert torch.equal(back[~pad], x[~pad]) and bool((back[pad] == 0).all())
    m = block_mask(p)[:, 0]
    seg = p.segment
    for r in range(3):
        for i in range(6):
            for j in range(6):
                want = (seg[r, i] == seg[r, j] and seg[r, i] >= 0) or (i == j and seg[r, i] < 0)
                assert bool(m[r, i, j]) == bool(want)


def _batch_and_encoder(modality: str, cache_dir: Path):
    cfg = compose([f"modality={modality}", "objective=mae", "model.depth=2"])
    mcfg = OmegaConf.to_container(cfg.modality[modality], resolve=True)
    enc = build_encoder(encoder_config(modality, "micro", mcfg, OmegaConf.to_container(cfg.model), "mae"))
    src = resolve_source({"name": "default"}, [modality], mcfg["preset"], cache_dir)
    # an unsorted buffer: items of several lengths; the longest and the five shortest side by side, so
    # short items share rows in every case
    whole = next(iter(iter_split(src, "train", batch_size=24, buffer=24, max_len=mcfg.get("max_len"))))
    n = enc.adapter.num_tokens(whole)
    order = torch.argsort(n)
    pick = torch.cat([order[-1:], order[:5]])
    batch = {k: v[pick] if torch.is_tensor(v) and v.shape[:1] == n.shape else v for k, v in whole.items()}
    obj = build_objective("mae", OmegaConf.to_container(cfg.objective, resolve=True), {modality: enc}, {modality: mcfg})
    return enc, obj, batch


# text's vocabulary-wide MAE head makes its case the slow one
@pytest.mark.parametrize("modality", [pytest.param("text", marks=pytest.mark.slow), "speech", "eeg"])
def test_packed_rows_give_the_padded_outputs_and_loss(modality: str, cache_dir: Path) -> None:
    torch.manual_seed(0)
    enc, obj, batch = _batch_and_encoder(modality, cache_dir)
    obj.eval()
    tok = enc.adapter.tokenize(batch)
    assert bool(tok.pad.any()), "the batch should mix lengths"
    padded = enc.encode(tok, return_layers=True)
    enc.pack_tokens = True
    packed = enc.encode(tok, return_layers=True)
    real = ~padded.pad
    assert torch.allclose(packed.last[real], padded.last[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(packed.layers, padded.layers):
        assert torch.allclose(a[real], b[real], atol=1e-5, rtol=1e-5)
    assert plan(tok.pad).rows < tok.pad.shape[0]  # items do share rows: the mask keeps them apart
    losses = []
    for flag in (False, True):
        enc.pack_tokens = flag
        torch.manual_seed(7)  # the same masks
        losses.append(obj(batch).loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
