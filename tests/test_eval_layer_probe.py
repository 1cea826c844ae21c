"""Layer-weighted probe (eval/layer_probe.py): the featurizer against its formula, the batched scores
against a per-variant reference, weights that find the one informative layer, selection blind to the
test labels, and an end-to-end run on packed images writing the common schema."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmssl.eval.layer_probe import (
    fit_layer_probe,
    layers_to_probe,
    single_scores,
    standardise_layers,
    weighted_scores,
    weighted_sum,
)


def test_weighted_sum_with_zero_logits_is_the_plain_average() -> None:
    z = torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]], [[-1.0, 1.0]]])  # [L=3, n=1, D=2]
    torch.testing.assert_close(weighted_sum(torch.zeros(3), z), torch.tensor([[1.0, 3.0]]))
    # logits (0, ln 3, -inf): weights (1/4, 3/4, 0) -> (1 + 9) / 4, (2 + 18) / 4
    logits = torch.tensor([0.0, float(torch.log(torch.tensor(3.0))), float("-inf")])
    torch.testing.assert_close(weighted_sum(logits, z), torch.tensor([[2.5, 5.0]]))
    # batched over variants: row v uses its own logits
    both = weighted_sum(torch.stack([torch.zeros(3), logits]), z)
    torch.testing.assert_close(both, torch.tensor([[[1.0, 3.0]], [[2.5, 5.0]]]))


def test_batched_scores_match_each_variant() -> None:
    g = torch.Generator().manual_seed(0)
    L, n, D, K, V = 3, 5, 4, 2, 2
    z, a = torch.randn(L, n, D, generator=g), torch.randn(V, L, generator=g)
    W, b = torch.randn(V, D, K, generator=g), torch.randn(V, K, generator=g)
    got = weighted_scores(a, z, W, b)
    for v in range(V):
        ref = sum(F.softmax(a[v], 0)[l] * z[l] for l in range(L)) @ W[v] + b[v]
        torch.testing.assert_close(got[v], ref)
    Ws, bs = torch.randn(L, V, D, K, generator=g), torch.randn(L, V, K, generator=g)
    got = single_scores(z, Ws, bs)
    for l in range(L):
        for v in range(V):
            torch.testing.assert_close(got[l, v], z[l] @ Ws[l, v] + bs[l, v])


def test_standardise_uses_train_statistics_per_layer() -> None:
    tr = torch.tensor([[[0.0], [2.0]], [[10.0], [30.0]]])  # layer 0: mean 1 std sqrt(2); layer 1: 20, sqrt(200)
    te = torch.tensor([[[1.0]], [[40.0]]])
    ztr, zte = standardise_layers(tr, te)
    torch.testing.assert_close(zte, torch.tensor([[[0.0]], [[20.0 / 200 ** 0.5]]]))
    torch.testing.assert_close(ztr[:, :, 0], torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]) / 2 ** 0.5)


def _one_informative_layer(n: int, seed: int, K: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """[L=4, n, D=8] features where only layer 2 carries the label, at the smallest scale of all (the
    per-layer z-score must make scale irrelevant); the other layers are noise of larger scales."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(K, (n,), generator=g)
    z = torch.randn(4, n, 8, generator=g) * torch.tensor([1.0, 20.0, 1.0, 5.0])[:, None, None]
    z[2, :, :K] += 2.0 * F.one_hot(y, K)
    z[2] *= 0.01
    return z, y


def test_weights_concentrate_on_the_informative_layer() -> None:
    (ztr, ytr), (zva, yva), (zte, yte) = (_one_informative_layer(n, s) for n, s in ((240, 0), (120, 1), (300, 2)))
    fit = fit_layer_probe(ztr, ytr, zva, yva, zte, yte, 3, [0.03, 0.1], epochs=30, batch_size=None)
    w = fit.weights
    assert w.shape == (4,) and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert int(w.argmax()) == 2 and float(w[2]) > 0.6, w
    acc = fit.layer_test_correct.float().mean(1)
    assert int(acc.argmax()) == 2 and float(acc[2]) > 0.8 and float(acc.max(0).values) > float(acc[[0, 1, 3]].max())
    assert max(acc[[0, 1, 3]].tolist()) < 0.5  # noise layers: near chance (1/3)
    assert float(fit.test_correct.float().mean()) > 0.8
    assert 1 <= fit.epoch <= 30 and fit.lr in (0.03, 0.1)
    # without the per-layer z-score the informative layer is 100x smaller than the others' noise
    raw = fit_layer_probe(ztr, ytr, zva, yva, zte, yte, 3, [0.03, 0.1], epochs=30, batch_size=None,
                          normalize=False)
    assert float(raw.weights[2]) < float(w[2])


def test_selection_never_reads_the_test_labels() -> None:
    (ztr, ytr), (zva, yva), (zte, yte) = (_one_informative_layer(n, s) for n, s in ((120, 3), (60, 4), (90, 5)))
    kw = {"lrs": [0.01, 0.1], "epochs": 8, "batch_size": 32, "seed": 1}
    a = fit_layer_probe(ztr, ytr, zva, yva, zte, yte, 3, **kw)
    b = fit_layer_probe(ztr, ytr, zva, yva, zte, (yte + 1) % 3, 3, **kw)  # every test label wrong
    assert (a.lr, a.epoch, a.val_accuracy, a.layer_val_accuracy) == (b.lr, b.epoch, b.val_accuracy,
                                                                      b.layer_val_accuracy)
    torch.testing.assert_close(a.weights, b.weights)
    assert not (a.test_correct & b.test_correct).any()  # the same predictions, scored against other labels


def test_final_output_is_kept_once() -> None:
    x = torch.randn(3, 4, 2)  # blocks 0, 1, then the final output
    assert layers_to_probe(x) == ([0, 1, -1], False)
    x[2] = x[1]  # a post-norm stack: the final output is the last block's output
    assert layers_to_probe(x) == ([0, 1], True)
    x[2, 0, 0] += 1e-6  # anything short of bit-identical is a layer of its own
    assert layers_to_probe(x) == ([0, 1, -1], False)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """3 classes x 12 noisy 16 x 16 images of one colour per class, packed: 18 / 9 / 9 items."""
    import numpy as np
    from PIL import Image

    from mmssl.cli import main

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir()
        for k in range(12):
            im = rng.integers(0, 90, (16, 16, 3))
            im[..., c] += 150
            Image.fromarray(im.astype(np.uint8)).save(root / name / f"{k}.png")
    out = root.parent / (root.name + "-shards")
    assert main(["data", "pack", "modality=image", f"src={root}", f"out={out}", "shards=2", "val=0.25",
                 "test=0.25"]) == 0
    return out


def test_run_layer_probe_writes_the_schema(image_shards: Path, tmp_path: Path, cache_dir: Path) -> None:
    from mmssl.config import compose, to_dict
    from mmssl.data.loader import resolve_source
    from mmssl.eval.layer_probe import run_layer_probe
    from mmssl.export import save_encoder
    from mmssl.factory import build_encoder, encoder_config

    image = {"pool": "cls", "num_prefix": 1, "backbone": {"norm_first": True},
             "adapter": {"patch_size": 8, "image_size": 32, "position": "sincos"}}
    shape = {"depth": 2, "dim": 32, "heads": 2, "ffn_dim": 64}
    for seed, which in ((0, "encoders_init"), (1, "encoders")):
        torch.manual_seed(seed)
        save_encoder(build_encoder(encoder_config("image", "micro", image, shape)), tmp_path / "run" / which / "image")
    source = resolve_source({"name": "shards", "path": str(image_shards)}, ["image"], None, cache_dir)
    ecfg = {**to_dict(compose(["eval=layer_probe"]).eval), "epochs": 4, "lrs": [0.01, 0.1],
            "label_fraction": [0.5, 1.0], "seeds": 2}
    r = run_layer_probe(tmp_path / "run", tmp_path / "out", source, ecfg, torch.device("cpu"), 32, tmp_path / "c")
    saved = json.loads((tmp_path / "out" / "layer_probe.json").read_text())
    assert (tmp_path / "out" / "layer_probe.png").stat().st_size > 0
    for key in ("evaluator", "modality", "encoder", "data", "random_init_source", "accuracy", "accuracy_std",
                "accuracy_ci95", "accuracy_per_seed", "random_init_accuracy", "random_init_accuracy_std",
                "random_init_accuracy_ci95", "random_init_accuracy_per_seed", "label_fractions", "seeds", "n_train",
                "n_val", "n_test", "num_classes", "skipped_samples", "seconds", "layer_weights", "layer_names",
                "per_layer_accuracy", "random_init_per_layer_accuracy", "random_init_layer_weights"):
        assert key in saved, key
    assert saved["evaluator"] == "layer_probe" and saved["random_init_source"] == "step0"
    assert (saved["n_train"], saved["n_val"], saved["n_test"], saved["num_classes"]) == (18, 9, 9, 3)
    # a pre-norm stack: its final output (after the final norm) is a layer of its own
    names = ["block0", "block1", "final"]
    assert saved["layer_names"] == names and saved["final_is_last_block"] is False and saved["layers"] == [0, 1, -1]
    for key in ("layer_weights", "random_init_layer_weights"):
        assert len(saved[key]) == len(names) and sum(saved[key]) == pytest.approx(1.0, abs=1e-5)
    assert len(saved["per_layer_accuracy"]) == len(saved["random_init_per_layer_accuracy"]) == len(names)
    half, full = saved["label_fractions"]
    assert (half["label_fraction"], full["label_fraction"]) == (0.5, 1.0)
    assert full["n_train"] == 18 and half["n_train"] == 9  # stratified: 3 of each class's 6
    assert saved["accuracy"] == full["accuracy"] and len(saved["accuracy_per_seed"]) == 2
    assert saved["accuracy"] == pytest.approx(sum(saved["accuracy_per_seed"]) / 2)
    lo, hi = saved["accuracy_ci95"]
    assert lo <= saved["accuracy"] <= hi
    assert all(lr in (0.01, 0.1) for lr in saved["selected"]["lr"]) and r["accuracy"] == saved["accuracy"]
    assert len(list((tmp_path / "c" / "features").glob("*.safetensors"))) == 6  # 2 encoders x 3 splits
