"""One fine-tuning run: losses and per-item scores, the optimizer and schedule (AdamW over the
layer-decayed groups, linear warm-up then cosine per step, ``eval.min_steps``), the training loop, and
the epoch chosen on validation scoring the test split."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmssl.data.loader import DataSource
from mmssl.encoder import Encoder
from mmssl.eval.finetune_data import SplitData, batches_per_epoch, epoch_batches, to_device
from mmssl.eval.finetune_model import Classifier, configure_trainable, param_groups, recipe, set_drop_path
from mmssl.train.schedule import lr_factor
from mmssl.types import Batch


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


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def predict(model: Classifier, batches: list[Batch], device: torch.device) -> torch.Tensor:
    """-> logits [n, K] float32 on the CPU, in batch order."""
    model.eval()
    out = []
    with _autocast(device):
        for b in batches:
            out.append(model(to_device(b, device)).float().cpu())
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
    ecfg = recipe(ecfg)
    lr = float(ecfg["lora_lr"]) if ecfg["mode"] == "lora" and ecfg.get("lora_lr") else float(ecfg["lr"])
    groups = param_groups(model, float(ecfg["weight_decay"]), float(ecfg["layer_decay"]))
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
    per_epoch = batches_per_epoch(n, int(ecfg["batch_size"]))
    epochs = max(planned, -(-int(ecfg.get("min_steps") or 0) // per_epoch))
    warmup = round(float(ecfg.get("warmup_epochs") or 0.0) / planned * epochs * per_epoch)
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
    ecfg = recipe(ecfg)
    torch.manual_seed(seed)  # head init, drop path, dropout, LoRA init and views draw from it
    model = Classifier(encoder, num_outputs, str(ecfg["head_norm"]))
    set_drop_path(encoder, float(ecfg.get("drop_path") or 0.0))
    counts = configure_trainable(model, ecfg)
    model.to(device)
    opt, lr = build_optimizer(model, ecfg)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    bs = int(ecfg["batch_size"])
    epochs, steps_per_epoch, warmup, val_every = run_length(len(items), ecfg)
    total = epochs * steps_per_epoch
    min_factor = float(ecfg.get("min_lr") or 0.0) / lr
    smoothing, clip = float(ecfg.get("label_smoothing") or 0.0), float(ecfg.get("clip_grad") or 0.0)
    augment = bool(ecfg.get("augment"))
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
            b = to_device(batch, device)
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


