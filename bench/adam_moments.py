"""Adam's second moments at the end of a run, per encoder part, against the optimizer's eps.

    python bench/adam_moments.py RUN [RUN ...]

Adam divides each update by sqrt(v) + eps. Where a parameter's gradients are as small as eps, eps, not
the gradient's scale, sets the step, and the effective learning rate shrinks by sqrt(v) / (sqrt(v) + eps).
Small-scale losses (Chamfer distances of unit-ball coordinates, voxel errors) give such gradients. The
script reads ``checkpoints/last/optimizer.pt`` (tensors only: ``torch.load(weights_only=True)``), matches
its state to the parameter names (in the order of the trainer's ``param_groups``) and prints, per group of parameters, the median sqrt(v) and the
factor eps leaves of the step."""
from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

from mmssl.run import load_run_objective
from mmssl.train.trainer import param_groups


def group_name(name: str) -> str:
    name = re.sub(r"^towers\.[^.]+\.", "encoder.", name)
    name = re.sub(r"\.blocks\.\d+\.", ".blocks.*.", name)
    return re.sub(r"\.(weight|bias)$", "", name)


def report(run: Path) -> None:
    obj = load_run_objective(run)
    by_id = {id(p): n for n, p in obj.named_parameters()}
    # the optimizer's order: the trainer's parameter groups (decayed matrices, then vectors)
    names = [by_id[id(p)] for g in param_groups(obj, 0.0) for p in g["params"]]
    opt = torch.load(run / "checkpoints" / "last" / "optimizer.pt", weights_only=True, map_location="cpu")
    state, groups = opt["state"], opt["param_groups"]
    eps = float(groups[0]["eps"])
    order = [i for g in groups for i in g["params"]]
    if len(order) != len(names):
        raise SystemExit(f"{run}: {len(order)} optimizer parameters but {len(names)} trainable ones")
    rms: dict[str, list[torch.Tensor]] = defaultdict(list)
    for i, name in zip(order, names, strict=True):
        if i in state and "exp_avg_sq" in state[i]:
            rms[group_name(name)].append(state[i]["exp_avg_sq"].sqrt().flatten())
    print(f"\n{run} ({type(obj).__name__}, eps {eps:g})\n")
    print("| parameters | median sqrt(v) | step kept, median sqrt(v) / (sqrt(v) + eps) |")
    print("|---|---:|---:|")
    for g, parts in rms.items():
        med = float(torch.cat(parts).median())
        print(f"| {g} | {med:.2e} | {med / (med + eps):.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for r in sys.argv[1:]:
        report(Path(r))
