"""Benchmark: a sweep of linear-probe variants on cached features (issue "Evaluators").

mmssl trains all variants together (``mmssl.eval.probe_sweep.train_sweep``: one matmul per feature
set for every variant, fused per-variant SGD updates). The reference is the usual way: one
``nn.Linear`` per variant trained after another with ``torch.optim.SGD`` (momentum 0.9, the same
cosine schedule, the same shuffles), as a plain PyTorch loop would. Both read the same cached
features: synthetic class-structured 768-d features (Gaussian class means in a random 64-d subspace
plus isotropic noise), 50,000 train / 10,000 validation items, 100 classes, 8 variants (4 rates x 2
weight decays), 100 epochs, batch 1,024. Reported: seconds per sweep (after one warm-up sweep on a
tenth of the epochs), the best validation accuracy, and the ratio reference/mmssl.

    python bench/probe_sweep.py --device cuda --out results.json
    python bench/probe_sweep.py --device cpu --smoke"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start, sync, use_source_tree, write_json

use_source_tree()
from mmssl.eval.probe_sweep import grid, train_sweep


def make_features(n_train: int, n_val: int, dim: int, classes: int, seed: int,
                  device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, 64, generator=g))[0]  # [dim, 64]
    means = torch.randn(classes, 64, generator=g) @ basis.T * 0.35  # [C, dim]

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(classes, (n,), generator=g)
        return means[y] + torch.randn(n, dim, generator=g), y

    xtr, ytr = draw(n_train)
    xva, yva = draw(n_val)
    return tuple(t.to(device) for t in (xtr, ytr, xva, yva))


def reference_sweep(xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor,
                    variants: list[Any], classes: int, epochs: int, batch: int, seed: int) -> torch.Tensor:
    """One nn.Linear per variant, trained one after another with torch.optim.SGD; -> val acc [V]."""
    device = xtr.device
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    n, accs = xtr.shape[0], []
    steps = math.ceil(n / batch)
    for v in variants:
        head = torch.nn.Linear(xtr.shape[1], classes).to(device)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.SGD([{"params": [head.weight], "weight_decay": v.wd},
                               {"params": [head.bias], "weight_decay": 0.0}], lr=v.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / (epochs * steps))))
        g = torch.Generator(device=device).manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(n, device=device, generator=g)
            for i in range(steps):
                idx = perm[i * batch:(i + 1) * batch]
                loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            accs.append((head(xva).argmax(1) == yva).float().mean())
    return torch.stack(accs).cpu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the code paths only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the epochs (e.g. a shorter CPU run)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device, cmd = start(a, argv, "bench/probe_sweep.py")
    if a.smoke:
        n_train, n_val, dim, classes, epochs, batch = 2000, 500, 64, 10, 5, 256
    else:
        n_train, n_val, dim, classes, epochs, batch = 50_000, 10_000, 768, 100, 100, 1024
    epochs = a.epochs or epochs
    lrs, wds = [0.01, 0.03, 0.1, 0.3], [0.0, 1e-4]
    variants = grid(["f"], lrs, wds)
    xtr, ytr, xva, yva = make_features(n_train, n_val, dim, classes, a.seed, device)
    res: dict[str, Any] = {"command": cmd, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                           else "cpu", "settings": {"n_train": n_train, "n_val": n_val, "dim": dim, "classes": classes,
                                                    "variants": len(variants), "epochs": epochs, "batch": batch,
                                                    "lrs": lrs, "wds": wds}, "sides": {}}

    def run_mmssl(ep: int) -> torch.Tensor:
        return train_sweep({"f": xtr}, ytr, {"f": xva}, yva, variants, classes, ep, batch, device, a.seed).val_accuracy

    def run_ref(ep: int) -> torch.Tensor:
        return reference_sweep(xtr, ytr, xva, yva, variants, classes, ep, batch, a.seed)

    for side, fn in (("mmssl", run_mmssl), ("ref", run_ref)):
        fn(max(1, epochs // 10))  # warm-up: kernels, allocator, cuBLAS handles
        sync(device)
        t0 = time.perf_counter()
        acc = fn(epochs)
        sync(device)
        res["sides"][side] = {"seconds": time.perf_counter() - t0, "val_accuracy": [float(x) for x in acc],
                              "best_val_accuracy": float(acc.max())}
    m, r = res["sides"]["mmssl"], res["sides"]["ref"]
    res["ratio_ref_over_mmssl"] = r["seconds"] / m["seconds"]
    res["max_val_acc_diff"] = max(abs(x - y) for x, y in zip(m["val_accuracy"], r["val_accuracy"]))
    res["under_10_s"] = m["seconds"] < 10.0
    print("| side | seconds per sweep | best val accuracy |\n|---|---|---|")
    for side in ("mmssl", "ref"):
        s = res["sides"][side]
        print(f"| {side} | {s['seconds']:.2f} | {s['best_val_accuracy']:.4f} |")
    print(f"ref/mmssl: {res['ratio_ref_over_mmssl']:.2f}x; largest per-variant val-accuracy difference "
          f"{res['max_val_acc_diff']:.4f}; device {res['device']}\n{cmd}")
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
