"""Hugging Face ``ViTModel`` and ``ViTMAEModel`` <-> mmssl image encoders.

Key map (transformers -> mmssl); l is a block:

  embeddings.patch_embeddings.projection.*            -> adapter.patch_embed.*
  embeddings.position_embeddings [1, 1 + G, D]        -> adapter.pos_embed = position_embeddings[:, 1:]
  embeddings.cls_token [1, 1, D]                      -> prefix = cls_token + position_embeddings[:, :1]
  embeddings.mask_token (ViTModel(use_mask_token))    -> mask_embedding (both replace the patch content
                                                         before positions are added)
  encoder.layer.l.layernorm_before.*, layernorm_after.* -> backbone.blocks.l.norm1.*, norm2.*
  encoder.layer.l.attention.attention.{query,key,value}.* -> backbone.blocks.l.attn.qkv.* (concatenated)
  encoder.layer.l.attention.output.dense.*            -> backbone.blocks.l.attn.proj.*
  encoder.layer.l.intermediate.dense.*, output.dense.* -> backbone.blocks.l.ffn.fc1.*, fc2.*
  layernorm.*                                         -> backbone.norm.*

transformers adds the CLS token's own position to it; adding it once into mmssl's ``prefix`` is exactly
equivalent, and on export the CLS position row is written as zeros. ``pixel_values`` are normalised
outside transformers' model (its image processor), inside mmssl's adapter: the image processor's
``image_mean`` / ``image_std`` become the adapter's ``mean`` / ``std``.

Left out on purpose: ``ViTModel``'s pooler (a tanh head on the CLS token; on export mmssl writes an
identity pooler with ``pooler_act="linear"``, so ``pooler_output`` is the final CLS token), a task
model's classifier, and ``ViTMAEForPreTraining``'s decoder. ViTMAE's random masking is the
objective's in mmssl: the encoder sees every patch (transformers' ``mask_ratio=0`` with ordered noise)."""
from __future__ import annotations

from importlib import resources
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from mmssl.convert.hf_io import Plan
from mmssl.errors import ConfigError
from mmssl.factory import encoder_config
from mmssl.sizes import SIZES

VISION_TYPES = {"vit": ("ViTModel", "vit."), "vit_mae": ("ViTMAEModel", "vit.")}
#: task heads and MAE's pretraining decoder, left out on purpose
VISION_HEADS = ("pooler.", "classifier.", "decoder.")
#: transformers' ViTImageProcessor default normalisation, used when the directory has no preprocessor_config.json
HF_VIT_MEAN, HF_VIT_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _refuse(what: str) -> ConfigError:
    return ConfigError(f"this Hugging Face image model cannot be converted exactly: {what}")


def vision_config_from_hf(hf: dict[str, Any], sd: dict[str, Tensor], pre: dict[str, Any] | None) -> dict[str, Any]:
    """An mmssl image ``encoder_config`` from a ViT / ViTMAE config.json, its weights (ViTMAE's fixed
    sin-cos table becomes ``position: sincos`` when it is exactly MAE's) and the image processor's
    preprocessor_config.json (mean and std)."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise _refuse(f"hidden_act={hf['hidden_act']!r}; mmssl uses gelu")
    if int(hf.get("num_channels", 3)) != 3:
        raise _refuse(f"num_channels={hf['num_channels']}; mmssl's images are RGB")
    side, patch = hf.get("image_size", 224), hf.get("patch_size", 16)
    if isinstance(side, (list, tuple)):
        if len(set(side)) != 1:
            raise _refuse(f"image_size {side} is not square")
        side = side[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    side, patch = int(side), int(patch)
    numbers = {"dim": int(hf["hidden_size"]), "depth": int(hf["num_hidden_layers"]),
               "heads": int(hf["num_attention_heads"]), "ffn_dim": int(hf["intermediate_size"])}
    size = next((n for n, s in SIZES.items() if s == numbers), None)
    image_cfg = OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality" / "image.yaml"))
    image_cfg.update(pool="cls", num_prefix=1)
    backbone = {**numbers, "norm_first": True, "eps": float(hf.get("layer_norm_eps", 1e-12)),
                "dropout": float(hf.get("hidden_dropout_prob", 0.0)),
                "attn_dropout": float(hf.get("attention_probs_dropout_prob", 0.0))}
    cfg = encoder_config("image", size or "base", image_cfg, backbone)
    if size is None:
        cfg["size"] = f"{numbers['depth']}x{numbers['dim']}"
    grid = side // patch
    position = "learned"
    if hf["model_type"] == "vit_mae":
        from mmssl.modalities.image.adapter import sincos_2d

        table = sd["embeddings.position_embeddings"][0]
        ref = sincos_2d(grid, grid, numbers["dim"]).to(table.dtype)
        if table.shape[0] == grid * grid + 1 and float(table[0].abs().max()) == 0.0 \
                and float((table[1:] - ref).abs().max()) < 1e-6:
            position = "sincos"  # MAE's fixed table: keep it fixed, as MAE does, in continued pretraining
    pre = pre or {}
    cfg["adapter"].update(patch_size=patch, image_size=side, position=position,
                          mean=[float(v) for v in pre.get("image_mean", HF_VIT_MEAN)],
                          std=[float(v) for v in pre.get("image_std", HF_VIT_STD)])
    return cfg


def vision_plan(depth: int, mask: bool) -> Plan:
    """(mmssl key, transformers keys) of the weights copied one to one (positions and CLS are
    ``vision_specials``'); ``mask``: the source has a mask token."""
    plan: Plan = []
    for p in ("weight", "bias"):
        plan.append((f"adapter.patch_embed.{p}", [f"embeddings.patch_embeddings.projection.{p}"]))
        plan.append((f"backbone.norm.{p}", [f"layernorm.{p}"]))
    for layer in range(depth):
        src, dst = f"encoder.layer.{layer}", f"backbone.blocks.{layer}"
        for p in ("weight", "bias"):
            plan.append((f"{dst}.norm1.{p}", [f"{src}.layernorm_before.{p}"]))
            plan.append((f"{dst}.norm2.{p}", [f"{src}.layernorm_after.{p}"]))
            plan.append((f"{dst}.attn.qkv.{p}", [f"{src}.attention.attention.{x}.{p}" for x in ("query", "key", "value")]))
            plan.append((f"{dst}.attn.proj.{p}", [f"{src}.attention.output.dense.{p}"]))
            plan.append((f"{dst}.ffn.fc1.{p}", [f"{src}.intermediate.dense.{p}"]))
            plan.append((f"{dst}.ffn.fc2.{p}", [f"{src}.output.dense.{p}"]))
    if mask:
        plan.append(("mask_embedding", ["embeddings.mask_token"]))
    return plan


def vision_specials_in(sd: dict[str, Tensor], cfg: dict[str, Any]) -> tuple[dict[str, Tensor], set[str]]:
    """The CLS token and positions (mmssl keys), zero qkv biases for ``qkv_bias=False``, and the
    transformers keys they used."""
    pos, cls = sd.get("embeddings.position_embeddings"), sd.get("embeddings.cls_token")
    if pos is None or cls is None:
        raise ValueError("cannot convert the ViT: no embeddings.position_embeddings / embeddings.cls_token")
    grid = cfg["adapter"]["image_size"] // cfg["adapter"]["patch_size"]
    if pos.shape[1] != grid * grid + 1:
        raise ValueError(f"position_embeddings has {pos.shape[1]} rows; image_size / patch_size give {grid * grid} + 1")
    out = {"prefix": cls + pos[:, :1]}
    if cfg["adapter"]["position"] == "learned":
        out["adapter.pos_embed"] = pos[:, 1:]
    dim = int(cfg["backbone"]["dim"])
    for layer in range(int(cfg["backbone"]["depth"])):
        if f"encoder.layer.{layer}.attention.attention.query.bias" not in sd:  # qkv_bias=False: zeros are exact
            for x in ("query", "key", "value"):
                sd[f"encoder.layer.{layer}.attention.attention.{x}.bias"] = torch.zeros(dim)
    return out, {"embeddings.position_embeddings", "embeddings.cls_token"}


def vit_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A transformers ``ViTModel`` config.json for an mmssl image ``encoder_config``."""
    a, b = cfg["adapter"], cfg["backbone"]
    return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": int(b["dim"]),
            "num_hidden_layers": int(b["depth"]), "num_attention_heads": int(b["heads"]),
            "intermediate_size": int(b["ffn_dim"]), "hidden_act": "gelu", "layer_norm_eps": float(b["eps"]),
            "hidden_dropout_prob": float(b["dropout"]), "attention_probs_dropout_prob": float(b["attn_dropout"]),
            "image_size": int(a["image_size"]), "patch_size": int(a["patch_size"]), "num_channels": 3,
            "qkv_bias": True, "encoder_stride": int(a["patch_size"]), "pooler_act": "linear",
            "pooler_output_size": int(b["dim"]), "dtype": "float32"}


def vit_preprocessor(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers' ViTImageProcessor settings that give mmssl's input: resize to the image size,
    [0, 255] -> [0, 1], then the adapter's mean and std."""
    a = cfg["adapter"]
    side = int(a["image_size"])
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": side, "width": side},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [float(v) for v in a.get("mean", HF_VIT_MEAN)],
            "image_std": [float(v) for v in a.get("std", HF_VIT_STD)]}


def vision_specials_out(state: dict[str, Tensor], cfg: dict[str, Any], positions: Tensor) -> dict[str, Tensor]:
    """CLS token, position table (the CLS row zero: its position is folded into the prefix) and an
    identity pooler, in transformers' names. positions: [1, G, D] the adapter's grid positions."""
    dim = int(cfg["backbone"]["dim"])
    prefix = state["prefix"]
    table = torch.cat([torch.zeros(1, 1, dim, dtype=positions.dtype), positions], 1)
    return {"embeddings.cls_token": prefix.detach().clone(), "embeddings.position_embeddings": table.detach().clone(),
            "pooler.dense.weight": torch.eye(dim), "pooler.dense.bias": torch.zeros(dim)}

