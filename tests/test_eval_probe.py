"""The linear-probe machinery of the evaluators: statistics, the variant sweep against one-at-a-time
torch.optim training, the feature cache, and the preprocessing-parity check of `mmssl eval`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


# -- statistics ---------------------------------------------------------------------------------------
def test_bootstrap_ci_matches_a_numpy_percentile_bootstrap() -> None:
    from mmssl.eval.stats import bootstrap_ci

    correct = (torch.arange(200) % 4 != 0).float()  # accuracy 0.75
    lo, hi = bootstrap_ci(correct, n_boot=2000, seed=3)
    idx = torch.randint(200, (2000, 200), generator=torch.Generator().manual_seed(3)).numpy()
    means = correct.numpy()[idx].mean(1)
    ref = np.percentile(means, [2.5, 97.5])
    assert lo == pytest.approx(ref[0], abs=1e-6) and hi == pytest.approx(ref[1], abs=1e-6)
    # the normal approximation of a binomial proportion: 0.75 +- 1.96 * sqrt(.75 * .25 / 200) = +-0.060
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.75 * 0.25 / 200), rel=0.15)


def test_summarise_mean_std_and_shared_resample() -> None:
    from mmssl.eval.stats import summarise

    a = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1.0])  # 0.75
    b = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0.0])  # 0.5
    s = summarise([a, b], prefix="random_init_")
    assert s["random_init_accuracy"] == pytest.approx(0.625)
    assert s["random_init_accuracy_std"] == pytest.approx(np.std([0.75, 0.5], ddof=1))
    assert s["random_init_accuracy_per_seed"] == [0.75, 0.5]
    lo, hi = s["random_init_accuracy_ci95"]
    assert 0.0 <= lo <= 0.625 <= hi <= 1.0
    one = summarise([a])
    assert one["accuracy_std"] == 0.0 and one["accuracy"] == 0.75


def test_label_subset_is_stratified_and_seeded() -> None:
    from mmssl.eval.stats import fractions_and_seeds, label_subset

    y = torch.tensor([0] * 100 + [1] * 50 + [2] * 3)
    idx = label_subset(y, 0.1, seed=0)
    counts = torch.bincount(y[idx], minlength=3).tolist()
    assert counts == [10, 5, 1]  # at least one of the rare class
    assert torch.equal(idx, label_subset(y, 0.1, seed=0))
    assert not torch.equal(idx, label_subset(y, 0.1, seed=1))
    assert torch.equal(label_subset(y, 1.0, seed=5), torch.arange(len(y)))
    with pytest.raises(ValueError):
        label_subset(y, 0.0, 0)
    assert fractions_and_seeds({"label_fraction": [0.01, 1.0], "seeds": 3, "seed": 2}) == ([0.01, 1.0], [2, 3, 4])
    with pytest.raises(ValueError):
        fractions_and_seeds({"seeds": 0})


# -- the sweep ----------------------------------------------------------------------------------------
def _blobs(n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and validation items (n and n // 2) of k Gaussian classes in d dimensions."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g) * 1.5
    y = torch.randint(k, (n + n // 2,), generator=g)
    x = means[y] + torch.randn(len(y), d, generator=g) * 2 + 5.0
    return x[:n], y[:n], x[n:], y[n:]


def test_sweep_equals_one_variant_at_a_time_with_torch_sgd() -> None:
    """Training 6 variants together gives each the weights torch.optim.SGD (momentum, weight decay,
    the same cosine schedule and shuffles) gives it alone."""
    import torch.nn.functional as F

    from mmssl.eval.probe_sweep import grid, train_sweep

    xtr, ytr, xva, yva = _blobs(300, 12, 4, 0)
    other = xtr[:, torch.randperm(12)] * 0.5  # a second feature set
    variants = grid(["a", "b"], [0.05, 0.3], [0.0, 1e-2])[:6]
    epochs, batch = 3, 64
    s = train_sweep({"a": xtr, "b": other}, ytr, {"a": xva, "b": xva}, yva, variants, 4, epochs, batch, "cpu", seed=7)
    for v, var in enumerate(variants):
        x = xtr if var.feature == "a" else other
        mean, std = x.mean(0), x.std(0)
        xz = (x - mean) / std
        W = torch.zeros(12, 4, requires_grad=True)
        b = torch.zeros(4, requires_grad=True)
        opt = torch.optim.SGD([{"params": [W], "weight_decay": var.wd}, {"params": [b], "weight_decay": 0.0}],
                              lr=var.lr, momentum=0.9)
        total = epochs * math.ceil(300 / batch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
        g = torch.Generator().manual_seed(7)
        for _ in range(epochs):
            perm = torch.randperm(300, generator=g)
            for i in range(math.ceil(300 / batch)):
                idx = perm[i * batch:(i + 1) * batch]
                loss = F.cross_entropy(xz[idx] @ W + b, ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        torch.testing.assert_close(s.W[v], W.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.b[v], b.detach(), atol=1e-5, rtol=1e-4)
        xv = (xva - mean) / std
        acc = float(((xv @ W + b).argmax(1) == yva).float().mean())
        assert float(s.val_accuracy[v]) == pytest.approx(acc)
    with pytest.raises(ValueError, match="share a feature width"):
        train_sweep({"a": xtr, "c": xtr[:, :5]}, ytr, {"a": xva, "c": xva[:, :5]}, yva,
                    grid(["a", "c"], [0.1], [0.0]), 4, 1, 64)


def test_sweep_learns_and_selects_on_validation() -> None:
    from mmssl.eval.probe_sweep import grid, train_sweep

    xtr, ytr, xva, yva = _blobs(600, 16, 5, 2)
    noise = torch.randn_like(xtr)
    s = train_sweep({"good": xtr, "noise": noise}, ytr, {"good": xva, "noise": torch.randn_like(xva)}, yva,
                    grid(["good", "noise"], [0.01, 0.3], [0.0]), 5, 30, 128)
    assert s.variants[s.best].feature == "good"
    assert float(s.val_accuracy[s.best]) > 0.8
    assert float(s.val_accuracy[[i for i, v in enumerate(s.variants) if v.feature == "noise"]].max()) < 0.45


def test_fit_select_sweeps_each_feature_width_and_selects_across_them() -> None:
    """Variants of different widths (mean: D, meanmax: 2D) are swept apart, and the one best on
    validation wins across the sweeps, whichever width it has; test predictions come from that one."""
    from mmssl.eval.feature_cache import FeatureSet
    from mmssl.eval.linear_probe import fit_select

    x, y, xh, yh = _blobs(1200, 8, 4, 5)  # 1,200 train items, 600 held out
    splits = [(x[:600], y[:600]), (xh[:300], yh[:300]), (xh[300:], yh[300:])]  # train, val, test: disjoint
    g = torch.Generator().manual_seed(1)
    ecfg = {"solver": "sgd", "lrs": [0.1], "wds": [0.0], "epochs": 20, "batch_size": 128}

    def run(signal_in: str, keys: list[str]) -> dict:
        sets = []
        for xs, ys in splits:
            noise = torch.randn(len(ys), 8, generator=g)
            narrow, wide = (xs, torch.cat([noise, noise], 1)) if signal_in == "mean" else (noise, torch.cat([noise, xs], 1))
            sets.append(FeatureSet({"-1:mean": narrow, "-1:meanmax": wide}, ys, torch.arange(len(ys)), {}))
        return fit_select(keys, *sets, idx=torch.arange(600), ecfg=ecfg, num_classes=4, device=torch.device("cpu"), seed=0)

    for where in ("meanmax", "mean"):  # the winner is the last sweep, then the first
        r = run(where, ["-1:mean", "-1:meanmax"])
        assert r["variant"].startswith(f"-1:{where}|")
        assert float(r["correct"].mean()) > 0.6 and r["val_accuracy"] > 0.6
    assert float(run("meanmax", ["-1:mean"])["correct"].mean()) < 0.4  # noise alone: near chance (0.25)


# -- the feature cache --------------------------------------------------------------------------------
def test_feature_cache_reads_back_and_keys_on_weights(tmp_path: Path, cache_dir: Path) -> None:
    from mmssl.config import compose, to_dict
    from mmssl.data.loader import resolve_source
    from mmssl.eval.feature_cache import encoder_features, weights_hash
    from mmssl.factory import build_encoder, encoder_config

    cfg = compose(["modality=image", "data=digits"])
    src = resolve_source(to_dict(cfg.data), ["image"], None, cache_dir)
    torch.manual_seed(0)
    enc = build_encoder(encoder_config("image", "micro", to_dict(cfg.modality.image),
                                       {"depth": 2, "dim": 32, "heads": 2, "ffn_dim": 64}))
    kw = dict(layers=(-1, 0), pools=("mean", "cls"), max_len=32, baseline=True, cache_root=tmp_path)
    a = encoder_features(enc, src, "val", torch.device("cpu"), 64, **kw)
    assert set(a.feats) == {"-1:mean", "-1:cls", "0:mean", "baseline"}  # no CLS feature of an inner block
    mx = encoder_features(enc, src, "val", torch.device("cpu"), 64, layers=(0,), pools=("max",), max_len=32,
                          cache_root=tmp_path).feats["0:max"]  # read from the same cache entry
    assert mx.shape == (197, 32) and bool((mx >= a.feats["0:mean"] - 1e-5).all())  # a max is never below the mean
    mm = encoder_features(enc, src, "val", torch.device("cpu"), 64, layers=(0,), pools=("meanmax",), max_len=32,
                          cache_root=tmp_path).feats["0:meanmax"]  # built from the cached mean and max
    assert torch.equal(mm, torch.cat([a.feats["0:mean"], mx], 1))
    direct = encoder_features(enc, src, "val", torch.device("cpu"), 64, layers=(0,), pools=("meanmax",), max_len=32)
    torch.testing.assert_close(direct.feats["0:meanmax"], mm)  # and the same without a cache
    assert a.feats["-1:cls"].shape == (197, 32) and a.labels.shape == (197,)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    files[0].touch()
    b = encoder_features(enc, src, "val", torch.device("cpu"), 64, **kw)  # read back
    for k in a.feats:
        assert torch.equal(a.feats[k], b.feats[k])
    assert torch.equal(a.ids, b.ids)
    # the same features as the encoder's own pooled embedding
    enc.eval()
    ref = torch.cat([enc.embed({k: v for k, v in bt.items()}) for bt in
                     __import__("mmssl.data.loader", fromlist=["iter_split"]).iter_split(src, "val", 64, max_len=32)])
    torch.testing.assert_close(a.feats["-1:cls"], ref)
    with torch.no_grad():
        enc.backbone.norm.weight.mul_(2.0)
    encoder_features(enc, src, "val", torch.device("cpu"), 64, **kw)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # other weights, another entry
    torch.manual_seed(0)  # the same weights under another architecture (1 head instead of 2)
    other = build_encoder(encoder_config("image", "micro", to_dict(cfg.modality.image),
                                         {"depth": 2, "dim": 32, "heads": 1, "ffn_dim": 64}))
    with torch.no_grad():
        other.backbone.norm.weight.mul_(2.0)
    assert weights_hash(other) == weights_hash(enc)
    c = encoder_features(other, src, "val", torch.device("cpu"), 64, **kw)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert not torch.equal(c.feats["-1:mean"], encoder_features(enc, src, "val", torch.device("cpu"), 64, **kw).feats["-1:mean"])
    with pytest.raises(ValueError, match="layer must be"):
        encoder_features(enc, src, "val", torch.device("cpu"), 64, layers=(5,))


# -- the command --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    from mmssl.cli import main

    run = tmp_path_factory.mktemp("img") / "run"
    assert main(["pretrain", "modality=image", "objective=mae", "data=digits", f"run_dir={run}",
                 "trainer.max_steps=2", "trainer.batch_size=16", "trainer.num_workers=0", "trainer.progress=false",
                 "trainer.tensorboard=false", "model.depth=2", "model.dim=32", "model.heads=2",
                 "model.ffn_dim=64"]) == 0
    return run


def test_linear_probe_fractions_seeds_and_schema(image_run: Path, tmp_path: Path) -> None:
    from mmssl.cli import main

    out = tmp_path / "lp"
    assert main(["eval", "linear-probe", f"encoder={image_run}", f"out={out}", "data=digits",
                 "eval.label_fraction=[0.1,1.0]", "eval.seeds=2", "eval.epochs=20", "eval.layers=[-1,0]",
                 "eval.pools=[cls,mean]"]) == 0
    r = json.loads((out / "linear_probe.json").read_text())
    assert r["evaluator"] == "linear_probe" and r["seeds"] == 2
    assert [e["label_fraction"] for e in r["label_fractions"]] == [0.1, 1.0]
    assert r["label_fractions"][0]["n_train"] == 100 and r["n_train"] == 1000
    for p in ("", "random_init_", "features_baseline_"):
        assert len(r[f"{p}accuracy_per_seed"]) == 2
        lo, hi = r[f"{p}accuracy_ci95"]
        assert 0 <= lo <= r[f"{p}accuracy"] <= hi <= 1
        assert r[f"{p}accuracy"] == pytest.approx(np.mean(r[f"{p}accuracy_per_seed"]))
    # a step-0 encoder of a 2-step run is a random one: both well above chance on digits (10 classes)
    assert r["accuracy"] > 0.3 and r["random_init_source"] == "step0"
    assert all(v.split("|")[0] in ("-1:cls", "-1:mean", "0:mean") for v in r["variant"])
    assert (out / "linear_probe.png").stat().st_size > 1000
    lb = tmp_path / "lb"
    assert main(["eval", "linear-probe", f"encoder={image_run}", f"out={lb}", "data=digits", "eval.solver=lbfgs",
                 "eval.baseline=false"]) == 0
    r2 = json.loads((lb / "linear_probe.json").read_text())
    assert r2["solver"] == "lbfgs" and "|C=" in r2["variant"][0] and "features_baseline_accuracy" not in r2
    # the L-BFGS and SGD protocols agree to a few points on the same cached features
    assert abs(r2["accuracy"] - r["label_fractions"][1]["accuracy"]) < 0.08


def test_default_out_is_the_run_eval_folder(image_run: Path) -> None:
    """encoder= an export inside a run writes into RUN/eval, not into RUN/encoders/<m>/ (replaced by
    the next export); the step-0 baseline is found from there too."""
    from mmssl.cli import main

    assert main(["eval", "knn", f"encoder={image_run / 'encoders' / 'image'}", "data=digits"]) == 0
    r = json.loads((image_run / "eval" / "knn.json").read_text())
    assert r["random_init_source"] == "step0"
    assert not (image_run / "encoders" / "image" / "eval").exists()


def test_eval_refuses_a_changed_preprocessing(image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmssl.cli import main

    base = ["eval", "linear-probe", f"encoder={image_run}", f"out={tmp_path}", "data=digits"]
    assert main(base + ["modality.image.adapter.mean=[0.5,0.5,0.5]"]) == 2
    err = capsys.readouterr().err
    assert "modality.image.adapter.mean" in err and "0.485" in err and "config.json" in err
    assert main(base + ["modality.image.max_len=64"]) == 2
    assert "max_len" in capsys.readouterr().err
    assert main(base + ["model.dim=64"]) == 2
    assert "describes the encoder" in capsys.readouterr().err
    assert not (tmp_path / "linear_probe.json").exists()


def test_probe_sweep_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "ps.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_sweep.py"), "--device", "cpu", "--smoke",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    # both sides train the same probes: the same validation accuracy per variant
    assert r["max_val_acc_diff"] < 1e-3
    assert r["sides"]["mmssl"]["seconds"] > 0 and r["ratio_ref_over_mmssl"] > 0
    assert "| mmssl |" in proc.stdout


def test_probe_variants_are_reported(image_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter's probe_variants (e.g. one MRI contrast alone) each get a probe of their own, on the items
    each keeps: here 'even' keeps the even sample ids, 'dark' blanks every image."""
    from mmssl.cli import main
    from mmssl.modalities.image.adapter import ImageAdapter

    def variants(self: ImageAdapter) -> dict:
        return {"even": lambda b: (b, b["sample_id"] % 2 == 0),
                "dark": lambda b: ({**b, "image": torch.zeros_like(b["image"])}, torch.ones_like(b["sample_id"]).bool())}

    monkeypatch.setattr(ImageAdapter, "probe_variants", variants)
    out = tmp_path / "lpv"
    assert main(["eval", "linear-probe", f"encoder={image_run}", f"out={out}", "data=digits", "eval.epochs=20",
                 "eval.baseline=false"]) == 0
    v = json.loads((out / "linear_probe.json").read_text())["variants"]
    assert v["even"]["n_train"] == 500 and v["even"]["n_test"] == 300 and v["dark"]["n_test"] == 600
    assert v["even"]["accuracy"] > 0.3 and 0 <= v["even"]["random_init_accuracy"] <= 1
    # blank images carry no information: the probe can do no better than the majority class
    assert v["dark"]["accuracy"] < 0.2


def test_probe_pools_default_to_the_modality_s_and_yield_to_eval_pools() -> None:
    from mmssl.config import probe_pool_defaults
    from mmssl.config import compose, to_dict

    def ecfg(evaluator: str, *over: str) -> dict:
        return to_dict(compose([f"eval={evaluator}", *over]).eval)

    mri = to_dict(compose(["modality=mri"]).modality.mri)
    assert mri["probe_pools"] == ["meanmax"]
    assert probe_pool_defaults(ecfg("linear_probe"), mri)["pools"] == ["meanmax"]
    assert probe_pool_defaults(ecfg("linear_probe", "eval.pools=[mean]"), mri)["pools"] == ["mean"]
    assert "pools" not in probe_pool_defaults(ecfg("knn"), mri)  # an evaluator of one pooling keeps its own
    image = to_dict(compose(["modality=image"]).modality.image)
    assert probe_pool_defaults(ecfg("linear_probe"), image)["pools"] is None  # the encoder's own pool
