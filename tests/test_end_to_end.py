"""One real end-to-end run on packed real files: pack -> pretrain (HuBERT iteration 1) -> export ->
load -> linear probe -> extract; then iteration 2 on layer features of the first run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import mmssl
from mmssl.cli import main
from tests.conftest import tiny_overrides


def test_pack_reports_bad_files(packed: Path) -> None:
    meta = json.loads((packed / "meta.json").read_text())
    assert meta["classes"] == ["fo-ni-tae-pu", "mo-ke-shu", "sa-ti"]
    assert sum(meta["bad_samples"].values()) == 3  # broken, empty and too-short files: counted, listed
    assert len(meta["bad_files"]) == 3
    counts = {s: v["count"] for s, v in meta["splits"].items()}
    assert sum(counts.values()) == 120 and counts["test"] == 24 and counts["val"] == 24


def test_pretrain_export_load_probe_and_iteration_2(packed: Path, tmp_path: Path, cache_dir: Path) -> None:
    r1 = tmp_path / "it1"
    assert main(["pretrain", *tiny_overrides(packed, r1, steps=6)]) == 0
    for p in ("config.yaml", "metrics.jsonl", "checkpoints/last/model.safetensors", "encoders/speech/model.safetensors",
              "encoders/speech/config.json", "encoders_init/speech/model.safetensors", "heads/hubert.safetensors",
              "plots/loss.png"):
        assert (r1 / p).exists(), p
    rows = [json.loads(x) for x in (r1 / "metrics.jsonl").read_text().splitlines()]
    prep = next(r for r in rows if r.get("event") == "prepare")
    assert prep["targets_k"] == 20 and prep["targets_clusters_used"] > 10
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) for r in steps) and all("items_per_s" in r for r in steps)
    cfg = json.loads((r1 / "encoders/speech/config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["size"] == "micro" and cfg["pool"] == "mean"
    assert cfg["preprocessing"]["sample_rate"] == 16000

    enc = mmssl.load_encoder(r1)
    wav = {"speech": torch.randn(2, 16000) * 0.1, "speech_len": torch.tensor([16000, 12000])}
    with torch.no_grad():
        e = enc.embed(wav)
        out = enc(wav, return_layers=True)
    assert e.shape == (2, 64) and len(out.layers) == 2
    init = mmssl.load_encoder(r1 / "encoders_init" / "speech")
    from mmssl.eval.linear_probe import init_encoder

    base, source = init_encoder(r1 / "encoders" / "speech", enc)  # an export inside a run finds step 0
    assert source == "step0" and all(torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                                       init.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(enc.state_dict().values(), init.state_dict().values()))

    o = tmp_path / "probe"
    assert main(["eval", "linear-probe", f"encoder={r1}", f"out={o}", "data=shards", f"data.path={packed}",
                 "eval.C=[0.1,1.0]"]) == 0
    res = json.loads((o / "linear_probe.json").read_text())
    for k in ("accuracy", "random_init_accuracy", "features_baseline_accuracy", "num_classes", "n_train", "n_val",
              "n_test", "layer"):
        assert k in res
    assert res["num_classes"] == 3 and res["n_test"] == 24 and res["random_init_source"] == "step0"
    assert (o / "linear_probe.png").exists()

    x = tmp_path / "feats"
    assert main(["extract", f"encoder={r1}/encoders/speech", f"out={x}", "data=shards", f"data.path={packed}",
                 "split=val"]) == 0
    assert np.load(x / "features.npy").shape == (24, 64)

    # iteration 2: k-means on layer 1 of the first run's encoder
    r2 = tmp_path / "it2"
    assert main(["pretrain", *tiny_overrides(packed, r2, steps=2, **{"objective.targets": "layer",
                                                                     "objective.teacher": str(r1),
                                                                     "objective.k": "15"})]) == 0
    prep2 = next(json.loads(x) for x in (r2 / "metrics.jsonl").read_text().splitlines() if "prepare" in x)
    assert prep2["targets_feature"] == "layer" and prep2["targets_layer"] == 1 and prep2["targets_k"] == 15


def test_layer_targets_need_a_teacher(packed: Path, tmp_path: Path) -> None:
    assert main(["pretrain", *tiny_overrides(packed, tmp_path / "x", **{"objective.targets": "layer"})]) == 2


def test_pack_refuses_to_overwrite(audio_tree: Path, packed: Path, tmp_path: Path) -> None:
    args = ["data", "pack", "modality=speech", f"src={audio_tree}"]
    assert main([*args, f"out={packed}"]) == 2  # exists, not empty
    assert main([*args, f"out={audio_tree / 'shards'}"]) == 2  # inside the source tree
    assert (audio_tree / "sa-ti").is_dir()
