"""Fine-tuning's model: the encoder under a linear head (``Classifier``), drop path, the AdamW parameter
groups of layer-wise learning-rate decay (BEiT), and which parameters train in each ``eval.mode``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmssl.encoder import Encoder
from mmssl.eval.protocol import eval_defaults
from mmssl.lora import apply_lora, count_trainable, mark_only_lora_trainable
from mmssl.types import Batch

#: parameter names that are tokens or tables rather than weights: no weight decay (timm's no_weight_decay)
NO_DECAY_NAMES = ("prefix", "mask_embedding", "pos_embed", "position_embedding")
#: recipe values a direct caller of the fine-tuning functions may leave out: they come from
#: configs/eval/finetune.yaml. The recipe's switches (min_steps, warmup_epochs, drop_path, label_smoothing,
#: clip_grad, min_lr, augment, freeze_first, tune_last, lora_lr, lora_train_norms) are off when absent or
#: null; epochs, lr and batch_size are required. ``run_finetune`` passes the whole yaml (``eval_config``).
VALUES = ("mode", "head_norm", "layer_decay", "weight_decay", "lora_rank", "lora_alpha", "lora_dropout")


def recipe(ecfg: dict[str, Any]) -> dict[str, Any]:
    """``ecfg`` with the ``VALUES`` it lacks taken from configs/eval/finetune.yaml."""
    packaged = eval_defaults("finetune")
    return {**{k: packaged[k] for k in VALUES}, **ecfg}


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
    ecfg = recipe(ecfg)
    enc = model.encoder
    depth = enc.depth
    mode = str(ecfg["mode"])
    freeze_first = int(ecfg.get("freeze_first") or 0)
    tune_last = ecfg.get("tune_last")
    lora_layers: list[str] = []
    if mode == "lora":
        if freeze_first or tune_last is not None:
            raise ValueError("eval.freeze_first / eval.tune_last apply to eval.mode=full, not lora")
        lora_layers = apply_lora(enc.backbone, ("qkv", "proj"), int(ecfg["lora_rank"]),
                                 float(ecfg["lora_alpha"]), float(ecfg["lora_dropout"]))
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

