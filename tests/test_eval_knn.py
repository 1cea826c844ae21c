"""k-NN evaluator: votes against a hand-written loop and a hand-computed example, chunking, and a tiny
end-to-end ``run_knn`` writing the common result schema."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmssl.eval.knn import knn_classify, knn_votes, preprocess


def brute_force(bank: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, k: int, T: float,
                C: int) -> torch.Tensor:
    """DINO's vote, one query and one neighbour at a time, in float64."""
    out = torch.zeros(query.shape[0], C, dtype=torch.float64)
    for i, q in enumerate(query.double()):
        sims = [float(q @ b.double() / (q.norm() * b.double().norm())) for b in bank]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        for j in order:
            out[i, int(labels[j])] += math.exp(sims[j] / T)
    return out


def test_votes_match_a_brute_force_loop() -> None:
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(40, 6, generator=g) * 3, torch.randn(9, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    for k, T in [(1, 0.07), (5, 0.07), (20, 0.5), (60, 1.0)]:  # 60 > n: the whole bank votes
        got = knn_classify(bank, labels, query, k=k, T=T, num_classes=4)
        want = brute_force(bank, labels, query, min(k, 40), T, 4)
        assert got.shape == (9, 4)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=0)
        assert ((got > 0).sum(1) <= min(k, 40)).all()


def test_temperature_weighting_overrules_the_majority() -> None:
    # query along x; class 1 has one neighbour at cos 1.0, class 0 two at cos 0.8 (k=3)
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1])
    q = torch.tensor([[2.0, 0.0]])
    s = knn_classify(bank, labels, q, k=3, T=0.07, num_classes=2)[0]
    # exp(1/0.07) = 1.57e6 against 2 exp(0.8/0.07) = 1.80e5: class 1 wins by weight
    assert s[1] == pytest.approx(math.exp(1 / 0.07), rel=1e-5)
    assert s[0] == pytest.approx(2 * math.exp(0.8 / 0.07), rel=1e-5)
    assert int(s.argmax()) == 1
    # a hot temperature is nearly a plain majority vote: two against one
    hot = knn_classify(bank, labels, q, k=3, T=100.0, num_classes=2)[0]
    assert int(hot.argmax()) == 0


def test_chunking_and_several_k_agree() -> None:
    g = torch.Generator().manual_seed(1)
    bank, query = torch.randn(100, 8, generator=g), torch.randn(37, 8, generator=g)
    labels = torch.randint(0, 5, (100,), generator=g)
    whole = knn_votes(bank, labels, query, [3, 10, 20], 0.07, 5)
    for chunk in (1, 7, 36):
        parts = knn_votes(bank, labels, query, [3, 10, 20], 0.07, 5, chunk=chunk)
        for k in (3, 10, 20):
            torch.testing.assert_close(parts[k], whole[k], rtol=1e-5, atol=0)  # matmul blocking differs
    torch.testing.assert_close(whole[10], knn_classify(bank, labels, query, k=10, num_classes=5), rtol=1e-5,
                               atol=0)


def test_preprocess_uses_bank_statistics_only() -> None:
    bank = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    query = torch.tensor([[2.0, 40.0]])
    c_bank, c_query = preprocess(bank, query, how="center")
    assert torch.equal(c_query, torch.tensor([[0.0, 20.0]]))  # minus the bank mean (2, 20)
    _, z_query = preprocess(bank, query, how="zscore")  # bank std: (sqrt 2, 10 sqrt 2)
    torch.testing.assert_close(z_query, torch.tensor([[0.0, 2.0 / 2 ** 0.5]]))
    assert preprocess(bank, query)[1] is query
    with pytest.raises(ValueError, match="preprocess"):
        preprocess(bank, how="whiten")


def test_run_knn_writes_the_schema(packed: Path, tmp_path: Path, cache_dir: Path) -> None:
    from mmssl.config import compose, to_dict
    from mmssl.data.loader import resolve_source
    from mmssl.eval.knn import run_knn
    from mmssl.export import save_encoder
    from mmssl.factory import build_encoder, encoder_config

    cfg = compose(["modality=speech", "eval=knn", "data=shards", f"data.path={packed}",
                   "modality.speech.adapter.pos_conv_kernel=16", "modality.speech.adapter.pos_conv_groups=4"])
    mod = to_dict(cfg.modality.speech)
    mod["sizes"]["micro"]["adapter"]["frontend_channels"] = [16] * 7  # a narrow front-end: a fast test
    torch.manual_seed(0)
    enc = build_encoder(encoder_config("speech", "micro", mod, {"depth": 1, "dim": 32, "heads": 2, "ffn_dim": 64},
                                       None))
    save_encoder(enc, tmp_path / "enc")  # no encoders_init beside it: a fresh init is the baseline
    source = resolve_source(to_dict(cfg.data), ["speech"], None, cache_dir)
    ecfg = {**to_dict(cfg.eval), "k": [5, 20], "label_fraction": [0.2, 1.0], "seeds": 2}
    r = run_knn(tmp_path / "enc", tmp_path / "out", source, ecfg, torch.device("cpu"), 32, tmp_path / "c")
    saved = json.loads((tmp_path / "out" / "knn.json").read_text())
    assert (tmp_path / "out" / "knn.png").stat().st_size > 0
    for key in ("evaluator", "modality", "encoder", "data", "random_init_source", "accuracy", "accuracy_std",
                "accuracy_ci95", "accuracy_per_seed", "random_init_accuracy", "random_init_accuracy_std",
                "random_init_accuracy_ci95", "random_init_accuracy_per_seed", "label_fractions", "seeds", "n_train",
                "n_val", "n_test", "num_classes", "skipped_samples", "seconds", "features_baseline_accuracy"):
        assert key in saved, key
    assert saved["evaluator"] == "knn" and saved["random_init_source"] == "fresh_init_seed0"
    assert saved["num_classes"] == 3 and saved["seeds"] == 2 and saved["pool"] == enc.pool
    assert (saved["n_train"], saved["n_val"], saved["n_test"]) == (72, 24, 24)
    lo, hi = saved["accuracy_ci95"]
    assert lo <= saved["accuracy"] <= hi
    small, full = saved["label_fractions"]
    assert small["label_fraction"] == 0.2 and full["n_train"] == 72 and small["n_train"] < 20
    # the full bank does not depend on the seed; a 20% subset does, and k is chosen per bank on val
    assert full["accuracy_std"] == 0.0 and full["accuracy_per_seed"][0] == full["accuracy_per_seed"][1]
    assert small["chosen_k"] != full["chosen_k"] or small["accuracy_per_seed"][0] != small["accuracy_per_seed"][1]
    assert all(k in (5, 20) for k in small["chosen_k"] + full["chosen_k"])
    assert set(full["val_curve"]) == {"5", "20"}
    assert r["accuracy"] == full["accuracy"] == saved["accuracy"]
    # cached features: a second run reads them back and gives the same numbers
    again = run_knn(tmp_path / "enc", tmp_path / "out2", source, ecfg, torch.device("cpu"), 32, tmp_path / "c")
    assert again["label_fractions"] == saved["label_fractions"]
