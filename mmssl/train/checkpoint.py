"""Atomic checkpoints: safetensors weights, the optimizer state through torch.save (read back with
weights_only=True), RNG states and data positions as tensors/JSON. Nothing here unpickles code."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mmssl import faults
from mmssl.atomic import replace_dir
from mmssl.errors import (
    BadFileError,
    MissingFileError,
    read_json_object,
    read_safetensors,
    torch_load_weights,
)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's CPU generator and, on a GPU, only its own device's (each rank saves its own)."""
    s = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return s


def set_rng_state(s: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"], torch.cuda.current_device())


def tmp_dir(ckpt_root: Path, name: str) -> Path:
    return ckpt_root / f".tmp-{name}"


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    """Every rank writes its own RNG and data position into the shared temporary folder."""
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in rng_state().items()}, str(tmp / f"rng_rank{rank}.safetensors"))
    (tmp / f"state_rank{rank}.json").write_text(json.dumps(state))
    faults.point("ckpt_rank_state")


def finish(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
           names: list[str], ckpt_root: Path) -> None:
    """Rank 0: add weights, optimizer and meta, then move the folder into place under each name."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    faults.point("ckpt_weights")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    faults.point("ckpt_optimizer")
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
    for i, name in enumerate(names):
        dst = ckpt_root / name
        if i < len(names) - 1:
            src = tmp.with_name(tmp.name + f"-{name}")
            if src.exists():
                shutil.rmtree(src)
            shutil.copytree(tmp, src)
            replace_dir(src, dst)
        else:
            replace_dir(tmp, dst)


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder holds (its trainer.json), or None if unreadable."""
    try:
        return int(json.loads((path / "trainer.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find(ckpt_root: Path, name: str = "last") -> Path | None:
    for cand in (ckpt_root / name, ckpt_root / f"{name}.old"):
        if (cand / "trainer.json").exists():
            return cand
    return None


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, rank: int,
         device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights, optimizer and this rank's RNG; returns (trainer meta, this rank's state)."""
    meta = read_json_object(path / "trainer.json", "a checkpoint's trainer.json", ("step",))
    rng_file = path / f"rng_rank{rank}.safetensors"
    if not rng_file.exists():
        raise MissingFileError(path, f"no state for rank {rank}: resume with the same number of processes")
    rank_state = read_json_object(path / f"state_rank{rank}.json", "a checkpoint's per-rank state")
    state = read_safetensors(path / "model.safetensors", "a checkpoint's weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BadFileError(path / "model.safetensors", f"does not fit this run's model ({str(e).splitlines()[0]})") from None
    if optimizer is not None:
        saved = torch_load_weights(path / "optimizer.pt", "a checkpoint's optimizer state")
        try:
            optimizer.load_state_dict(saved)
        except (KeyError, ValueError, TypeError) as e:
            raise BadFileError(path / "optimizer.pt", f"does not fit this run's optimizer ({e})") from None
    set_rng_state(read_safetensors(rng_file, "a checkpoint's RNG state"))
    return meta, rank_state


def remove_stale_tmp(ckpt_root: Path) -> None:
    """Half-written checkpoints of a crashed run are temporary folders; clear them."""
    if ckpt_root.exists():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
    os.makedirs(ckpt_root, exist_ok=True)
