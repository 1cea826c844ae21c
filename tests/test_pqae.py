"""Point-PQAE's cross-view reconstruction: decoupled views whose relative positions land where the
other view's points are, the loss against a literal Chamfer re-implementation, and steps that learn."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmssl.config import compose
from mmssl.data.loader import iter_split, resolve_source
from mmssl.factory import build_encoder, build_objective, encoder_config


def _setup(cache_dir: Path, **views: object):
    cfg = compose(["modality=point", "objective=pqae", "model.depth=1"])
    mcfg = OmegaConf.to_container(cfg.modality.point, resolve=True)
    mcfg["adapter"]["views"].update(views)
    enc = build_encoder(encoder_config("point", "micro", mcfg, OmegaConf.to_container(cfg.model), "pqae"))
    obj = build_objective("pqae", OmegaConf.to_container(cfg.objective, resolve=True), {"point": enc}, {"point": mcfg})
    src = resolve_source({"name": "default"}, ["point"], mcfg["preset"], cache_dir)
    batch = next(iter(iter_split(src, "train", batch_size=4, buffer=4, max_len=mcfg["max_len"])))
    return obj, enc, batch


def _normalised(x: torch.Tensor, n: int) -> torch.Tensor:
    """One cloud's first n points centred on their centroid and scaled into the unit ball."""
    p = x[:n].double()
    p = p - p.mean(0)
    return p / p.norm(dim=1).max()


def test_relative_positions_land_on_the_source_views_points(cache_dir: Path) -> None:
    """Without jitter, a target group centre that the source crop also holds, mapped into the source's
    own normalised frame, is one of the source's normalised points; whole-cloud crops share one frame."""
    _, enc, batch = _setup(cache_dir, jitter_sigma=0.0)
    ad = enc.adapter
    torch.manual_seed(0)
    a, b = ad.cross_views(batch)
    tb = ad.tokenize(b)
    rel = ad.relative_position(a, b, tb)  # [B, G, 4]
    assert rel.shape == (*tb.pad.shape, 4)
    hits = 0
    for i in range(len(rel)):
        na, nb = int(a["point_len"][i]), int(b["point_len"][i])
        src = _normalised(a["point"][i], na)
        shared_a = {tuple(p) for p in a["point"][i, :na].tolist()}
        tgt = _normalised(b["point"][i], nb)
        for g in (~tb.pad[i]).nonzero()[:, 0].tolist():
            # the centre's own point in b (FPS picks real points), back in the shared frame
            j = int((tgt - tb.coords[i, g].double()).norm(dim=1).argmin())
            if tuple(b["point"][i, j].tolist()) in shared_a:
                assert (src - rel[i, g, :3].double()).norm(dim=1).min() < 1e-4
                hits += 1
        ra, rb = (float((v[:n].double() - v[:n].double().mean(0)).norm(dim=1).max())
                  for v, n in ((a["point"][i], na), (b["point"][i], nb)))
        assert float(rel[i, 0, 3]) == pytest.approx(float(torch.log(torch.tensor(rb / ra))), abs=1e-5)
    assert hits > 10  # the crops overlap
    _, enc, batch = _setup(cache_dir, jitter_sigma=0.0, cross_scale=[1.0, 1.0])
    torch.manual_seed(0)
    a, b = enc.adapter.cross_views(batch)
    tb = enc.adapter.tokenize(b)
    rel = enc.adapter.relative_position(a, b, tb)
    assert torch.allclose(rel[..., :3][~tb.pad], tb.coords[~tb.pad], atol=1e-5)
    assert torch.allclose(rel[..., 3], torch.zeros_like(rel[..., 3]), atol=1e-6)


def _literal_chamfer(pred: torch.Tensor, target: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Point-MAE's Chamfer L2 written out group by group: for each real group, each predicted point's
    squared distance to its nearest target point (mean) plus the reverse; the mean over groups."""
    terms = []
    for b, g in real.nonzero().tolist():
        p, t = pred[b, g].view(-1, 3), target[b, g].view(-1, 3)
        d = ((p[:, None, :] - t[None, :, :]) ** 2).sum(-1)  # [n, m]: every predicted point to every target one
        terms.append(d.min(1).values.mean() + d.min(0).values.mean())
    return torch.stack(terms).mean()


def test_loss_against_the_literal_cross_reconstruction(cache_dir: Path) -> None:
    torch.manual_seed(0)
    obj, enc, batch = _setup(cache_dir)
    ad = enc.adapter
    batch = {k: v[:2] for k, v in batch.items()}
    obj.eval()
    torch.manual_seed(3)
    got = obj(batch)
    torch.manual_seed(3)
    views = ad.cross_views(batch)
    toks = [ad.tokenize(v) for v in views]
    outs = [enc.encode(t) for t in toks]
    ref = 0.0
    for s, t in ((0, 1), (1, 0)):
        pred = obj.reconstruct(toks[s], outs[s], ad.relative_position(views[s], views[t], toks[t]), toks[t].pad)
        ref = ref + _literal_chamfer(pred, ad.targets(views[t], toks[t]), ~toks[t].pad) / 2
    assert got.loss.item() == pytest.approx(float(ref.detach()), rel=1e-5)


@pytest.mark.slow
def test_steps_learn(cache_dir: Path) -> None:
    torch.manual_seed(0)
    obj, _, batch = _setup(cache_dir)
    batch = {k: v[:2] for k, v in batch.items()}
    obj.train()
    before = {n: p.detach().clone() for n, p in obj.named_parameters()}
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    first = last = None
    for step in range(16):
        torch.manual_seed(step % 2)  # two fixed view draws: the loss on them must fall
        out = obj(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = float(out.loss) if step < 2 and first is None else first
        last = float(out.loss)
    assert last < 0.7 * first, (first, last)
    moved = {n for n, p in obj.named_parameters() if not torch.equal(before[n], p)}
    assert "query_token" in moved and any(n.startswith("query_pos") for n in moved)
    assert any(n.startswith("towers.point.adapter") for n in moved)
    assert set(obj.heads()) == {"pqae_decoder"}


def test_only_adapters_with_cross_views_take_it() -> None:
    from mmssl.registry import OBJECTIVES

    assert OBJECTIVES.get("pqae").supports(["point"]) is None
    why = OBJECTIVES.get("pqae").supports(["image"])
    assert why and "decoupled cross views" in why and "'image'" in why
