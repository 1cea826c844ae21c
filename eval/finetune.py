"""Fine-tuning: the whole encoder (or part of it, or LoRA factors) plus a linear head on its pooled
embedding, trained on the train split; the epoch is chosen on validation, its test score reported;
beside it the same recipe run from the run's step-0 weights.

The evaluator (this module) runs the harness (``protocol.EncoderEval``) and writes the result; its parts:
``finetune_model`` (the classifier, layer-wise decay groups, what trains), ``finetune_data`` (items and
epoch batches), ``finetune_loop`` (optimizer, schedule, one run). Their names are re-exported here.

Recipe (BEiT / MAE fine-tuning, scaled down): AdamW with layer-wise learning-rate decay (head and
final norm x1, block i x decay^(depth - i), everything below the blocks x decay^(depth + 1)), no weight
decay on biases, norms, other 1-d parameters and the CLS/position/mask tokens; linear warm-up then
cosine decay per step; drop path rising linearly over the blocks (timm); label smoothing; bf16 autocast
on CUDA (fp32 on CPU); gradient-norm clipping. The head is MAE's linear-probing head
(``BatchNorm1d(affine=False)`` then linear, ``eval.head_norm=batch``; ``none``: linear only), see
``Classifier``. ``eval.lr`` is the peak rate itself, not scaled by the batch size: evaluation batches
are small, and MAE's blr x batch / 256 rule gives rates too low for the few epochs an evaluation can
afford. Training batches are drawn afresh each epoch (seeded shuffle, then length buckets of
``BUCKET`` batches), since label subsets select single items; val and test keep ``iter_split``'s order.

Modes (``eval.mode``): ``full`` trains everything, optionally with the adapter and the first
``eval.freeze_first`` blocks frozen, or with only the last ``eval.tune_last`` blocks, the final norm
and the head trained; ``lora`` trains LoRA factors (mmssl/lora.py) on every block's attention ``qkv``
and ``proj`` plus the head (and the backbone's norms with ``eval.lora_train_norms``).

Labels: single labels [n] use cross-entropy and accuracy; multi-hot labels [n, K] use BCE-with-logits
(smoothed targets y (1 - s) + s / 2), the per-item score is exact match (every label right, logit > 0)
and micro-F1 is reported beside it.

Keys beside the common schema (eval/stats.py): ``mode``, ``metric`` (accuracy | exact_match),
``multi_label``, ``trainable_params``, ``total_params``, ``head_params``, ``lora_layers``, ``pool``,
``hparams`` (the recipe used), ``val_accuracy`` / ``best_epoch`` (per seed, largest label fraction),
``seconds_per_epoch`` (training only, trained encoder, largest fraction), and per label fraction
``epochs`` (trained: ``eval.epochs``, or more to reach ``eval.min_steps``), ``val_epochs`` (the epochs
validated), ``val_curve`` / ``random_init_val_curve`` (validation score at those, one list per seed),
``best_epoch``, ``seconds`` (whole run), ``train_seconds_per_epoch`` (each also ``random_init_...``,
one value per seed) and, multi-label, ``micro_f1`` / ``random_init_micro_f1`` (mean) with
``..._per_seed``."""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mmssl.data.loader import DataSource
from mmssl.eval.finetune_data import (
    BUCKET,
    SplitData,
    batches_per_epoch,
    epoch_batches,
    load_eval_batches,
    load_train_items,
)
from mmssl.eval.finetune_loop import (
    RunResult,
    build_optimizer,
    finetune_loss,
    finetune_once,
    item_scores,
    micro_f1,
    predict,
    run_length,
)
from mmssl.eval.finetune_model import (
    NO_DECAY_NAMES,
    Classifier,
    configure_trainable,
    layer_id,
    lr_scale,
    no_weight_decay,
    param_groups,
    set_drop_path,
)
from mmssl.eval.protocol import RANDOM_INIT, EncoderEval, figure, fraction_bars, top_fraction
from mmssl.eval.stats import summarise

__all__ = ["BUCKET", "NO_DECAY_NAMES", "Classifier", "RunResult", "SplitData", "batches_per_epoch",
           "build_optimizer", "configure_trainable", "epoch_batches", "finetune_loss", "finetune_once",
           "item_scores", "layer_id", "load_eval_batches", "load_train_items", "lr_scale", "micro_f1",
           "no_weight_decay", "param_groups", "plot_finetune", "predict", "run_finetune", "run_length",
           "set_drop_path"]

HPARAMS = ("epochs", "min_steps", "batch_size", "lr", "min_lr", "warmup_epochs", "layer_decay",
           "weight_decay", "drop_path", "label_smoothing", "head_norm", "clip_grad", "augment", "mode",
           "freeze_first", "tune_last", "lora_rank", "lora_alpha", "lora_dropout", "lora_lr",
           "lora_train_norms", "max_train")


def _num_outputs(source: DataSource, *labels: torch.Tensor) -> int:
    if labels[0].dim() == 2:
        return int(labels[0].shape[1])
    return max(source.num_classes, int(max(int(y.max()) for y in labels)) + 1)


def _fraction_row(frac: float, n_train: int, runs: dict[str, list[RunResult]],
                  test_labels: torch.Tensor) -> dict[str, Any]:
    """One ``label_fractions`` entry: the common summaries plus curves, epochs, times (and micro-F1)."""
    first = runs[""][0]
    row: dict[str, Any] = {"label_fraction": frac, "n_train": n_train, "epochs": first.epochs,
                           "val_epochs": first.val_epochs}
    for prefix, rs in runs.items():
        row.update(summarise([r.test_scores for r in rs], prefix=prefix))
        row[f"{prefix}val_curve"] = [r.val_curve for r in rs]
        row[f"{prefix}best_epoch"] = [r.best_epoch for r in rs]
        row[f"{prefix}seconds"] = [round(r.seconds, 1) for r in rs]
        row[f"{prefix}train_seconds_per_epoch"] = [round(r.train_seconds / r.epochs, 2) for r in rs]
        if test_labels.dim() == 2:
            f1 = [micro_f1(r.test_logits, test_labels) for r in rs]
            row[f"{prefix}micro_f1"] = sum(f1) / len(f1)
            row[f"{prefix}micro_f1_per_seed"] = f1
    return row


def run_finetune(encoder_path: str | Path, out: str | Path, source: DataSource, ecfg: dict[str, Any],
                 device: torch.device, batch_size: int = 32, cache_dir: Path | None = None) -> dict[str, Any]:
    """Fine-tune the encoder and its step-0 baseline, each from a fresh copy, for every (label
    fraction, seed); write out/finetune.json and out/finetune.png (see the module docstring).
    ``batch_size``: evaluation batches (val, test); training uses ``eval.batch_size``. ``cache_dir``
    is unused (fine-tuning changes the encoder: no cached feature applies); it keeps the evaluators'
    common signature."""
    ev = EncoderEval("finetune", encoder_path, source, ecfg, device)
    enc, cfg, size = ev.encoder, ev.ecfg, ev.input_size
    mode = str(cfg["mode"])
    bad: Counter = Counter()
    train = load_train_items(source, cfg["split_train"], bad, cfg["max_train"])
    val = load_eval_batches(source, cfg["split_val"], batch_size, bad, size)
    test = load_eval_batches(source, cfg["split_test"], batch_size, bad, size)
    multi = train.labels.dim() == 2
    num_outputs = _num_outputs(source, train.labels, val.labels, test.labels)
    print(f"finetune ({enc.adapter.name}, mode {mode}): {len(train.labels)} train / {len(val.labels)} val / "
          f"{len(test.labels)} test items, {num_outputs} {'labels (multi-label)' if multi else 'classes'}, "
          f"fractions {ev.fractions}, seeds {ev.seeds}", flush=True)
    rows, counts = [], None
    for frac, subsets in ev.subsets(train.labels):
        runs: dict[str, list[RunResult]] = {prefix: [] for prefix in ev.twins}
        for seed, idx in subsets:
            for prefix, base in ev.twins.items():
                which = "random" if prefix else "trained"
                r = finetune_once(copy.deepcopy(base), source, train, idx, val, test, num_outputs, cfg,
                                  device, seed, size,
                                  log=f"{which} fraction {frac:g} seed {seed} ({len(idx)} items)")
                runs[prefix].append(r)
                if counts is None:
                    counts = r.counts
                    lora = f", LoRA on {counts['lora_layers']} layers" if counts["lora_layers"] else ""
                    print(f"  trainable parameters: {counts['trainable_params']:,} of "
                          f"{counts['total_params']:,} (head {counts['head_params']:,}{lora})", flush=True)
        rows.append(_fraction_row(frac, len(idx), runs, test.labels))
    assert counts is not None
    top = top_fraction(rows)
    per_epoch = top["train_seconds_per_epoch"]
    result = ev.result(
        rows,
        n_train=len(train.labels), n_val=len(val.labels), n_test=len(test.labels),
        num_classes=num_outputs,
        skipped_samples=dict(bad),
        mode=mode,
        metric="exact_match" if multi else "accuracy",
        multi_label=multi,
        **counts,
        pool=enc.pool,
        hparams={k: cfg[k] for k in HPARAMS},
        val_accuracy=[max(c) for c in top["val_curve"]],
        best_epoch=top["best_epoch"],
        seconds_per_epoch=round(sum(per_epoch) / len(per_epoch), 2),
    )
    if multi:
        result["micro_f1"], result["random_init_micro_f1"] = top["micro_f1"], top["random_init_micro_f1"]
    path = ev.write(out, result, plot_finetune)
    ev.print_summary(f"finetune ({enc.adapter.name}, {mode}, fraction {top['label_fraction']:g}, "
                     f"{len(ev.seeds)} seed(s))", result, path)
    return result


def plot_finetune(r: dict[str, Any], path: Path) -> None:
    """Left: test score per label fraction, trained against random init, with bootstrap 95% intervals.
    Right: validation score per epoch (mean over seeds), solid trained, dashed random init."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    rows = r["label_fractions"]
    with figure(path, ncols=2, figsize=(9, 3.4)) as (ax, bx):
        fraction_bars(ax, r, ("", RANDOM_INIT), digits=2, chance=not r["multi_label"])
        ax.set_ylabel(f"test {r['metric'].replace('_', ' ')}")
        ax.set_title(f"fine-tuning ({r['mode']}), {r['modality']}, 95% CI")
        ax.legend(fontsize=7, loc="upper left")
        cmap = matplotlib.colormaps["viridis"]
        for i, row in enumerate(rows):
            c = cmap(i / max(len(rows) - 1, 1))
            for prefix, ls in (("", "-"), (RANDOM_INIT, "--")):
                curves = torch.tensor(row[f"{prefix}val_curve"])
                bx.plot(row["val_epochs"], curves.mean(0).tolist(), ls, color=c, marker=".",
                        label=f"fraction {row['label_fraction']:g}, {'trained' if not prefix else 'random init'}")
        bx.xaxis.set_major_locator(MaxNLocator(integer=True))
        bx.set_xlabel("epoch")
        bx.set_ylabel(f"val {r['metric'].replace('_', ' ')}")
        bx.set_title("validation per epoch (mean over seeds)")
        bx.legend(fontsize=6)
