"""Layer-weighted probe (SUPERB style): a learned softmax-weighted sum of every hidden layer feeds a
linear classifier; the learned layer weights say where in the encoder the task's information lives.

s3prl's ``Featurizer`` keeps one logit per layer (initialised to zeros, so training starts from the
plain average), takes ``softmax(logits)`` as weights, optionally layer-normalises every hidden state,
and trains the weights together with the downstream model. Here the downstream model is a linear
classifier on mean-pooled features, and two details differ on purpose:

- Pooling comes before the weighted sum. Mean pooling is linear, so ``pool(sum_l w_l h_l) =
  sum_l w_l pool(h_l)`` exactly: the features of each block are extracted and cached once
  (``mmssl.eval.feature_cache``) and every probe variant, label fraction and seed trains on them.
- Each layer's pooled features are z-scored with the training items' statistics (``normalize``)
  instead of s3prl's per-frame layer norm (which is not linear and would not commute with pooling).
  The pooled features of different blocks have very different scales (a post-norm block ends in a
  LayerNorm, a pre-norm block's residual stream grows with depth, the final output of a pre-norm
  stack is normalised again), and without a common scale the softmax weights would mostly measure
  feature magnitudes rather than usefulness.

Layers are the output of every block (``block0`` .. ``block{depth-1}``) and the final output
(``final``: after the final norm of pre-norm stacks). Where the final output is the last block's
output bit for bit (post-norm stacks such as HuBERT's), it is left out: two copies of one layer
would split its weight in two.

Training: AdamW on ``(layer logits, W, b)`` for ``epochs`` passes (minibatches of
``probe_batch_size``, or the full batch) with a cosine (or constant, ``schedule``) learning rate,
one variant per learning rate in ``lrs``, all variants trained together in one batched pass
(DINOv2's linear evaluation); weight decay applies to the classifier only (decay on the logits
would pull the weights towards uniform). The learning rate and the epoch are chosen on
``split_val`` (best accuracy, the earlier epoch and then the smaller listed lr on ties);
``split_test`` only scores the chosen model. In the same pass, a linear classifier on every layer
alone trains with the same optimiser and selection: the single-layer probe accuracies. Labels come
as a fraction of the training items (``label_fraction``, stratified) with ``seeds`` repeats; the
layer statistics for ``normalize`` come from the items a probe trains on.

Evaluator-specific keys in ``layer_probe.json`` (besides the common schema):
``layers`` (indices: i = block i, -1 = final output), ``layer_names``, ``final_is_last_block``,
``layer_weights`` / ``random_init_layer_weights`` (softmax weights of the chosen model, mean over
seeds, at the largest label fraction), ``layer_weights_per_seed``, ``per_layer_accuracy`` /
``random_init_per_layer_accuracy`` (test accuracy of each layer alone, mean over seeds),
``per_layer_val_accuracy``, ``best_single_layer`` (chosen on validation), ``selected`` /
``random_init_selected`` (lr, epoch and validation accuracy per seed), and the probe settings
(``pool``, ``normalize``, ``epochs``, ``lrs``, ``schedule``, ``weight_decay``, ``probe_batch_size``). Each entry of
``label_fractions`` also carries its ``layer_weights`` and ``per_layer_accuracy`` (both encoders)."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmssl.data.loader import DataSource
from mmssl.encoder import Encoder
from mmssl.eval.feature_cache import FeatureSet, encoder_features, feature_key
from mmssl.eval.features import input_size
from mmssl.eval.protocol import RANDOM_INIT, EncoderEval, figure, top_fraction
from mmssl.eval.stats import summarise


@dataclass
class LayerProbeFit:
    """One fit of the layer-weighted probe and of every single-layer probe (L layers, t test items)."""

    weights: torch.Tensor           # [L] softmax layer weights of the chosen weighted model
    lr: float
    epoch: int                      # 1-based epoch chosen on validation
    val_accuracy: float
    test_correct: torch.Tensor      # [t] bool, the chosen weighted model on each test item
    layer_val_accuracy: list[float]  # [L] each layer alone, its chosen lr and epoch
    layer_test_correct: torch.Tensor  # [L, t] bool


def weighted_sum(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SUPERB's featurizer on pooled features: softmax(logits) weights over layers.

    logits: [L] or [V, L] (V probe variants); z: [L, n, D] -> [n, D] or [V, n, D]."""
    w = logits.softmax(-1)
    return torch.einsum("l,lnd->nd" if w.dim() == 1 else "vl,lnd->vnd", w, z)


def standardise_layers(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Per layer and dimension z-score with the training items' statistics.

    train: [L, n, D]; others: [L, m, D] -> the same shapes."""
    n = train.shape[1]
    mean = train.mean(1, keepdim=True)
    std = train.std(1, keepdim=True, correction=1 if n > 1 else 0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def weighted_scores(a: torch.Tensor, z: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Class scores of V weighted probes: ``weighted_sum(a_v, z) @ W_v + b_v``.

    a: [V, L] layer logits; z: [L, n, D]; W: [V, D, K]; b: [V, K] -> [V, n, K]. Mixing the features
    first costs V*n*D*(L + K) multiply-adds, less than mixing the L layers' scores (L*V*n*D*K)."""
    return torch.baddbmm(b[:, None], weighted_sum(a, z), W)


def single_scores(z: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Class scores of probes on one layer each, R variants per layer.

    z: [L, n, D]; W: [L, R, D, K]; b: [L, R, K] -> [L, R, n, K]."""
    L, R, D, K = W.shape
    s = torch.bmm(z, W.permute(0, 2, 1, 3).reshape(L, D, R * K)).view(L, z.shape[1], R, K)
    return s.permute(0, 2, 1, 3) + b[:, :, None]


def _correct(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return scores.argmax(-1) == y


@contextmanager
def _one_cpu_thread(device: torch.device | str) -> Iterator[None]:
    """On the CPU the probe's tensors are small: OpenMP's fork-join per operation costs more than it
    gains, and on shared cores it made a fit 4-15x slower (2 threads vs 1, measured)."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_layer_probe(ztr: torch.Tensor, ytr: torch.Tensor, zva: torch.Tensor, yva: torch.Tensor,
                    zte: torch.Tensor, yte: torch.Tensor, num_classes: int, lrs: Sequence[float],
                    epochs: int = 60, weight_decay: float = 0.0, batch_size: int | None = 256,
                    seed: int = 0, normalize: bool = True, schedule: str = "cosine",
                    device: torch.device | str = "cpu") -> LayerProbeFit:
    """Train the layer-weighted probe and the L single-layer probes, one variant per learning rate
    each, all in one batched pass; choose lr and epoch on validation; score the test items.

    ztr: [L, n, D] pooled features of every layer, ytr: [n] int64; zva: [L, m, D], yva: [m];
    zte: [L, t, D], yte: [t]. ``batch_size`` None or >= n: full batch. ``seed`` orders minibatches."""
    with _one_cpu_thread(device):
        return _fit(ztr, ytr, zva, yva, zte, yte, num_classes, lrs, epochs, weight_decay, batch_size, seed,
                    normalize, schedule, device)


def _fit(ztr: torch.Tensor, ytr: torch.Tensor, zva: torch.Tensor, yva: torch.Tensor, zte: torch.Tensor,
         yte: torch.Tensor, num_classes: int, lrs: Sequence[float], epochs: int, weight_decay: float,
         batch_size: int | None, seed: int, normalize: bool, schedule: str,
         device: torch.device | str) -> LayerProbeFit:
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"eval.schedule must be 'cosine' or 'constant', not {schedule!r}")
    L, n, D = ztr.shape
    K = int(num_classes)
    ztr, zva, zte = (t.to(device, torch.float32) for t in (ztr, zva, zte))
    if normalize:
        ztr, zva, zte = standardise_layers(ztr, zva, zte)
    ytr, yva, yte = (t.to(device) for t in (ytr, yva, yte))
    lrs = [float(v) for v in lrs]
    R = len(lrs)

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=device, requires_grad=True)

    # per learning rate: the weighted probe (a, W, b; a = 0: the plain average to start, as s3prl)
    # and the L single-layer probes (Ws, bs). Zero init keeps a fit a function of (data, seed).
    params = [(zeros(L), zeros(D, K), zeros(K), zeros(L, D, K), zeros(L, K)) for _ in lrs]
    # weight decay on the classifiers only: decay on the layer logits would pull towards uniform
    groups = [{"params": [p[0], p[2], p[4]], "lr": lr, "weight_decay": 0.0} for p, lr in zip(params, lrs)]
    groups += [{"params": [p[1], p[3]], "lr": lr, "weight_decay": weight_decay} for p, lr in zip(params, lrs)]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), foreach=True)

    def stacked() -> tuple[torch.Tensor, ...]:
        """(a [R, L], W [R, D, K], b [R, K], Ws [L, R, D, K], bs [L, R, K])."""
        a, W, b, Ws, bs = (torch.stack(t) for t in zip(*params))
        return a, W, b, Ws.transpose(0, 1), bs.transpose(0, 1)

    def scores(z: torch.Tensor, p: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return weighted_scores(p[0], z, p[1], p[2]), single_scores(z, p[3], p[4])  # [R, n, K], [L, R, n, K]

    best_w = torch.full((R,), -1.0, device=device)  # validation accuracy of the kept snapshot
    best_s = torch.full((L, R), -1.0, device=device)
    epoch_w = torch.zeros(R, dtype=torch.long, device=device)
    epoch_s = torch.zeros(L, R, dtype=torch.long, device=device)
    with torch.no_grad():
        best = [t.detach().clone() for t in stacked()]
    bsz = n if not batch_size or batch_size >= n else int(batch_size)
    g = torch.Generator().manual_seed(int(seed))
    total = int(epochs) * -(-n // bsz)
    # cosine decay to zero over the whole run: large early steps, then the probe settles
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)) if schedule == "cosine" else 1.0)
    for epoch in range(1, int(epochs) + 1):
        if bsz < n:  # one gather per epoch; the minibatches are then views
            order = torch.randperm(n, generator=g).to(device)
            zp, yp = ztr[:, order], ytr[order]
        else:
            zp, yp = ztr, ytr
        for i in range(0, n, bsz):
            y = yp[i:i + bsz]
            sw, ss = scores(zp[:, i:i + bsz], stacked())
            # summed over variants: each variant's parameters get the gradient of its own mean loss
            loss = (F.cross_entropy(sw.reshape(-1, K), y.repeat(R), reduction="sum")
                    + F.cross_entropy(ss.reshape(-1, K), y.repeat(L * R), reduction="sum")) / len(y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            cur = stacked()
            sw, ss = scores(zva, cur)
            acc_w, acc_s = _correct(sw, yva).float().mean(-1), _correct(ss, yva).float().mean(-1)
            up_w, up_s = acc_w > best_w, acc_s > best_s  # strictly better: the earlier epoch on ties
            best_w, best_s = torch.maximum(acc_w, best_w), torch.maximum(acc_s, best_s)
            epoch_w, epoch_s = torch.where(up_w, epoch, epoch_w), torch.where(up_s, epoch, epoch_s)
            for j, m in ((0, up_w), (1, up_w), (2, up_w), (3, up_s), (4, up_s)):
                best[j].copy_(torch.where(m.view(*m.shape, *([1] * (cur[j].dim() - m.dim()))), cur[j], best[j]))
    with torch.no_grad():
        sw, ss = scores(zte, best)
        cw, cs = _correct(sw, yte), _correct(ss, yte)  # [R, t], [L, R, t]
    r = int(best_w.argmax())  # the first (in the order of lrs) on ties
    rs = best_s.argmax(1)  # [L]
    ar = torch.arange(L, device=device)
    return LayerProbeFit(
        weights=best[0][r].softmax(-1).cpu(), lr=lrs[r], epoch=int(epoch_w[r]), val_accuracy=float(best_w[r]),
        test_correct=cw[r].cpu(), layer_val_accuracy=best_s[ar, rs].tolist(),
        layer_test_correct=cs[ar, rs].cpu())


# -- features ------------------------------------------------------------------------------------------
def _stack(fs: FeatureSet, layers: Sequence[int]) -> torch.Tensor:
    """FeatureSet -> [L, n, D] in the order of ``layers``."""
    return torch.stack([fs.feats[feature_key(layer, "mean")] for layer in layers])


def _layer_features(enc: Encoder, source: DataSource, splits: list[str], device: torch.device,
                    batch_size: int, cache_root: Path | None,
                    bad: dict[str, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(features [depth + 1, n, D] (blocks then final output), labels [n])] per split."""
    layers = [*range(enc.depth), -1]
    out = []
    for split in splits:
        fs = encoder_features(enc, source, split, device, batch_size, layers=layers, pools=("mean",),
                              max_len=input_size(enc), cache_root=cache_root)
        for k, v in fs.skipped.items():
            bad[k] = bad.get(k, 0) + int(v)
        out.append((_stack(fs, layers), fs.labels))
    return out


def layers_to_probe(x: torch.Tensor) -> tuple[list[int], bool]:
    """x: [depth + 1, n, D] training features (blocks, then the final output) -> (layer indices to
    probe, whether the final output was left out for being the last block's output bit for bit)."""
    layers = [*range(x.shape[0] - 1), -1]
    if x.shape[0] > 1 and torch.equal(x[-1], x[-2]):  # post-norm stacks: one copy, not two halves
        return layers[:-1], True
    return layers, False


def _check_labels(labels: Sequence[torch.Tensor], source: DataSource) -> int:
    if any(y.dim() > 1 for y in labels):
        raise ValueError(f"{source.root} has multi-label targets: the layer-weighted probe is single-label")
    if any(bool((y < 0).any()) for y in labels):
        raise ValueError(f"{source.root} has unlabelled samples: a layer-weighted probe needs class labels")
    return max(int(max(int(y.max()) for y in labels)) + 1, source.num_classes)


def _mean(rows: Sequence[Sequence[float]]) -> list[float]:
    return [float(v) for v in torch.tensor(rows, dtype=torch.float64).mean(0)]


# -- the evaluator -------------------------------------------------------------------------------------
def run_layer_probe(encoder_path: str | Path, out: str | Path, source: DataSource, ecfg: dict[str, Any],
                    device: torch.device, batch_size: int = 32, cache_dir: Path | None = None) -> dict[str, Any]:
    """Layer-weighted probe of an encoder and of its step-0 baseline; writes ``out/layer_probe.json``
    and ``out/layer_probe.png`` and returns the result (schema in the module doc)."""
    ev = EncoderEval("layer_probe", encoder_path, source, ecfg, device)
    cfg = ev.ecfg
    splits = [cfg["split_train"], cfg["split_val"], cfg["split_test"]]
    cache_root = ev.cache_root(cache_dir)
    bad: dict[str, int] = {}
    feats = {prefix: _layer_features(e, source, splits, device, batch_size, cache_root, bad if prefix == "" else {})
             for prefix, e in ev.twins.items()}
    (xtr, ytr), (_, yva), (_, yte) = feats[""]
    num_classes = _check_labels([ytr, yva, yte], source)
    # the baseline must read the same items in the same order (same codec, same input size)
    if not all(torch.equal(y, y2) for (_, y), (_, y2) in zip(feats[""], feats[RANDOM_INIT])):
        raise ValueError("the trained and random-init encoders saw different items")

    layers, final_is_last = layers_to_probe(xtr)
    L = len(layers)
    names = [f"block{i}" if i >= 0 else "final" for i in layers]
    keep = ev.train_pool(len(ytr))
    ytr = ytr[keep]

    lrs = [float(v) for v in cfg["lrs"]]
    probe = {"lrs": lrs, "epochs": int(cfg["epochs"]), "weight_decay": float(cfg["weight_decay"]),
             "batch_size": cfg["probe_batch_size"], "normalize": bool(cfg["normalize"]),
             "schedule": str(cfg["schedule"]), "device": device}
    fits: dict[tuple[str, float], list[LayerProbeFit]] = {}
    rows = []
    for frac, subsets in ev.subsets(ytr):
        row: dict[str, Any] = {"label_fraction": frac, "n_train": len(subsets[-1][1])}
        for prefix, ((tr, _), (va, _), (te, _)) in feats.items():
            tr, va, te = tr[:L, keep], va[:L], te[:L]
            fs = fits[prefix, frac] = [fit_layer_probe(tr[:, idx], ytr[idx], va, yva, te, yte, num_classes, seed=s,
                                                       **probe) for s, idx in subsets]
            row.update(summarise([f.test_correct for f in fs], prefix=prefix))
        for prefix in feats:
            row[f"{prefix}layer_weights"] = _mean([f.weights.tolist() for f in fits[prefix, frac]])
        for prefix in feats:
            row[f"{prefix}per_layer_accuracy"] = _mean([f.layer_test_correct.float().mean(1).tolist()
                                                        for f in fits[prefix, frac]])
        rows.append(row)
    top = top_fraction(rows)
    tf, rf = fits["", top["label_fraction"]], fits[RANDOM_INIT, top["label_fraction"]]
    layer_val = _mean([f.layer_val_accuracy for f in tf])
    best = max(range(L), key=lambda i: layer_val[i])

    def selected(fs: list[LayerProbeFit]) -> dict[str, list[float]]:
        return {"lr": [f.lr for f in fs], "epoch": [f.epoch for f in fs], "val_accuracy": [f.val_accuracy for f in fs]}

    result = ev.result(
        rows,
        n_train=len(ytr), n_val=len(yva), n_test=len(yte),
        num_classes=num_classes,
        skipped_samples=bad,
        layers=layers, layer_names=names, final_is_last_block=final_is_last,
        layer_weights=top["layer_weights"], random_init_layer_weights=top["random_init_layer_weights"],
        layer_weights_per_seed=[f.weights.tolist() for f in tf],
        per_layer_accuracy=top["per_layer_accuracy"],
        random_init_per_layer_accuracy=top["random_init_per_layer_accuracy"],
        per_layer_val_accuracy=layer_val,
        best_single_layer={"layer": names[best], "val_accuracy": layer_val[best],
                           "accuracy": top["per_layer_accuracy"][best]},
        selected=selected(tf), random_init_selected=selected(rf),
        pool="mean", normalize=probe["normalize"], epochs=probe["epochs"], lrs=lrs,
        weight_decay=probe["weight_decay"], probe_batch_size=probe["batch_size"],
        schedule=probe["schedule"],
    )
    path = ev.write(out, result, plot_layer_probe)
    w = " ".join(f"{n}={v:.2f}" for n, v in zip(names, result["layer_weights"]))
    print(f"layer probe ({ev.encoder.adapter.name}, {L} layers): trained {result['accuracy']:.3f} | random init "
          f"{result['random_init_accuracy']:.3f} | weights {w} | best single layer {names[best]} "
          f"{result['best_single_layer']['accuracy']:.3f} -> {path}", flush=True)
    return result


def plot_layer_probe(r: dict[str, Any], path: Path) -> None:
    """Learned layer weights (bars, trained vs random init) and each layer's probe accuracy."""
    names, x = r["layer_names"], list(range(len(r["layer_names"])))
    with figure(path, ncols=2, figsize=(9, 3.4)) as (ax0, ax1):
        wdt = 0.4
        ax0.bar([i - wdt / 2 for i in x], r["layer_weights"], wdt, color="tab:blue", label="trained")
        ax0.bar([i + wdt / 2 for i in x], r["random_init_layer_weights"], wdt, color="tab:gray", label="random init")
        ax0.axhline(1.0 / len(names), color="k", lw=0.8, ls=":", label="uniform")
        ax0.set_xticks(x, names)
        ax0.set_ylabel("softmax layer weight")
        ax0.set_title("learned layer weights")
        ax0.legend(fontsize=8)
        ax1.plot(x, r["per_layer_accuracy"], "o-", color="tab:blue", label="trained, single layer")
        ax1.plot(x, r["random_init_per_layer_accuracy"], "o--", color="tab:gray", label="random init, single layer")
        ax1.axhline(r["accuracy"], color="tab:blue", lw=1, ls="-.", label=f"trained, weighted {r['accuracy']:.3f}")
        ax1.axhline(r["random_init_accuracy"], color="tab:gray", lw=1, ls="-.",
                    label=f"random init, weighted {r['random_init_accuracy']:.3f}")
        ax1.axhline(1.0 / max(r["num_classes"], 1), color="k", lw=0.8, ls=":", label="chance")
        ax1.set_xticks(x, names)
        ax1.set_ylim(0, 1.05)
        ax1.set_ylabel("test accuracy")
        ax1.set_title(f"probe accuracy per layer ({r['modality']})")
        ax1.legend(fontsize=7)
