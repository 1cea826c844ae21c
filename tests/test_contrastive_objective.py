"""The contrastive objectives as modules: two towers, projections, temperatures, heads export and
``load_pair``; which pairs each accepts; per-modality input sizes in the data pipeline."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from open_clip.loss import ClipLoss

from mmssl.config import compose, to_dict
from mmssl.export import save_encoder, save_heads
from mmssl.factory import build_encoder, build_objective, encoder_config, supported_pairs
from mmssl.export import load_pair
from mmssl.objectives.contrastive_loss import cloob_loss

SMALL = {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64}


def _objective(name: str, mods: tuple[str, str] = ("image", "text"), **over: object):
    cfg = compose([f"modality=[{','.join(mods)}]", f"objective={name}"])
    mcfg = {m: to_dict(cfg.modality[m]) for m in mods}
    torch.manual_seed(0)
    encs = {m: build_encoder(encoder_config(m, "micro", mcfg[m], SMALL, name)) for m in mods}
    ocfg = dict(to_dict(cfg.objective), embed_dim=16, **over)
    return build_objective(name, ocfg, encs, mcfg)


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(4, 9, (n,), generator=g)
    text = torch.zeros(n, 9, dtype=torch.long)
    for i, k in enumerate(lens.tolist()):
        text[i, :k] = torch.randint(1, 2000, (k,), generator=g)
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "text": text, "text_len": lens}


def test_clip_objective_loss_is_open_clips_on_its_embeddings() -> None:
    obj = _objective("clip")
    b = _batch()
    out = obj(b)
    a, t = obj.embed("image", b), obj.embed("text", b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(6)) and a.shape == (6, 16)
    ref = ClipLoss()(a, t, obj.head.log_scale.exp())
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert math.isclose(float(out.metrics["logit_scale"]), 1 / 0.07, rel_tol=1e-5)
    out.loss.backward()
    # gradients reach both towers, both projections and the logit scale
    for name in ("towers.image.adapter", "towers.text.adapter", "head.proj.image", "head.proj.text", "head.log_scale"):
        grads = [p.grad for n, p in obj.named_parameters() if n.startswith(name) and p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), name


def test_cloob_objective_fixed_temperatures_by_default() -> None:
    obj = _objective("cloob")
    b = _batch()
    out = obj(b)
    a, t = obj.embed("image", b), obj.embed("text", b)
    assert torch.allclose(out.loss, cloob_loss(a, t, inv_tau=30.0, beta=8.0), atol=1e-5)
    assert not obj.head.log_inv_tau.requires_grad and not obj.head.log_beta.requires_grad
    learn = _objective("cloob", learn_inv_tau=True, learn_beta=True)
    learn(b).loss.backward()
    assert learn.head.log_inv_tau.grad is not None and learn.head.log_beta.grad is not None


def test_after_step_clamps_the_logit_scale_at_100() -> None:
    obj = _objective("clip")
    with torch.no_grad():
        obj.head.log_scale.fill_(math.log(500.0))
    obj.after_step(0)
    assert math.isclose(float(obj.head.log_scale.detach()), math.log(100.0), rel_tol=1e-6)


def test_pairs_each_objective_accepts() -> None:
    pairs = supported_pairs()
    assert "[image,text]" in pairs["clip"] and "[speech,text]" in pairs["clip"] and "[image,speech]" in pairs["clip"]
    assert pairs["clap"] == ["[speech,text]", "[text,speech]"]
    with pytest.raises(ValueError, match="pairs audio"):
        _objective("clap")
    with pytest.raises(ValueError, match="2 modalities"):
        build_objective("clip", {}, {"image": build_encoder(encoder_config("image", "micro", {}, SMALL))})


def test_heads_export_and_load_pair_roundtrip(tmp_path: Path) -> None:
    obj = _objective("clip").eval()
    with torch.no_grad():
        obj.head.log_scale.fill_(math.log(20.0))
    for m, enc in obj.encoders.items():
        save_encoder(enc, tmp_path / "encoders" / m)
    save_heads(obj.heads(), tmp_path / "heads")
    pair = load_pair(tmp_path)
    b = _batch()
    assert pair.modalities == ["image", "text"] and math.isclose(pair.logit_scale, 20.0, rel_tol=1e-5)
    assert pair.input_size("image") == 32 and pair.input_size("text") == 77
    with torch.no_grad():
        for m in pair.modalities:
            assert torch.allclose(pair.embed(m, b), obj.embed(m, b), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="heads_init"):
        load_pair(tmp_path, which="encoders_init")


def test_each_modality_gets_its_own_input_size() -> None:
    from mmssl.data.loader import DataSource

    src = DataSource(Path("."), {"splits": {}}, ["image", "text"])
    items = [{"image": torch.zeros(3, 40, 48, dtype=torch.uint8), "text": torch.arange(1, 31), "sample_id": i}
             for i in range(2)]
    b = src.collate(items, {"image": 32, "text": 10}, None)
    assert b["image"].shape == (2, 3, 32, 32) and b["text"].shape == (2, 10)
