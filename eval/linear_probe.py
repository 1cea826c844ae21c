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

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mmssl.data.loader import DataSource
from mmssl.encoder import Encoder
from mmssl.eval.feature_cache import FeatureSet, cache_root_for, encoder_features, feature_key
from mmssl.eval.features import init_encoder, input_size
from mmssl.eval.probe_fit import linear_probe
from mmssl.eval.probe_sweep import grid, train_sweep
from mmssl.eval.results import header, write_result
from mmssl.eval.stats import fractions_and_seeds, label_subset, summarise
from mmssl.export import load_encoder

Splits = tuple[FeatureSet, FeatureSet, FeatureSet]


def probe_layers_pools(enc: Encoder, ecfg: dict[str, Any]) -> tuple[list[int], list[str]]:
    layers = ecfg.get("layers")
    layers = [int(ecfg.get("layer", -1))] if layers in (None, []) else [int(x) for x in layers]
    for layer in layers:
        if not -1 <= layer < enc.depth:
            raise ValueError(f"eval.layer(s) must be -1 (final output) or 0..{enc.depth - 1}, got {layer}")
    pools = ecfg.get("pools")
    pools = [enc.pool] if pools in (None, []) else [str(p) for p in pools]
    return layers, pools


def fit_select(keys: list[str], tr: FeatureSet, va: FeatureSet, te: FeatureSet, idx: torch.Tensor,
               ecfg: dict[str, Any], num_classes: int, device: torch.device, seed: int) -> dict[str, Any]:
    """Train every variant on the train items ``idx``, pick one on validation -> its test correctness."""
    xtr = {k: tr.feats[k][idx] for k in keys}
    ytr = tr.labels[idx]
    if ecfg.get("solver", "sgd") == "lbfgs":
        best = None
        for k in keys:
            r = linear_probe(xtr[k], ytr, va.feats[k], va.labels, te.feats[k], te.labels, list(ecfg["C"]),
                             int(ecfg.get("max_iter", 300)), device)
            if best is None or r.val_accuracy > best[1].val_accuracy:
                best = (k, r)
        assert best is not None
        k, r = best
        return {"correct": r.test_correct, "val_accuracy": r.val_accuracy, "variant": f"{k}|C={r.C:g}"}
    if ecfg.get("solver", "sgd") != "sgd":
        raise ValueError(f"eval.solver must be 'sgd' or 'lbfgs', not {ecfg.get('solver')!r}")
    best = None
    for width in sorted({xtr[k].shape[1] for k in keys}):  # one sweep per feature width (meanmax is 2D)
        ks = [k for k in keys if xtr[k].shape[1] == width]
        s = train_sweep({k: xtr[k] for k in ks}, ytr, {k: va.feats[k] for k in ks}, va.labels,
                        grid(ks, list(ecfg["lrs"]), list(ecfg["wds"])), num_classes,
                        int(ecfg.get("epochs", 100)), int(ecfg.get("batch_size", 256)), device, seed)
        if best is None or s.val_accuracy[s.best] > best.val_accuracy[best.best]:  # ties: the narrower
            best = s
    assert best is not None
    pred = best.predict({k: te.feats[k] for k in keys}).cpu()
    return {"correct": (pred == te.labels).float(), "val_accuracy": float(best.val_accuracy[best.best]),
            "variant": best.variants[best.best].name()}


def probe_variants(enc: Encoder, init: Encoder, source: DataSource, splits: list[str], ecfg: dict[str, Any],
                   layers: list[int], pools: list[str], size: int | None, root: Path | None, device: torch.device,
                   batch_size: int, num_classes: int, seeds: list[int]) -> dict[str, dict[str, Any]]:
    """The probe again on each of the adapter's ``probe_variants`` (all labels, the same seeds and
    variant selection on validation): name -> accuracy and its random-init twin."""
    out: dict[str, dict[str, Any]] = {}
    for name, transform in enc.adapter.probe_variants().items():
        def feats(e: Encoder, variant: tuple[str, Any] = (name, transform)) -> Splits:
            return tuple(encoder_features(e, source, s, device, batch_size, layers, pools, size, False, root,
                                          variant=variant) for s in splits)  # type: ignore[return-value]

        trained, rand = feats(enc), feats(init)
        keys = [k for k in (feature_key(layer, p) for layer in layers for p in pools) if k in trained[0].feats]
        idx = torch.arange(len(trained[0].labels))
        entry: dict[str, Any] = {"n_train": len(idx), "n_val": len(trained[1].labels), "n_test": len(trained[2].labels)}
        for prefix, fs in (("", trained), ("random_init_", rand)):
            runs = [fit_select(keys, *fs, idx=idx, ecfg=ecfg, num_classes=num_classes, device=device, seed=seed)
                    for seed in seeds]
            entry.update(summarise([r["correct"] for r in runs], prefix=prefix))
        out[name] = entry
        print(f"linear probe variant {name!r}: trained {entry['accuracy']:.3f} | random init "
              f"{entry['random_init_accuracy']:.3f} | {entry['n_test']} test items", flush=True)
    return out


def run_linear_probe(encoder_path: str | Path, out: str | Path, source: DataSource, ecfg: dict[str, Any],
                     device: torch.device, batch_size: int = 32, cache_dir: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    enc = load_encoder(encoder_path, device=device)
    layers, pools = probe_layers_pools(enc, ecfg)
    init, init_source = init_encoder(Path(encoder_path), enc)
    init = init.to(device)
    size = input_size(enc)
    root = cache_root_for(cache_dir, bool(ecfg.get("cache_features", True)))
    splits = [ecfg["split_train"], ecfg["split_val"], ecfg["split_test"]]
    with_base = bool(ecfg.get("baseline", True))

    def feats(e: Encoder, base: bool) -> Splits:
        return tuple(encoder_features(e, source, s, device, batch_size, layers, pools, size, base, root)
                     for s in splits)  # type: ignore[return-value]

    trained, rand = feats(enc, with_base), feats(init, False)
    tr = trained[0]
    if (tr.labels < 0).any():
        raise ValueError(f"{source.root} has unlabelled samples: a linear probe needs class labels")
    if tr.labels.dim() > 1:
        raise ValueError("the linear probe takes single-label data; use `mmssl eval finetune` for multi-label")
    num_classes = int(max(int(s.labels.max()) for s in trained)) + 1
    keys = [k for k in (feature_key(layer, p) for layer in layers for p in pools) if k in tr.feats]
    pool_train = torch.arange(len(tr.labels))
    if ecfg.get("max_train"):  # a seeded random subset: extraction order follows length
        pool_train = torch.randperm(len(tr.labels), generator=torch.Generator().manual_seed(0))[: int(ecfg["max_train"])]
    fractions, seeds = fractions_and_seeds(ecfg)
    sides = {"": (trained, keys), "random_init_": (rand, keys)}
    if with_base:
        sides["features_baseline_"] = (trained, ["baseline"])
    per_fraction = []
    for f in fractions:
        res: dict[str, list[dict[str, Any]]] = {p: [] for p in sides}
        for seed in seeds:
            idx = pool_train[label_subset(tr.labels[pool_train], f, seed)]
            for prefix, (fs, ks) in sides.items():
                res[prefix].append(fit_select(ks, *fs, idx=idx, ecfg=ecfg, num_classes=num_classes,
                                              device=device, seed=seed))
        entry: dict[str, Any] = {"label_fraction": f, "n_train": len(idx)}
        for prefix, runs in res.items():
            entry.update(summarise([r["correct"] for r in runs], prefix=prefix))
            entry[f"{prefix}val_accuracy"] = [r["val_accuracy"] for r in runs]
            entry[f"{prefix}variant"] = [r["variant"] for r in runs]
        per_fraction.append(entry)
    top = max(per_fraction, key=lambda e: e["label_fraction"])
    head = {k: v for k, v in top.items() if k not in ("label_fraction", "n_train")}
    result = {
        **header("linear_probe", enc, encoder_path, source, init_source),
        **head,
        "label_fractions": per_fraction,
        "seeds": len(seeds),
        "num_classes": num_classes,
        "n_train": top["n_train"], "n_val": len(trained[1].labels), "n_test": len(trained[2].labels),
        "layer": layers[0] if len(layers) == 1 else layers, "layers": layers, "pools": pools,
        "pool": pools[0] if len(pools) == 1 else "|".join(pools),  # what the probe read (report.py shows it)
        "encoder_pool": enc.pool,
        "solver": ecfg.get("solver", "sgd"),
        "features_baseline": type(enc.adapter).baseline_features.__doc__.strip().splitlines()[0]
        if type(enc.adapter).baseline_features.__doc__ else "baseline_features",
        "skipped_samples": dict(sum((Counter(s.skipped) for s in trained), Counter())),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    variants = probe_variants(enc, init, source, splits, ecfg, layers, pools, size, root, device, batch_size,
                              num_classes, seeds)
    if variants:
        result["variants"] = variants
        result["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_result(out, "linear_probe", result, plot_probe)
    ci = result["accuracy_ci95"]
    print(f"linear probe ({enc.adapter.name}, layers {layers}, {result['solver']}): trained {result['accuracy']:.3f} "
          f"[{ci[0]:.3f}, {ci[1]:.3f}] | random init {result['random_init_accuracy']:.3f} | classical features "
          f"{result.get('features_baseline_accuracy', float('nan')):.3f} | {result['n_test']} test items, "
          f"{num_classes} classes -> {path}", file=sys.stdout, flush=True)
    return result


def plot_probe(r: dict[str, Any], path: Path) -> None:
    """Bars with 95% intervals per label fraction: trained, random init, classical features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [("", "trained", "tab:blue"), ("random_init_", "random init", "tab:gray"),
             ("features_baseline_", "classical features", "tab:orange")]
    sides = [s for s in sides if f"{s[0]}accuracy" in r]
    fr = r["label_fractions"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(fr), 3.4))
    w = 0.8 / len(sides)
    for j, (prefix, label, colour) in enumerate(sides):
        xs = [i + (j - (len(sides) - 1) / 2) * w for i in range(len(fr))]
        vals = [e[f"{prefix}accuracy"] for e in fr]
        err = [[v - e[f"{prefix}accuracy_ci95"][0] for v, e in zip(vals, fr)],
               [e[f"{prefix}accuracy_ci95"][1] - v for v, e in zip(vals, fr)]]
        ax.bar(xs, vals, w, yerr=err, capsize=3, color=colour, label=label)
        for x, v in zip(xs, vals):
            ax.text(x, v + 0.03, f"{v:.3f}", ha="center", fontsize=7)
    ax.axhline(1.0 / max(r["num_classes"], 1), color="k", lw=0.8, ls="--", label="chance")
    ax.set_xticks(range(len(fr)), [f"{e['label_fraction']:g} of labels\n(n={e['n_train']})" for e in fr])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy (95% CI)")
    ax.set_title(f"linear probe, {r['modality']}, layers {r['layers']}, {r['seeds']} seed(s)", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
