"""A whole trained objective back from its run directory (encoders, heads, decoders), for tools that need
more than the encoders: reconstructing what MAE's decoder predicts, inspecting heads.

Built from the run's own record (``config.yaml`` and each tower's exported ``config.json``) and loaded
strictly from ``checkpoints/<name>/model.safetensors``: safetensors and JSON/YAML only."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mmssl.factory import build_encoder, build_objective
from mmssl.objectives.base import Objective


def load_run_objective(run_dir: str | Path, checkpoint: str = "last",
                       device: str | torch.device = "cpu") -> Objective:
    """The objective of ``run_dir`` with the weights of ``checkpoints/<checkpoint>``, in eval mode."""
    run = Path(run_dir)
    ckpt = run / "checkpoints" / checkpoint / "model.safetensors"
    if not (run / "config.yaml").exists() or not ckpt.exists():
        raise FileNotFoundError(f"{run} is not a run directory with config.yaml and checkpoints/{checkpoint}/")
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    mods = list(cfg["modality"])
    # each tower exactly as exported (its config.json), so the rebuilt shapes are the trained ones
    encoders = {m: build_encoder(json.loads((run / "encoders_init" / m / "config.json").read_text())) for m in mods}
    obj = build_objective(cfg["objective"]["name"], cfg["objective"], encoders, cfg["modality"])
    from mmssl.train.trainer import apply_peft  # a trainer.peft run's checkpoint holds LoRA factors

    apply_peft(obj, cfg["trainer"])
    obj.load_state_dict(load_file(str(ckpt)), strict=True)
    return obj.to(device).eval()
