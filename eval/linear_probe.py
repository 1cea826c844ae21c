"""Linear probe: frozen encoder -> cached pooled features -> many linear probes at once -> the best on
validation -> test accuracy with its spread; beside it the same protocol on the run's step-0 weights
and on the adapter's classical features.

Features are extracted once per split (``eval.layers`` x ``eval.pools``, see ``feature_cache``) and
cached on disk; then, for every label fraction and seed, every variant is trained:
- ``eval.solver=sgd`` (default): DINOv2's protocol, (feature, learning rate, weight decay) variants
  trained together in one pass (``probe_sweep``), on the GPU when there is one;
- ``eval.solver=lbfgs``: scikit-learn's logistic-regression objective solved exactly for each C of
  ``eval.C`` (``probe_fit``), per feature.
The variant is chosen on ``split_val`` only. Reported: mean, standard deviation over seeds and a
bootstrap 95% interval over test items (``stats``)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mmssl.data.loader import DataSource
from mmssl.encoder import Encoder
from mmssl.eval.feature_cache import FeatureSet, encoder_features, feature_key
from mmssl.eval.features import baseline_name, init_encoder  # noqa: F401  (init_encoder: test_end_to_end)
from mmssl.eval.probe_fit import linear_probe
from mmssl.eval.probe_sweep import grid, train_sweep
from mmssl.eval.protocol import RANDOM_INIT, EncoderEval, figure, fraction_bars, top_fraction
from mmssl.eval.stats import summarise

Splits = tuple[FeatureSet, FeatureSet, FeatureSet]


def probe_layers_pools(enc: Encoder, ecfg: dict[str, Any]) -> tuple[list[int], list[str]]:
    layers = ecfg["layers"]
    layers = [int(ecfg["layer"])] if layers in (None, []) else [int(x) for x in layers]
    for layer in layers:
        if not -1 <= layer < enc.depth:
            raise ValueError(f"eval.layer(s) must be -1 (final output) or 0..{enc.depth - 1}, got {layer}")
    pools = ecfg["pools"]
    pools = [enc.pool] if pools in (None, []) else [str(p) for p in pools]
    return layers, pools


def fit_select(keys: list[str], tr: FeatureSet, va: FeatureSet, te: FeatureSet, idx: torch.Tensor,
               ecfg: dict[str, Any], num_classes: int, device: torch.device, seed: int) -> dict[str, Any]:
    """Train every variant on the train items ``idx``, pick one on validation -> its test correctness."""
    xtr = {k: tr.feats[k][idx] for k in keys}
    ytr = tr.labels[idx]
    if ecfg["solver"] == "lbfgs":
        best = None
        for k in keys:
            r = linear_probe(xtr[k], ytr, va.feats[k], va.labels, te.feats[k], te.labels, list(ecfg["C"]),
                             int(ecfg["max_iter"]), device)
            if best is None or r.val_accuracy > best[1].val_accuracy:
                best = (k, r)
        assert best is not None
        k, r = best
        return {"correct": r.test_correct, "val_accuracy": r.val_accuracy, "variant": f"{k}|C={r.C:g}"}
    if ecfg["solver"] != "sgd":
        raise ValueError(f"eval.solver must be 'sgd' or 'lbfgs', not {ecfg['solver']!r}")
    best = None
    for width in sorted({xtr[k].shape[1] for k in keys}):  # one sweep per feature width (meanmax is 2D)
        ks = [k for k in keys if xtr[k].shape[1] == width]
        s = train_sweep({k: xtr[k] for k in ks}, ytr, {k: va.feats[k] for k in ks}, va.labels,
                        grid(ks, list(ecfg["lrs"]), list(ecfg["wds"])), num_classes,
                        int(ecfg["epochs"]), int(ecfg["batch_size"]), device, seed)
        if best is None or s.val_accuracy[s.best] > best.val_accuracy[best.best]:  # ties: the narrower
            best = s
    assert best is not None
    pred = best.predict({k: te.feats[k] for k in keys}).cpu()
    return {"correct": (pred == te.labels).float(), "val_accuracy": float(best.val_accuracy[best.best]),
            "variant": best.variants[best.best].name()}


def probe_variants(ev: EncoderEval, splits: list[str], layers: list[int], pools: list[str], root: Path | None,
                   batch_size: int, num_classes: int) -> dict[str, dict[str, Any]]:
    """The probe again on each of the adapter's ``probe_variants`` (all labels, the same seeds and
    variant selection on validation): name -> accuracy and its random-init twin."""
    out: dict[str, dict[str, Any]] = {}
    for name, transform in ev.encoder.adapter.probe_variants().items():
        def feats(e: Encoder, variant: tuple[str, Any] = (name, transform)) -> Splits:
            return tuple(encoder_features(e, ev.source, s, ev.device, batch_size, layers, pools, ev.input_size,
                                          False, root, variant=variant) for s in splits)  # type: ignore[return-value]

        sides = {prefix: feats(e) for prefix, e in ev.twins.items()}
        trained = sides[""]
        keys = [k for k in (feature_key(layer, p) for layer in layers for p in pools) if k in trained[0].feats]
        idx = torch.arange(len(trained[0].labels))
        entry: dict[str, Any] = {"n_train": len(idx), "n_val": len(trained[1].labels), "n_test": len(trained[2].labels)}
        for prefix, fs in sides.items():
            runs = [fit_select(keys, *fs, idx=idx, ecfg=ev.ecfg, num_classes=num_classes, device=ev.device, seed=seed)
                    for seed in ev.seeds]
            entry.update(summarise([r["correct"] for r in runs], prefix=prefix))
        out[name] = entry
        print(f"linear probe variant {name!r}: trained {entry['accuracy']:.3f} | random init "
              f"{entry['random_init_accuracy']:.3f} | {entry['n_test']} test items", flush=True)
    return out


def run_linear_probe(encoder_path: str | Path, out: str | Path, source: DataSource, ecfg: dict[str, Any],
                     device: torch.device, batch_size: int = 32, cache_dir: Path | None = None) -> dict[str, Any]:
    """The linear probe of an encoder, its random-init twin and the adapter's classical features (see
    the module doc) -> the result, also written to ``out/linear_probe.json`` and ``.png``."""
    ev = EncoderEval("linear_probe", encoder_path, source, ecfg, device)
    enc, cfg = ev.encoder, ev.ecfg
    layers, pools = probe_layers_pools(enc, cfg)
    root = ev.cache_root(cache_dir)
    splits = [cfg["split_train"], cfg["split_val"], cfg["split_test"]]
    with_base = bool(cfg["baseline"])

    def feats(e: Encoder, base: bool) -> Splits:
        return tuple(encoder_features(e, source, s, device, batch_size, layers, pools, ev.input_size, base, root)
                     for s in splits)  # type: ignore[return-value]

    trained, rand = feats(enc, with_base), feats(ev.init, False)
    tr = trained[0]
    if (tr.labels < 0).any():
        raise ValueError(f"{source.root} has unlabelled samples: a linear probe needs class labels")
    if tr.labels.dim() > 1:
        raise ValueError("the linear probe takes single-label data; use `mmssl eval finetune` for multi-label")
    num_classes = int(max(int(s.labels.max()) for s in trained)) + 1
    keys = [k for k in (feature_key(layer, p) for layer in layers for p in pools) if k in tr.feats]
    pool_train = ev.train_pool(len(tr.labels))
    sides = {"": (trained, keys), RANDOM_INIT: (rand, keys)}
    if with_base:
        sides["features_baseline_"] = (trained, ["baseline"])
    per_fraction = []
    for f, subsets in ev.subsets(tr.labels[pool_train]):
        res: dict[str, list[dict[str, Any]]] = {p: [] for p in sides}
        for seed, sub in subsets:
            idx = pool_train[sub]
            for prefix, (fs, ks) in sides.items():
                res[prefix].append(fit_select(ks, *fs, idx=idx, ecfg=cfg, num_classes=num_classes,
                                              device=device, seed=seed))
        entry: dict[str, Any] = {"label_fraction": f, "n_train": len(idx)}
        for prefix, runs in res.items():
            entry.update(summarise([r["correct"] for r in runs], prefix=prefix))
            entry[f"{prefix}val_accuracy"] = [r["val_accuracy"] for r in runs]
            entry[f"{prefix}variant"] = [r["variant"] for r in runs]
        per_fraction.append(entry)
    top = top_fraction(per_fraction)
    result = ev.result(
        per_fraction, tuple(sides),
        **{f"{p}{k}": top[f"{p}{k}"] for p in sides for k in ("val_accuracy", "variant")},
        num_classes=num_classes,
        n_train=top["n_train"], n_val=len(trained[1].labels), n_test=len(trained[2].labels),
        layer=layers[0] if len(layers) == 1 else layers, layers=layers, pools=pools,
        pool=pools[0] if len(pools) == 1 else "|".join(pools),  # what the probe read (report.py shows it)
        encoder_pool=enc.pool,
        solver=cfg["solver"],
        features_baseline=baseline_name(enc),
        skipped_samples=dict(sum((Counter(s.skipped) for s in trained), Counter())),
    )
    variants = probe_variants(ev, splits, layers, pools, root, batch_size, num_classes)
    if variants:
        result["variants"] = variants
    path = ev.write(out, result, plot_probe)
    ev.print_summary(f"linear probe ({enc.adapter.name}, layers {layers}, {result['solver']})", result, path)
    return result


def plot_probe(r: dict[str, Any], path: Path) -> None:
    """Bars with 95% intervals per label fraction: trained, random init, classical features."""
    prefixes = [p for p in ("", RANDOM_INIT, "features_baseline_") if f"{p}accuracy" in r]
    with figure(path, figsize=(1.8 + 1.6 * len(r["label_fractions"]), 3.4)) as ax:
        fraction_bars(ax, r, prefixes)
        ax.set_ylabel("test accuracy (95% CI)")
        ax.set_title(f"linear probe, {r['modality']}, layers {r['layers']}, {r['seeds']} seed(s)", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
