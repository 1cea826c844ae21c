"""Online evaluation during pretraining: eval records in metrics.jsonl, the training stream untouched,
the same masks at every evaluation, and objectives without a validation loss say why."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mmssl.cli import main
from tests.conftest import tiny_overrides

# a narrow speech front-end, half-second crops and a one-block decoder: the runs take seconds
FAST = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2",
        "modality.speech.sizes.micro.adapter.frontend_channels=[16,16,16,16,16,16,16]",
        "modality.speech.max_len=8000"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _mae(packed: Path, run: Path, *extra: str) -> list[dict]:
    ov = [o for o in tiny_overrides(packed, run, steps=3) if not o.startswith("objective.")]
    assert main(["pretrain", "objective=mae", *ov, *FAST, *extra]) == 0
    return _rows(run)


def test_eval_records_and_training_stream_untouched(packed: Path, tmp_path: Path, cache_dir: Path) -> None:
    on = _mae(packed, tmp_path / "on", "trainer.eval_every=2", "trainer.eval_items=8", "trainer.knn_bank=16")
    off = _mae(packed, tmp_path / "off")
    evals = [r for r in on if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps and at the end
    for r in evals:
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert 0.0 <= r["knn_acc/speech"] <= 1.0 and r["eval_seconds"] > 0
        assert r["eval_items"] == 8 and r["knn_bank"] == 16
        assert 0.4 < r["val_mask_fraction"] < 0.85
    assert not [r for r in off if r.get("event") == "eval"]
    # the monitor draws its masks from its own seeded stream: training is exactly the same with it off
    loss_on = {r["step"]: r["loss"] for r in on if "loss" in r}
    loss_off = {r["step"]: r["loss"] for r in off if "loss" in r}
    assert sorted(loss_on) == [1, 2, 3] and loss_on == loss_off


def _objective(name: str, packed: Path, cache_dir: Path) -> tuple:
    from mmssl.config import compose, to_dict
    from mmssl.data.loader import resolve_source
    from mmssl.factory import build_encoder, build_objective, encoder_config

    cfg = compose([f"objective={name}", "data=shards", f"data.path={packed}", "model.depth=1", "model.dim=32",
                   "model.heads=2", "model.ffn_dim=64", *(FAST if name == "mae" else FAST[3:]),
                   "modality.speech.adapter.pos_conv_kernel=16", "modality.speech.adapter.pos_conv_groups=4"])
    mod = to_dict(cfg.modality.speech)
    torch.manual_seed(0)
    enc = build_encoder(encoder_config("speech", "micro", mod, to_dict(cfg.model), name))
    obj = build_objective(name, to_dict(cfg.objective), {"speech": enc}, {"speech": mod})
    t = {**to_dict(cfg.trainer), "eval_every": 1, "eval_items": 6, "knn_bank": 16, "batch_size": 4}
    return obj, resolve_source(to_dict(cfg.data), ["speech"], None, cache_dir), t


def test_same_masks_every_evaluation_and_rng_restored(packed: Path, cache_dir: Path) -> None:
    from mmssl.train.monitor import Monitor

    obj, source, t = _objective("mae", packed, cache_dir)
    obj.train()
    mon = Monitor(obj, source, t, torch.device("cpu"), 8000, None)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = mon.evaluate(1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is where it was
    b = mon.evaluate(2)
    assert a["val_loss"] == b["val_loss"] and a["knn_acc/speech"] == b["knn_acc/speech"]
    assert a["eval_items"] == 6 and a["knn_bank"] == 16
    assert obj.training and all(m.training for m in obj.modules())  # train mode restored
    # and the loss is the objective's, item-weighted over the fixed batches (4 items, then 2 of the
    # next batch), with masks drawn from the seed
    assert [len(v["sample_id"]) for v in mon._val] == [4, 2]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(t["seed"])
        obj.eval()
        losses = [float(obj(v).loss) for v in mon._val]
        obj.train()
    assert abs(a["val_loss"] - (4 * losses[0] + 2 * losses[1]) / 6) < 1e-6


def test_hubert_records_why_there_is_no_val_loss(packed: Path, cache_dir: Path) -> None:
    from mmssl.train.monitor import Monitor

    obj, source, t = _objective("hubert", packed, cache_dir)  # no prepare(): no targets needed
    rec = Monitor(obj, source, t, torch.device("cpu"), 8000, None).evaluate(5)
    assert "val_loss" not in rec and "train split only" in rec["val_loss_skipped"]
    assert 0.0 <= rec["knn_acc/speech"] <= 1.0 and rec["step"] == 5 and rec["event"] == "eval"
