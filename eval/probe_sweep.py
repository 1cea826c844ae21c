"""Many linear probes trained together in one pass over cached features (DINOv2's linear evaluation).

Each variant is (feature key, learning rate, weight decay). Features are z-scored with the train
split's statistics; every variant's head is a slice of one ``[V, D, K]`` tensor, so a minibatch costs
one batched matmul for all variants, and all variants see the same shuffled minibatches. Optimiser:
SGD with momentum 0.9 and a cosine learning-rate schedule, as DINOv2's ``eval/linear.py``; each
variant has its own rate and decay, applied as vectors in one fused update (no Python loop over
variants). The best variant is chosen on the validation split only."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Variant:
    feature: str  # a feature key of the cache ("-1:cls", "3:mean", "baseline")
    lr: float
    wd: float

    def name(self) -> str:
        return f"{self.feature}|lr={self.lr:g}|wd={self.wd:g}"


@dataclass
class SweepResult:
    """val_accuracy: [V]; W: [V, D, K]; b: [V, K]; mean/std: per feature key, [D] (train statistics)."""

    variants: list[Variant]
    val_accuracy: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]

    @property
    def best(self) -> int:
        """Index of the best variant on validation (ties: the first, i.e. the stronger decay order
        given by the caller)."""
        return int(torch.argmax(self.val_accuracy))

    def predict(self, feats: dict[str, torch.Tensor], v: int | None = None) -> torch.Tensor:
        """Class predictions [n] of variant v (default: the best) on raw (un-normalised) features."""
        v = self.best if v is None else v
        key = self.variants[v].feature
        x = ((feats[key].to(self.W.device, torch.float32) - self.mean[key]) / self.std[key])
        return (x @ self.W[v] + self.b[v]).argmax(1)


def _lr_scale(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def train_sweep(train: dict[str, torch.Tensor], ytr: torch.Tensor, val: dict[str, torch.Tensor],
                yva: torch.Tensor, variants: list[Variant], num_classes: int, epochs: int = 100,
                batch_size: int = 1024, device: torch.device | str = "cpu", seed: int = 0,
                momentum: float = 0.9) -> SweepResult:
    """train/val: feature key -> [n, D] (all keys used by variants must share D); ytr/yva: [n] int64.

    Variants reading the same features share one matmul: their heads sit side by side as
    ``[D, Vg * K]``, so a step costs a handful of kernels however many rates and decays are swept."""
    device = torch.device(device)
    keys = sorted({v.feature for v in variants})
    dims = {train[k].shape[1] for k in keys}
    if len(dims) != 1:
        raise ValueError(f"variants of one sweep must share a feature width, got {sorted(dims)}: sweep each width apart")
    D, K, n = dims.pop(), int(num_classes), int(ytr.shape[0])
    y = ytr.to(device)
    g = torch.Generator(device=device).manual_seed(int(seed))
    mean, std, groups = {}, {}, []
    for k in keys:
        t = train[k].to(device, torch.float32)
        mean[k], std[k] = t.mean(0), t.std(0).clamp_min(1e-6)
        members = [i for i, v in enumerate(variants) if v.feature == k]
        Vg = len(members)
        groups.append({
            "key": k, "members": members, "x": (t - mean[k]) / std[k],
            "W": torch.zeros(D, Vg * K, device=device, requires_grad=True),
            "b": torch.zeros(Vg * K, device=device, requires_grad=True),
            "lr": torch.tensor([variants[i].lr for i in members], device=device).repeat_interleave(K),
            "wd": torch.tensor([variants[i].wd for i in members], device=device).repeat_interleave(K),
        })
        groups[-1]["mW"] = torch.zeros_like(groups[-1]["W"])
        groups[-1]["mb"] = torch.zeros_like(groups[-1]["b"])
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        perm = torch.randperm(n, device=device, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            yb = y[idx]
            scale = _lr_scale(step, total)
            for gr in groups:
                Vg = len(gr["members"])
                logits = torch.addmm(gr["b"], gr["x"][idx], gr["W"]).view(-1, Vg, K)  # [b, Vg, K]
                # the sum over variants of each one's mean loss: every head gets its own gradient
                loss = F.cross_entropy(logits.reshape(-1, K), yb.repeat_interleave(Vg), reduction="sum") / idx.numel()
                gW, gb = torch.autograd.grad(loss, (gr["W"], gr["b"]))
                with torch.no_grad():
                    gr["mW"].mul_(momentum).add_(gW + gr["wd"] * gr["W"])
                    gr["mb"].mul_(momentum).add_(gb)
                    gr["W"].sub_(gr["lr"] * scale * gr["mW"])
                    gr["b"].sub_(gr["lr"] * scale * gr["mb"])
            step += 1
    V = len(variants)
    W = torch.zeros(V, D, K, device=device)
    b = torch.zeros(V, K, device=device)
    accs = torch.zeros(V)
    yv = yva.to(device)
    with torch.no_grad():
        for gr in groups:
            Vg = len(gr["members"])
            xv = (val[gr["key"]].to(device, torch.float32) - mean[gr["key"]]) / std[gr["key"]]
            pred = torch.addmm(gr["b"], xv, gr["W"]).view(-1, Vg, K).argmax(2)  # [m, Vg]
            acc = (pred == yv[:, None]).float().mean(0).cpu()
            for j, v in enumerate(gr["members"]):
                W[v] = gr["W"].view(D, Vg, K)[:, j]
                b[v] = gr["b"].view(Vg, K)[j]
                accs[v] = acc[j]
    return SweepResult(variants, accs, W, b, mean, std)


def grid(features: list[str], lrs: list[float], wds: list[float]) -> list[Variant]:
    """Every (feature, lr, wd), in a fixed order (features, then decreasing decay, then rate)."""
    return [Variant(f, float(lr), float(wd)) for f in features for wd in sorted(wds, reverse=True)
            for lr in lrs]
