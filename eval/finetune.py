"""Fine-tuning: the whole encoder (or part of it, or LoRA factors) plus a linear head on its pooled
embedding, trained on the train split; the epoch is chosen on validation, its test score reported;
beside it the same recipe run from the run's step-0 weights.

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

import contextlib
import copy
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.atomic import write_text
from mmssl.data.loader import DataSource, iter_split
from mmssl.data.shards import read_samples, split_paths
from mmssl.encoder import Encoder
from mmssl.eval.features import init_encoder, input_size
from mmssl.eval.results import header
from mmssl.eval.stats import fractions_and_seeds, label_subset, summarise
from mmssl.export import load_encoder
from mmssl.lora import apply_lora, count_trainable, mark_only_lora_trainable
from mmssl.train.schedule import lr_factor
from mmssl.types import Batch

#: parameter names that are tokens or tables rather than weights: no weight decay (timm's no_weight_decay)
NO_DECAY_NAMES = ("prefix", "mask_embedding", "pos_embed", "position_embedding")
#: training batches are formed from pools of this many batches sorted by length: little padding for
#: variable-length inputs, while each pool is a fresh random draw every epoch
BUCKET = 4


# -- the model -----------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """encoder -> pooled embedding [B, D] (the encoder's own pool) -> [BatchNorm] -> linear -> logits [B, K].

    ``head_norm="batch"`` puts MAE's linear-probing normalisation (``BatchNorm1d(affine=False)``) in
    front of the linear layer: it standardises the pooled feature as the linear probe's z-score does.
    A pooled feature dominated by a component shared by all inputs (MAE's CLS token, which no
    pretraining loss reads) otherwise needs many more steps than an evaluation affords before the
    head separates the classes."""

    def __init__(self, encoder: Encoder, num_outputs: int, head_norm: str = "batch") -> None:
        super().__init__()
        if head_norm not in ("batch", "none"):
            raise ValueError(f"eval.head_norm must be 'batch' or 'none', not {head_norm!r}")
        self.encoder = encoder
        batch_norm = head_norm == "batch"
        self.norm = nn.BatchNorm1d(encoder.dim, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.head = nn.Linear(encoder.dim, num_outputs)
        # MAE's fine-tuning head init: near-zero logits, so the first steps follow label smoothing's
        # uniform target rather than a random projection
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.norm(self.encoder.embed(batch).float()))


def set_drop_path(encoder: Encoder, rate: float) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 (first block) to ``rate`` (last), as timm's
    ``torch.linspace(0, drop_path_rate, depth)`` -> the rates set."""
    blocks = encoder.backbone.blocks
    rates = torch.linspace(0.0, float(rate), len(blocks)).tolist()
    for blk, r in zip(blocks, rates):
        blk.drop_path = float(r)
    return rates


# -- layer-wise learning-rate decay --------------------------------------------------------------------
def layer_id(name: str, depth: int, norm_first: bool = True) -> int:
    """BEiT's layer index of a Classifier parameter: 0 for everything below the blocks (adapter, CLS
    and mask tokens, and a post-norm stack's input norm), i + 1 for block i, depth + 1 for the final
    norm of a pre-norm stack and for the head."""
    if name.startswith("head."):
        return depth + 1
    parts = name.split(".")
    if parts[:3] == ["encoder", "backbone", "blocks"]:
        return int(parts[3]) + 1
    if parts[:3] == ["encoder", "backbone", "norm"]:
        return depth + 1 if norm_first else 0  # post-norm stacks normalise their input
    return 0


def lr_scale(lid: int, depth: int, decay: float) -> float:
    """decay^(depth + 1 - layer id): 1 for the head, decay^(depth - i) for block i."""
    return float(decay) ** (depth + 1 - lid)


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or name.endswith(".bias") or name.rpartition(".")[2] in NO_DECAY_NAMES


def param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters, one per (layer id, decayed or not), each with
    ``lr_scale`` (multiplies the scheduled rate), ``weight_decay`` and the parameter ``names``."""
    enc = model.encoder
    depth, norm_first = enc.depth, bool(enc.backbone_cfg.norm_first)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth, norm_first)
        nd = no_weight_decay(name, p)
        g = groups.setdefault((lid, nd), {"params": [], "names": [], "layer_id": lid,
                                          "weight_decay": 0.0 if nd else float(weight_decay),
                                          "lr_scale": lr_scale(lid, depth, layer_decay)})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# -- what trains ---------------------------------------------------------------------------------------
def configure_trainable(model: Classifier, ecfg: dict[str, Any]) -> dict[str, Any]:
    """Set requires_grad (and wrap LoRA layers) for ``eval.mode`` / ``freeze_first`` / ``tune_last``
    -> {"trainable_params", "total_params", "head_params", "lora_layers"}.

    The mask embedding never trains: fine-tuning does not mask, so it would get no gradient."""
    enc = model.encoder
    depth = enc.depth
    mode = str(ecfg.get("mode", "full"))
    freeze_first = int(ecfg.get("freeze_first") or 0)
    tune_last = ecfg.get("tune_last")
    lora_layers: list[str] = []
    if mode == "lora":
        if freeze_first or tune_last is not None:
            raise ValueError("eval.freeze_first / eval.tune_last apply to eval.mode=full, not lora")
        lora_layers = apply_lora(enc.backbone, ("qkv", "proj"), int(ecfg.get("lora_rank", 8)),
                                 float(ecfg.get("lora_alpha", 16)), float(ecfg.get("lora_dropout", 0.0)))
        mark_only_lora_trainable(enc)
        if ecfg.get("lora_train_norms"):
            for m in enc.backbone.modules():
                if isinstance(m, nn.LayerNorm):
                    m.requires_grad_(True)
    elif mode == "full":
        if freeze_first and tune_last is not None:
            raise ValueError("set eval.freeze_first or eval.tune_last, not both")
        if not 0 <= freeze_first <= depth:
            raise ValueError(f"eval.freeze_first must lie in 0..{depth}, got {freeze_first}")
        enc.requires_grad_(True)
        blocks = enc.backbone.blocks
        if tune_last is not None:
            n = int(tune_last)
            if not 0 <= n <= depth:
                raise ValueError(f"eval.tune_last must lie in 0..{depth}, got {n}")
            enc.requires_grad_(False)
            for blk in blocks[depth - n:]:
                blk.requires_grad_(True)
            if enc.backbone_cfg.norm_first:  # the final norm; a post-norm stack's norm is at its input
                enc.backbone.norm.requires_grad_(True)
        elif freeze_first:
            enc.adapter.requires_grad_(False)
            if enc.prefix is not None:
                enc.prefix.requires_grad_(False)
            if not enc.backbone_cfg.norm_first:
                enc.backbone.norm.requires_grad_(False)
            for blk in blocks[:freeze_first]:
                blk.requires_grad_(False)
    else:
        raise ValueError(f"eval.mode must be 'full' or 'lora', not {mode!r}")
    enc.mask_embedding.requires_grad_(False)
    model.head.requires_grad_(True)
    return {"trainable_params": count_trainable(model),
            "total_params": sum(p.numel() for p in model.parameters()),
            "head_params": sum(p.numel() for p in model.head.parameters()), "lora_layers": len(lora_layers)}


# -- losses and scores ---------------------------------------------------------------------------------
def finetune_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """logits [B, K]; labels [B] class indices (cross-entropy) or [B, K] multi-hot (BCE-with-logits
    on targets y (1 - s) + s / 2) -> scalar mean loss."""
    logits = logits.float()
    if labels.dim() == 2:
        target = labels.float() * (1.0 - smoothing) + smoothing / 2.0
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def item_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-> [n] float 1/0 per item: arg-max right (single label) or every label right at logit > 0
    (multi-label exact match)."""
    if labels.dim() == 2:
        return ((logits > 0) == (labels > 0.5)).all(1).float()
    return (logits.argmax(1) == labels).float()


def micro_f1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-label micro-F1 over all (item, label) pairs: 2 TP / (2 TP + FP + FN), predicted = logit > 0."""
    pred, true = logits > 0, labels > 0.5
    tp = float((pred & true).sum())
    fp = float((pred & ~true).sum())
    fn = float((~pred & true).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 1.0


# -- data ----------------------------------------------------------------------------------------------
@dataclass
class SplitData:
    """A split materialised once: items (train, re-batched each epoch) or fixed batches (val, test)."""

    labels: torch.Tensor  # [n] or [n, K]
    items: list[dict[str, Any]] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)


def load_train_items(source: DataSource, split: str, bad: Counter, max_train: int | None) -> SplitData:
    """Every usable decoded sample of the training split (the same reader and decoder as
    ``iter_split``), kept as items so label subsets and epochs can re-batch them."""
    items = list(read_samples(split_paths(source.root, split), source.decode, bad))
    if not items:
        raise ValueError(f"split {split!r} of {source.root} has no usable samples")
    if any("label" not in it for it in items):
        raise ValueError(f"{source.root} has unlabelled {split} samples: fine-tuning needs labels")
    if max_train and len(items) > int(max_train):
        keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[: int(max_train)]
        items = [items[i] for i in keep.sort().values.tolist()]
    return SplitData(labels=torch.as_tensor([it["label"] for it in items]), items=items)


def load_eval_batches(source: DataSource, split: str, batch_size: int, bad: Counter,
                      max_len: int | None) -> SplitData:
    """The split's batches in ``iter_split``'s fixed order (so per-item scores line up over seeds)."""
    batches = list(iter_split(source, split, batch_size, bad, max_len=max_len))
    if not batches:
        raise ValueError(f"split {split!r} of {source.root} has no usable samples")
    if any("label" not in b for b in batches):
        raise ValueError(f"{source.root} has unlabelled {split} samples: fine-tuning needs labels")
    return SplitData(labels=torch.cat([b["label"] for b in batches]), batches=batches)


def _pools(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of the length-sorting pools over n shuffled items: ``BUCKET`` batches each; a
    last pool of a single item joins the one before (batch statistics need two items)."""
    size = batch_size * BUCKET
    bounds = [(i, min(i + size, n)) for i in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches cut from a pool of n items: full batches and the rest, which joins the
    batch before when it would hold a single item."""
    sizes = [min(batch_size, n - k) for k in range(0, n, batch_size)]
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2] += sizes.pop()
    return sizes


def batches_per_epoch(n: int, batch_size: int) -> int:
    return sum(len(_batch_sizes(e - s, batch_size)) for s, e in _pools(n, batch_size))


def epoch_batches(source: DataSource, items: list[dict[str, Any]], batch_size: int, max_len: int | None,
                  g: torch.Generator, crop_generator: torch.Generator | None = None) -> Iterator[Batch]:
    """One epoch: a random permutation, pools of ``BUCKET`` batches sorted by length, batches in a
    random order; no batch holds a single item. ``crop_generator``: the codec's random crops
    (training augmentation), else its deterministic evaluation preprocessing."""
    perm = torch.randperm(len(items), generator=g).tolist()
    chunks: list[list[dict[str, Any]]] = []
    for s, e in _pools(len(items), batch_size):
        part = sorted((items[j] for j in perm[s:e]), key=source.length)
        start = 0
        for size in _batch_sizes(len(part), batch_size):
            chunks.append(part[start:start + size])
            start += size
    for k in torch.randperm(len(chunks), generator=g).tolist():
        yield source.collate(chunks[k], max_len, crop_generator)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def predict(model: Classifier, batches: list[Batch], device: torch.device) -> torch.Tensor:
    """-> logits [n, K] float32 on the CPU, in batch order."""
    model.eval()
    out = []
    with _autocast(device):
        for b in batches:
            out.append(model(_to(b, device)).float().cpu())
    return torch.cat(out)


# -- one fine-tuning run -------------------------------------------------------------------------------
@dataclass
class RunResult:
    test_scores: torch.Tensor  # [n_test] per-item 1/0 at the chosen epoch
    test_logits: torch.Tensor  # [n_test, K]
    val_curve: list[float]  # validation score at each of val_epochs
    val_epochs: list[int]  # 1-based
    best_epoch: int  # 1-based
    epochs: int  # trained (eval.epochs, or more to reach eval.min_steps)
    seconds: float
    train_seconds: float
    counts: dict[str, Any]


def build_optimizer(model: Classifier, ecfg: dict[str, Any]) -> tuple[torch.optim.AdamW, float]:
    """AdamW over the layer-decayed groups -> (optimizer, peak rate: ``lora_lr`` in LoRA mode when set)."""
    lr = float(ecfg["lora_lr"]) if ecfg.get("mode") == "lora" and ecfg.get("lora_lr") else float(ecfg["lr"])
    groups = param_groups(model, float(ecfg.get("weight_decay", 0.05)), float(ecfg.get("layer_decay", 0.75)))
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999)), lr


def run_length(n: int, ecfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """-> (epochs, steps per epoch, warm-up steps, validate every k epochs) for n training items.

    Small label subsets would get a handful of steps in ``eval.epochs`` epochs, so a run lasts at
    least ``eval.min_steps`` optimizer steps (more epochs), validates about ``eval.epochs`` times
    (every k epochs and at the end), and warms up over the same share of its steps as
    ``eval.warmup_epochs`` is of ``eval.epochs``."""
    planned = int(ecfg["epochs"])
    if planned < 1:
        raise ValueError(f"eval.epochs must be at least 1, got {planned}")
    per_epoch = batches_per_epoch(n, int(ecfg.get("batch_size", 64)))
    epochs = max(planned, -(-int(ecfg.get("min_steps") or 0) // per_epoch))
    warmup = round(float(ecfg.get("warmup_epochs", 0.0)) / planned * epochs * per_epoch)
    return epochs, per_epoch, warmup, -(-epochs // planned)


def finetune_once(encoder: Encoder, source: DataSource, train: SplitData, idx: torch.Tensor, val: SplitData,
                  test: SplitData, num_outputs: int, ecfg: dict[str, Any], device: torch.device, seed: int,
                  max_len: int | None, log: str = "") -> RunResult:
    """Fine-tune ``encoder`` (modified in place: pass a copy) on the training items ``idx``; keep
    the weights of the validated epoch with the best score; score the test split with them."""
    t0 = time.perf_counter()
    items = [train.items[i] for i in idx.tolist()]
    if len(items) < 2:
        raise ValueError(f"{len(items)} training item(s): fine-tuning needs two or more "
                         f"(raise eval.label_fraction)")
    torch.manual_seed(seed)  # head init, drop path, dropout, LoRA init and views draw from it
    model = Classifier(encoder, num_outputs, str(ecfg.get("head_norm", "batch")))
    set_drop_path(encoder, float(ecfg.get("drop_path", 0.0)))
    counts = configure_trainable(model, ecfg)
    model.to(device)
    opt, lr = build_optimizer(model, ecfg)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    bs = int(ecfg.get("batch_size", 64))
    epochs, steps_per_epoch, warmup, val_every = run_length(len(items), ecfg)
    total = epochs * steps_per_epoch
    min_factor = float(ecfg.get("min_lr", 0.0)) / lr
    smoothing, clip = float(ecfg.get("label_smoothing", 0.0)), float(ecfg.get("clip_grad") or 0.0)
    augment = bool(ecfg.get("augment", False))
    g = torch.Generator().manual_seed(seed)
    crop_g = torch.Generator().manual_seed(seed + 1) if augment else None
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    curve: list[float] = []
    val_epochs: list[int] = []
    step, train_s = 0, 0.0
    for epoch in range(epochs):
        te = time.perf_counter()
        model.train()
        for batch in epoch_batches(source, items, bs, max_len, g, crop_g):
            f = lr_factor(step, total, warmup, "cosine", min_factor)
            for grp in opt.param_groups:
                grp["lr"] = lr * f * grp["lr_scale"]
            b = _to(batch, device)
            if augment:  # one stochastic view per item (crop, flip, jitter / gain, noise)
                b = encoder.adapter.views(b, 1, 0)[0]
            with _autocast(device):
                logits = model(b)
            loss = finetune_loss(logits, b["label"], smoothing)
            if not torch.isfinite(loss):
                raise ValueError(f"non-finite fine-tuning loss at step {step} (lr {lr:g}): "
                                         f"lower eval.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            step += 1
        train_s += time.perf_counter() - te
        if (epoch + 1) % val_every and epoch + 1 < epochs:
            continue
        v = float(item_scores(predict(model, val.batches, device), val.labels).mean())
        curve.append(v)
        val_epochs.append(epoch + 1)
        if best is None or v > best[0]:  # ties keep the earlier epoch
            best = (v, epoch + 1, {k: t.detach().clone() for k, t in model.state_dict().items()})
    assert best is not None
    model.load_state_dict(best[2])
    logits = predict(model, test.batches, device)
    scores = item_scores(logits, test.labels)
    r = RunResult(scores, logits, curve, val_epochs, best[1], epochs, time.perf_counter() - t0, train_s,
                  counts)
    if log:
        print(f"  {log}: best epoch {r.best_epoch}/{epochs} (val {best[0]:.3f}), test "
              f"{float(scores.mean()):.3f}, {r.seconds:.0f}s ({train_s / epochs:.1f}s/epoch training)",
              flush=True)
    return r


# -- the evaluator -------------------------------------------------------------------------------------
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
    first = runs["trained"][0]
    row: dict[str, Any] = {"label_fraction": frac, "n_train": n_train, "epochs": first.epochs,
                           "val_epochs": first.val_epochs}
    for which, prefix in (("trained", ""), ("random", "random_init_")):
        rs = runs[which]
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
    t0 = time.perf_counter()
    enc = load_encoder(encoder_path, device=device)
    init, init_source = init_encoder(Path(encoder_path), enc)
    init = init.to(device)
    size = input_size(enc)
    fractions, seeds = fractions_and_seeds(ecfg)
    mode = str(ecfg.get("mode", "full"))
    bad: Counter = Counter()
    train = load_train_items(source, ecfg.get("split_train", "train"), bad, ecfg.get("max_train"))
    val = load_eval_batches(source, ecfg.get("split_val", "val"), batch_size, bad, size)
    test = load_eval_batches(source, ecfg.get("split_test", "test"), batch_size, bad, size)
    multi = train.labels.dim() == 2
    num_outputs = _num_outputs(source, train.labels, val.labels, test.labels)
    print(f"finetune ({enc.adapter.name}, mode {mode}): {len(train.labels)} train / {len(val.labels)} val / "
          f"{len(test.labels)} test items, {num_outputs} {'labels (multi-label)' if multi else 'classes'}, "
          f"fractions {fractions}, seeds {seeds}", flush=True)
    rows, counts = [], None
    for frac in fractions:
        runs: dict[str, list[RunResult]] = {"trained": [], "random": []}
        for seed in seeds:
            idx = label_subset(train.labels, frac, seed)
            for which, base in (("trained", enc), ("random", init)):
                r = finetune_once(copy.deepcopy(base), source, train, idx, val, test, num_outputs, ecfg,
                                  device, seed, size,
                                  log=f"{which} fraction {frac:g} seed {seed} ({len(idx)} items)")
                runs[which].append(r)
                if counts is None:
                    counts = r.counts
                    lora = f", LoRA on {counts['lora_layers']} layers" if counts["lora_layers"] else ""
                    print(f"  trainable parameters: {counts['trainable_params']:,} of "
                          f"{counts['total_params']:,} (head {counts['head_params']:,}{lora})", flush=True)
        rows.append(_fraction_row(frac, len(idx), runs, test.labels))
    assert counts is not None
    top = max(rows, key=lambda r: r["label_fraction"])
    keys = ("accuracy", "accuracy_std", "accuracy_ci95", "accuracy_per_seed")
    per_epoch = top["train_seconds_per_epoch"]
    result: dict[str, Any] = {
        **header("finetune", enc, encoder_path, source, init_source),
        **{k: top[k] for k in keys},
        **{f"random_init_{k}": top[f"random_init_{k}"] for k in keys},
        "label_fractions": rows,
        "seeds": len(seeds),
        "n_train": len(train.labels), "n_val": len(val.labels), "n_test": len(test.labels),
        "num_classes": num_outputs,
        "skipped_samples": dict(bad),
        "mode": mode,
        "metric": "exact_match" if multi else "accuracy",
        "multi_label": multi,
        **counts,
        "pool": enc.pool,
        "hparams": {k: ecfg.get(k) for k in HPARAMS},
        "val_accuracy": [max(c) for c in top["val_curve"]],
        "best_epoch": top["best_epoch"],
        "seconds_per_epoch": round(sum(per_epoch) / len(per_epoch), 2),
    }
    if multi:
        result["micro_f1"], result["random_init_micro_f1"] = top["micro_f1"], top["random_init_micro_f1"]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "finetune.json", json.dumps(result, indent=2))
    plot_finetune(result, out / "finetune.png")
    (lo, hi), (rlo, rhi) = result["accuracy_ci95"], result["random_init_accuracy_ci95"]
    print(f"finetune ({enc.adapter.name}, {mode}, fraction {top['label_fraction']:g}, {len(seeds)} seed(s)): "
          f"trained {result['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | random init "
          f"{result['random_init_accuracy']:.3f} [{rlo:.3f}, {rhi:.3f}] | {result['n_test']} test items | "
          f"{result['seconds']:.0f}s -> {out / 'finetune.json'}", file=sys.stdout, flush=True)
    return result


def plot_finetune(r: dict[str, Any], path: Path) -> None:
    """Left: test score per label fraction, trained against random init, with bootstrap 95% intervals.
    Right: validation score per epoch (mean over seeds), solid trained, dashed random init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = r["label_fractions"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4))
    x = torch.arange(len(rows)).float()
    w = 0.38
    for off, prefix, name, color in ((-w / 2, "", "trained", "tab:blue"),
                                     (w / 2, "random_init_", "random init", "tab:gray")):
        m = [row[f"{prefix}accuracy"] for row in rows]
        err = [[v - row[f"{prefix}accuracy_ci95"][0] for v, row in zip(m, rows)],
               [row[f"{prefix}accuracy_ci95"][1] - v for v, row in zip(m, rows)]]
        ax.bar((x + off).tolist(), m, w, yerr=[[max(e, 0.0) for e in err[0]], [max(e, 0.0) for e in err[1]]],
               capsize=3, color=color, label=name)
        for xi, v, row in zip((x + off).tolist(), m, rows):
            ax.text(xi, max(v, row[f"{prefix}accuracy_ci95"][1]) + 0.02, f"{v:.2f}", ha="center", fontsize=7)
    if not r["multi_label"]:
        ax.axhline(1.0 / max(r["num_classes"], 1), color="k", lw=0.8, ls="--", label="chance")
    ax.set_xticks(x.tolist(), [f"{row['label_fraction']:g}\n({row['n_train']})" for row in rows])
    ax.set_xlabel("label fraction (training items)")
    ax.set_ylabel(f"test {r['metric'].replace('_', ' ')}")
    ax.set_ylim(0, 1.08)
    ax.set_title(f"fine-tuning ({r['mode']}), {r['modality']}, 95% CI")
    ax.legend(fontsize=7, loc="upper left")
    cmap = plt.get_cmap("viridis")
    for i, row in enumerate(rows):
        c = cmap(i / max(len(rows) - 1, 1))
        for prefix, ls in (("", "-"), ("random_init_", "--")):
            curves = torch.tensor(row[f"{prefix}val_curve"])
            bx.plot(row["val_epochs"], curves.mean(0).tolist(), ls, color=c, marker=".",
                    label=f"fraction {row['label_fraction']:g}, {'trained' if not prefix else 'random init'}")
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    bx.set_xlabel("epoch")
    bx.set_ylabel(f"val {r['metric'].replace('_', ' ')}")
    bx.set_title("validation per epoch (mean over seeds)")
    bx.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
