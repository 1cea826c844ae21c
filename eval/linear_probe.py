"""Linear probe: frozen encoder -> pooled features -> z-score -> logistic regression with C chosen on
validation -> test accuracy; beside it the same probe on the run's step-0 weights and on the adapter's
classical features."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mmssl.data.loader import DataSource
from mmssl.encoder import Encoder
from mmssl.eval.features import baseline_fn, encoder_fn, extract, input_size
from mmssl.eval.probe_fit import linear_probe
from mmssl.export import load_encoder
from mmssl.factory import build_encoder


def init_encoder(path: Path, trained: Encoder, seed: int = 0) -> tuple[Encoder, str]:
    """The random-init baseline: the run's own step-0 weights when the run kept them, else the same
    architecture freshly initialised with ``seed``."""
    try:
        return load_encoder(path, modality=trained.adapter.name, which="encoders_init"), "step0"
    except (FileNotFoundError, ValueError):
        torch.manual_seed(seed)
        return build_encoder(trained.config).eval(), f"fresh_init_seed{seed}"  # type: ignore[attr-defined]


def _probe(fn: Any, source: DataSource, ecfg: dict[str, Any], device: torch.device, bs: int,
           bad: Counter, max_len: int | None = None) -> dict[str, Any]:
    splits = [ecfg["split_train"], ecfg["split_val"], ecfg["split_test"]]
    (xtr, ytr, _), (xva, yva, _), (xte, yte, _) = (extract(fn, source, s, device, bs, bad, max_len) for s in splits)
    if ecfg.get("max_train"):  # a seeded random subset: extraction order follows length
        keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))[: int(ecfg["max_train"])]
        xtr, ytr = xtr[keep], ytr[keep]
    if (ytr < 0).any():
        raise ValueError(f"{source.root} has unlabelled samples: a linear probe needs class labels")
    r = linear_probe(xtr, ytr, xva, yva, xte, yte, list(ecfg["C"]), int(ecfg.get("max_iter", 300)), device)
    return {"accuracy": r.test_accuracy, "val_accuracy": r.val_accuracy, "C": r.C,
            "val_curve": {str(k): v for k, v in r.val_curve.items()},
            "n": (len(ytr), len(yva), len(yte)), "num_classes": int(max(ytr.max(), yva.max(), yte.max())) + 1}


def run_linear_probe(encoder_path: str | Path, out: str | Path, source: DataSource, ecfg: dict[str, Any],
                     device: torch.device, batch_size: int = 32) -> dict[str, Any]:
    t0 = time.perf_counter()
    enc = load_encoder(encoder_path, device=device)
    layer = int(ecfg.get("layer", -1))
    if not -1 <= layer < enc.depth:
        raise ValueError(f"eval.layer must be -1 (final output) or 0..{enc.depth - 1}, got {layer}")
    init, init_source = init_encoder(Path(encoder_path), enc)
    init = init.to(device)
    bad: Counter = Counter()
    size = input_size(enc)
    trained = _probe(encoder_fn(enc, layer), source, ecfg, device, batch_size, bad, size)
    rand = _probe(encoder_fn(init, layer), source, ecfg, device, batch_size, Counter(), size)
    base = _probe(baseline_fn(enc), source, ecfg, device, batch_size, Counter(), size)
    n_train, n_val, n_test = trained["n"]
    result = {
        "accuracy": trained["accuracy"],
        "random_init_accuracy": rand["accuracy"],
        "features_baseline_accuracy": base["accuracy"],
        "num_classes": trained["num_classes"],
        "n_train": n_train, "n_val": n_val, "n_test": n_test,
        "layer": layer,
        "pool": enc.pool,
        "val_accuracy": trained["val_accuracy"], "C": trained["C"],
        "random_init_val_accuracy": rand["val_accuracy"], "random_init_C": rand["C"],
        "features_baseline_val_accuracy": base["val_accuracy"], "features_baseline_C": base["C"],
        "random_init_source": init_source,
        "features_baseline": type(enc.adapter).baseline_features.__doc__.strip().splitlines()[0]
        if type(enc.adapter).baseline_features.__doc__ else "baseline_features",
        "encoder": str(getattr(enc, "source", encoder_path)),
        "modality": enc.adapter.name,
        "data": str(source.root),
        "skipped_samples": dict(bad),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_probe.json").write_text(json.dumps(result, indent=2))
    plot_probe(result, out / "linear_probe.png")
    print(f"linear probe ({enc.adapter.name}, layer {layer}): trained {result['accuracy']:.3f} | "
          f"random init {result['random_init_accuracy']:.3f} | classical features "
          f"{result['features_baseline_accuracy']:.3f} | {n_test} test items, {result['num_classes']} classes "
          f"-> {out / 'linear_probe.json'}", file=sys.stdout, flush=True)
    return result


def plot_probe(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["trained", "random init", "classical\nfeatures"]
    vals = [r["accuracy"], r["random_init_accuracy"], r["features_baseline_accuracy"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    bars = ax.bar(names, vals, color=["tab:blue", "tab:gray", "tab:orange"])
    ax.axhline(1.0 / max(r["num_classes"], 1), color="k", lw=0.8, ls="--", label="chance")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"linear probe, {r['modality']}, layer {r['layer']}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
