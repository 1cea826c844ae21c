"""k-NN classification of frozen features, as DINO's ``eval_knn.py`` does it (Caron et al., 2021).

Features are L2-normalised; each query's k most cosine-similar items of the labelled bank vote for
their class with weight ``exp(similarity / T)``; the class with the largest summed vote wins (k=20,
T=0.07 by default). Nothing is trained, so the protocol has no hyper-parameters to overfit beyond k,
which is fixed (DINO) or, when ``eval.k`` is a list, chosen on ``split_val`` per bank.

``run_knn`` writes ``out/knn.json`` in the common result schema (eval/stats.py: mean, std over seeds
and a bootstrap 95% interval for every accuracy) for the trained encoder, its random-init baseline and
the adapter's classical features, at each label fraction of the bank (``eval.label_fraction``; seeds
matter only below 1.0, since the full bank is the same for every seed), plus ``out/knn.png``.

Before L2 normalisation, learned features get ``eval.preprocess``: ``none`` (DINO, the default),
``center`` or ``zscore`` with the bank's statistics; classical features are always z-scored (they mix
units, e.g. MFCC energy beside cepstral shape).

Evaluator-specific keys: ``k`` (the k asked: a number or the list tried), ``T``, ``layer``, ``pool``,
``preprocess``, ``features_baseline`` (what the classical features are) and ``features_baseline_*``
(summarise() of them), and per label fraction ``chosen_k`` / ``random_init_chosen_k`` /
``features_baseline_chosen_k`` (the k used, per seed) and ``val_curve`` (trained encoder, when k is a
list: k -> validation accuracy, averaged over seeds)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmssl.data.loader import DataSource
from mmssl.eval.feature_cache import encoder_features, feature_key
from mmssl.eval.features import baseline_name, input_size
from mmssl.eval.probe_fit import standardise
from mmssl.eval.protocol import RANDOM_INIT, EncoderEval, figure, fraction_bars
from mmssl.eval.stats import summarise

# Queries per chunk are chosen so the [chunk, n] similarity matrix stays near this many elements.
_SIM_ELEMENTS = 1 << 24


def knn_votes(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, ks: Sequence[int],
              T: float, num_classes: int, chunk: int | None = None) -> dict[int, torch.Tensor]:
    """Temperature-weighted k-NN votes for several k from one neighbour search.

    train_feats: [n, D], train_labels: [n] int64 in [0, num_classes), query: [m, D] ->
    {k: scores [m, C]} where scores[i, c] = sum over the k nearest bank items j of class c of
    exp(cos(query_i, bank_j) / T). k larger than n uses the whole bank. Computed in chunks of
    ``chunk`` queries on the device of ``train_feats``."""
    if train_labels.dim() != 1:
        raise ValueError("k-NN here classifies single-label data: labels must be [n] class indices")
    if T <= 0:
        raise ValueError(f"k-NN temperature must be positive, got {T}")
    dev = train_feats.device
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(dev).long()
    n, m = bank.shape[0], query.shape[0]
    kmax = min(max(int(k) for k in ks), n)
    step = chunk or max(1, min(m, _SIM_ELEMENTS // max(n, 1)))
    out = {int(k): torch.zeros(m, num_classes, device=dev) for k in ks}
    for i in range(0, m, step):
        q = F.normalize(query[i:i + step].to(dev).float(), dim=1)
        sim, idx = (q @ bank.T).topk(kmax, dim=1, largest=True, sorted=True)  # [c, kmax], best first
        weight, nb = (sim / T).exp(), labels[idx]  # [c, kmax] each
        for k, votes in out.items():
            kk = min(k, n)  # neighbours are sorted, so the k nearest are the first k columns
            votes[i:i + step].scatter_add_(1, nb[:, :kk], weight[:, :kk])
    return out


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, k: int = 20,
                 T: float = 0.07, num_classes: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """train_feats [n, D], train_labels [n], query [m, D] -> vote scores [m, C] (argmax = prediction).
    ``num_classes`` defaults to the largest bank label + 1."""
    C = int(num_classes) if num_classes is not None else int(train_labels.max()) + 1
    return knn_votes(train_feats, train_labels, query, [k], T, C, chunk)[int(k)]


# -- the evaluator --------------------------------------------------------------------------------------
PREPROCESS = ("none", "center", "zscore")


def preprocess(bank: torch.Tensor, *others: torch.Tensor, how: str = "none") -> list[torch.Tensor]:
    """Before L2 normalisation: ``none`` (DINO), ``center`` (subtract the bank's mean) or ``zscore``
    (and divide by the bank's standard deviation). [n, D], [m, D]... -> the same shapes."""
    if how not in PREPROCESS:
        raise ValueError(f"eval.preprocess must be one of {', '.join(PREPROCESS)}, not {how!r}")
    if how == "none":
        return [bank, *others]
    if how == "zscore":
        return standardise(bank, *others)  # the linear probe's z-score, with the bank's statistics
    mean = bank.mean(0)
    return [x - mean for x in (bank, *others)]


def _score(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], bank_idx: torch.Tensor,
           ks: list[int], T: float, C: int, device: torch.device, how: str) -> dict[str, Any]:
    """One bank (train items ``bank_idx``): k chosen on val when there are several -> per-item test
    correctness at that k, the val curve and the chosen k."""
    xtr, xva, xte = preprocess(feats["train"][bank_idx], feats["val"], feats["test"], how=how)
    xtr, ytr = xtr.to(device), labels["train"][bank_idx].to(device)
    curve: dict[int, float] = {}
    k = ks[0]
    if len(ks) > 1:
        votes = knn_votes(xtr, ytr, xva, ks, T, C)
        yva = labels["val"].to(device)
        curve = {kk: float((v.argmax(1) == yva).float().mean()) for kk, v in votes.items()}
        k = max(ks, key=lambda kk: (curve[kk], -kk))  # ties: the smaller k
    test = knn_votes(xtr, ytr, xte, [k], T, C)[k]
    correct = (test.argmax(1) == labels["test"].to(device)).cpu()
    return {"correct": correct, "k": k, "curve": curve}


def _features(enc: Any, source: DataSource, splits: dict[str, str], key: str, device: torch.device, bs: int,
              layer: int, pool: str, baseline: bool, cache: Path | None, bad: Counter
              ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """-> ({"encoder"|"baseline": {role: [n, D]}}, {role: labels [n]}) for roles train/val/test."""
    out: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "baseline": {}}
    labels: dict[str, torch.Tensor] = {}
    for role, split in splits.items():
        fs = encoder_features(enc, source, split, device, bs, layers=(layer,), pools=(pool,),
                              max_len=input_size(enc), baseline=baseline, cache_root=cache)
        bad.update(fs.skipped)
        out["encoder"][role] = fs.feats[key]
        if baseline:
            out["baseline"][role] = fs.feats["baseline"]
        labels[role] = fs.labels
    return out, labels


def run_knn(encoder_path: str | Path, out: str | Path, source: DataSource, ecfg: dict[str, Any],
            device: torch.device, batch_size: int = 32, cache_dir: Path | None = None) -> dict[str, Any]:
    """The k-NN evaluation of one encoder (see module doc) -> the result dict, also written to
    ``out/knn.json`` and plotted in ``out/knn.png``."""
    ev = EncoderEval("knn", encoder_path, source, ecfg, device)
    enc, cfg = ev.encoder, ev.ecfg
    layer = int(cfg["layer"])
    pool = cfg["pool"] or enc.pool
    if pool == "cls" and layer != -1:
        pool = "mean"  # a CLS feature exists at the final output only
    key = feature_key(layer, pool)
    k_cfg = cfg["k"]
    ks = sorted({int(k) for k in (k_cfg if isinstance(k_cfg, (list, tuple)) else [k_cfg])})
    if ks[0] < 1:
        raise ValueError(f"eval.k must be at least 1, got {k_cfg}")
    T = float(cfg["T"])
    how = str(cfg["preprocess"])
    if how not in PREPROCESS:  # refused before anything is extracted
        raise ValueError(f"eval.preprocess must be one of {', '.join(PREPROCESS)}, not {how!r}")
    splits = {"train": cfg["split_train"], "val": cfg["split_val"], "test": cfg["split_test"]}
    cache = ev.cache_root(cache_dir)

    bad: Counter = Counter()
    feats, labels = _features(enc, source, splits, key, device, batch_size, layer, pool, True, cache, bad)
    rfeats, _ = _features(ev.init, source, splits, key, device, batch_size, layer, pool, False, cache, Counter())
    for role, y in labels.items():
        if y.dim() != 1 or (y < 0).any():
            raise ValueError(f"split {splits[role]!r} of {source.root} lacks single class labels: "
                             f"k-NN needs one class per item")
    keep = ev.train_pool(len(labels["train"]))
    labels["train"] = labels["train"][keep]
    for f in (feats["encoder"], feats["baseline"], rfeats["encoder"]):
        f["train"] = f["train"][keep]
    C = max(source.num_classes, *(int(y.max()) + 1 for y in labels.values()))

    sides = {"": (feats["encoder"], how), RANDOM_INIT: (rfeats["encoder"], how),
             "features_baseline_": (feats["baseline"], "zscore")}
    rows = []
    for frac, subsets in ev.subsets(labels["train"], sorted(ev.fractions)):
        row: dict[str, Any] = {"label_fraction": frac}
        # the whole bank is the same for every seed: score it once
        banks = [idx for _, idx in subsets][: len(subsets) if frac < 1.0 else 1]
        row["n_train"] = len(banks[0])
        for prefix, (fx, side_how) in sides.items():
            res = [_score(fx, labels, b, ks, T, C, device, side_how) for b in banks]
            correct = [r["correct"] for r in res] * (len(subsets) // len(res))
            row.update(summarise(correct, prefix=prefix))
            row[f"{prefix}chosen_k"] = [r["k"] for r in res] * (len(subsets) // len(res))
            if prefix == "" and len(ks) > 1:
                row["val_curve"] = {str(k): sum(r["curve"][k] for r in res) / len(res) for k in ks}
        rows.append(row)

    top = rows[-1]
    result = ev.result(
        rows, tuple(sides),
        n_train=len(labels["train"]), n_val=len(labels["val"]), n_test=len(labels["test"]),
        num_classes=C, skipped_samples=dict(bad),
        k=ks if isinstance(k_cfg, (list, tuple)) else ks[0], T=T, layer=layer, pool=pool, preprocess=how,
        features_baseline=baseline_name(enc),
    )
    path = ev.write(out, result, plot_knn)
    ev.print_summary(f"k-NN ({enc.adapter.name}, k={top['chosen_k'][0]}, T={T}, {key})", result, path)
    return result


def plot_knn(r: dict[str, Any], path: Path) -> None:
    """Bars per label fraction (trained, random init, classical features) with 95% interval whiskers."""
    with figure(path, figsize=(1.6 + 1.6 * len(r["label_fractions"]), 3.4)) as ax:
        fraction_bars(ax, r, ("", RANDOM_INIT, "features_baseline_"), digits=2)
        ax.set_ylabel("test accuracy")
        k = f"k on val from {r['k']}" if isinstance(r["k"], list) else f"k={r['k']}"
        ax.set_title(f"k-NN ({k}, T={r['T']:g}), {r['modality']}, layer {r['layer']}, {r['pool']} pool", fontsize=9)
        ax.legend(loc="upper left", fontsize=7, ncol=2)
