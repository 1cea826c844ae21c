"""Exports: ``encoders/<modality>/{model.safetensors,config.json}`` and ``heads/``; loading them back.

Only safetensors and JSON are read: nothing here can execute code from a file."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmssl.encoder import Encoder
from mmssl.factory import build_encoder


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_encoder(encoder: Encoder, out_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write an encoder export atomically (temporary folder, then rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    save_file(_state(encoder), str(tmp / "model.safetensors"))
    cfg = dict(encoder.config)  # type: ignore[attr-defined]
    cfg.update(extra or {})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    replace_dir(tmp, out_dir)
    return out_dir


def save_heads(heads: dict[str, nn.Module], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, h in heads.items():
        save_file(_state(h), str(out_dir / f"{name}.safetensors"))


def replace_dir(tmp: Path, dst: Path) -> None:
    """Move a finished folder into place; an old one is renamed aside first and removed after, so a
    crash leaves either the old or the new folder whole."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old.exists():
        shutil.rmtree(old)


def resolve_encoder_dir(path: Path, modality: str | None = None, which: str = "encoders") -> Path:
    """An export folder (with config.json) from an export or a run directory."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    root = path / which
    if not root.is_dir():
        old = root.with_name(root.name + ".old")
        if old.is_dir():
            root = old
        else:
            raise FileNotFoundError(f"{path} is neither an encoder export nor a run directory with {which}/")
    towers = sorted(p.name for p in root.iterdir() if (p / "config.json").exists())
    if not towers:
        raise FileNotFoundError(f"no encoder in {root}")
    if modality is None:
        if len(towers) > 1:
            raise ValueError(f"{path} has several towers; pass modality= one of: {', '.join(towers)}")
        modality = towers[0]
    if modality not in towers:
        raise ValueError(f"{path} has no {modality!r} encoder; choose one of: {', '.join(towers)}")
    return root / modality


def load_encoder(path: str | Path, modality: str | None = None, device: str | torch.device = "cpu",
                 which: str = "encoders") -> Encoder:
    """A ready Encoder (eval mode) from a run directory or an export.

    ``which="encoders_init"`` loads a run's step-0 weights (the probe's random-init baseline)."""
    d = resolve_encoder_dir(Path(path), modality, which)
    cfg = json.loads((d / "config.json").read_text())
    enc = build_encoder(cfg)
    state = load_file(str(d / "model.safetensors"))
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    enc.source = str(d)  # type: ignore[attr-defined]
    return enc.to(device).eval()
