"""`mmssl pretrain objective=mae` through the CLI for image, text and speech: a few steps of a small
model, the export, `mmssl.load_encoder`, and (image) the linear probe on the result."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import mmssl
from mmssl.cli import main
from tests.conftest import tiny_overrides

SMALL = ["model.depth=1", "model.dim=64", "model.heads=2", "model.ffn_dim=128", "objective.decoder_dim=32",
         "objective.decoder_depth=1", "objective.decoder_heads=2", "trainer.num_workers=0", "trainer.progress=false",
         "trainer.tensorboard=false", "trainer.log_every=1", "trainer.warmup_steps=1"]


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_image_mae_pretrain_then_probe(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "img"
    assert main(["pretrain", "modality=image", "objective=mae", "data=digits", f"run_dir={run}",
                 "trainer.max_steps=3", "trainer.batch_size=16", *SMALL]) == 0
    steps = _steps(run)
    assert [r["step"] for r in steps] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in steps)
    # 75% of the 64 patches hidden, exactly, in every sample; the encoder saw the other 16
    assert all(r["mask_fraction"] == 0.75 and r["visible_tokens"] == 16 * 16 for r in steps)
    assert (run / "heads" / "mae_decoder.safetensors").exists()
    cfg = json.loads((run / "encoders/image/config.json").read_text())
    assert cfg["objective"] == "mae" and cfg["preprocessing"]["max_len"] == 32
    enc = mmssl.load_encoder(run)
    with torch.no_grad():
        assert enc.embed({"image": torch.rand(2, 3, 32, 32)}).shape == (2, 64)
    out = tmp_path / "probe"
    assert main(["eval", "linear-probe", f"encoder={run}", f"out={out}", "data=digits", "eval.C=[0.1,1.0]",
                 "eval.max_iter=50"]) == 0
    res = json.loads((out / "linear_probe.json").read_text())
    assert res["n_test"] == 600 and res["num_classes"] == 10 and res["random_init_source"] == "step0"
    assert 0.1 < res["features_baseline_accuracy"] <= 1.0


def test_text_mae_is_masked_language_modelling(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "txt"
    assert main(["pretrain", "modality=text", "objective=mae", f"run_dir={run}", "trainer.max_steps=2",
                 "trainer.batch_size=8", "modality.text.adapter.bert_replace=true", *SMALL]) == 0
    steps = _steps(run)
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) and "acc_hidden" in r for r in steps)
    # hidden ids are predicted over the whole vocabulary: the first loss is near log(49408)
    assert abs(steps[0]["loss"] - np.log(49408)) < 1.5
    assert 0.2 < steps[0]["mask_fraction"] < 0.3  # 30% of the body; sot/eot are never hidden
    cfg = json.loads((run / "encoders/text/config.json").read_text())
    assert cfg["preprocessing"]["vocab_size"] == 49408


def test_speech_mae_uses_absolute_sinusoidal_positions(packed: Path, tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "sp"
    ov = [o for o in tiny_overrides(packed, run, steps=2) if not o.startswith("objective.")]
    assert main(["pretrain", "objective=mae", *ov, "objective.decoder_dim=32", "objective.decoder_depth=1",
                 "objective.decoder_heads=2"]) == 0
    steps = _steps(run)
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert all(0.4 < r["mask_fraction"] < 0.85 for r in steps)  # 0.65 in 10-frame spans
    cfg = json.loads((run / "encoders/speech/config.json").read_text())
    assert cfg["adapter"]["position"] == "sinusoidal"
    enc = mmssl.load_encoder(run)
    assert enc.adapter.content_position is None
