"""mmssl image encoders -> a timm ``VisionTransformer``: ``model.safetensors`` (the state dict) and
``timm.json`` (the ``timm.create_model`` arguments), loaded with

    a = json.load(open(OUT / "timm.json"))
    model = timm.create_model(a["model_name"], pretrained=True, **a["kwargs"],
                              pretrained_cfg_overlay={**a["pretrained_cfg_overlay"], "file": str(OUT / "model.safetensors")})

(``pretrained=True`` with a ``file`` overlay makes timm read that local file; nothing is downloaded.)

Key map (mmssl -> timm; the inverse of ``mmssl.convert.timm``): adapter.patch_embed -> patch_embed.proj,
the adapter's grid positions -> pos_embed (``no_embed_class=True``: the prefix tokens carry their own
position inside mmssl's ``prefix``), prefix -> cls_token (+ reg_token), backbone.blocks.l.{norm1, attn.qkv,
attn.proj, norm2, ffn.fc1, ffn.fc2} -> blocks.l.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
backbone.norm -> norm. Pooling: cls -> ``global_pool='token'``; mean / max -> ``'avg'`` / ``'max'`` with
``fc_norm=False`` (timm then normalises every token before pooling, as mmssl does). No classifier
(``num_classes=0``): ``forward_features`` gives the tokens, ``forward_head(pre_logits=True)`` or
``model(x)`` mmssl's ``embed``. A sin-cos table is written as timm's (learned) ``pos_embed``: the same
values at the stored image size.

Refused in one line: non-image encoders, post-norm ones and a LayerNorm eps other than timm's 1e-6."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mmssl.atomic import make_tmp_dir, replace_dir
from mmssl.encoder import Encoder
from mmssl.errors import ConfigError
from mmssl.export import load_encoder

#: timm's named ViTs whose numbers are mmssl's sizes (width, depth, heads, FFN)
TIMM_NAMES = {(192, 12, 3, 768): "vit_tiny", (384, 12, 6, 1536): "vit_small", (768, 12, 12, 3072): "vit_base",
              (1024, 24, 16, 4096): "vit_large"}
POOLS = {"cls": "token", "mean": "avg", "max": "max"}


def _refuse(what: str) -> ConfigError:
    return ConfigError(f"cannot export to timm exactly: {what}")


def timm_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"model_name", "kwargs", "pretrained_cfg_overlay"}`` (add ``file=``) of an mmssl image ``encoder_config``."""
    a, b = cfg["adapter"], cfg["backbone"]
    dim, depth, heads, ffn = int(b["dim"]), int(b["depth"]), int(b["heads"]), int(b["ffn_dim"])
    patch, side = int(a["patch_size"]), int(a["image_size"])
    n_prefix = int(cfg.get("num_prefix", 0))
    base = TIMM_NAMES.get((dim, depth, heads, ffn), "vit_base")
    kwargs = {"img_size": side, "patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads,
              "mlp_ratio": ffn / dim, "qkv_bias": True, "class_token": n_prefix >= 1,
              "reg_tokens": max(n_prefix - 1, 0), "no_embed_class": True, "global_pool": POOLS[cfg.get("pool", "mean")],
              "fc_norm": False, "num_classes": 0}
    if cfg.get("pool") == "cls" and n_prefix == 0:
        raise _refuse("pool=cls without a prefix token")
    overlay = {"mean": [float(v) for v in a["mean"]], "std": [float(v) for v in a["std"]],
               "input_size": [3, side, side], "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0}
    # any registered ViT name builds the model (kwargs set every number); the matching one reads better
    name = f"{base}_patch16_224" if (patch, side) == (16, 224) else "vit_base_patch16_224"
    return {"model_name": name, "kwargs": kwargs, "pretrained_cfg_overlay": overlay}


def timm_state(enc: Encoder) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's names (module docstring)."""
    s = enc.state_dict()
    cfg = enc.config
    out = {"patch_embed.proj.weight": s["adapter.patch_embed.weight"], "patch_embed.proj.bias": s["adapter.patch_embed.bias"],
           "pos_embed": enc.adapter.positions(*enc.adapter.grid).detach(),
           "norm.weight": s["backbone.norm.weight"], "norm.bias": s["backbone.norm.bias"]}
    n_prefix = int(cfg.get("num_prefix", 0))
    if n_prefix:
        out["cls_token"] = s["prefix"][:, :1]
        if n_prefix > 1:
            out["reg_token"] = s["prefix"][:, 1:]
    for layer in range(int(cfg["backbone"]["depth"])):
        src, dst = f"backbone.blocks.{layer}", f"blocks.{layer}"
        for p in ("weight", "bias"):
            for a, b in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("norm2", "norm2"),
                         ("ffn.fc1", "mlp.fc1"), ("ffn.fc2", "mlp.fc2")):
                out[f"{dst}.{b}.{p}"] = s[f"{src}.{a}.{p}"]
    return {k: v.detach().float().clone().contiguous() for k, v in out.items()}


def export_timm(run: Path, out: Path, kv: dict[str, str]) -> Path:
    """``mmssl export timm RUN OUT [modality=M]``: the run's image encoder as a timm ViT."""
    enc = load_encoder(run, modality=kv.get("modality"))
    cfg = enc.config
    if cfg.get("open_clip"):
        raise _refuse("an open_clip tower; nearest: open_clip loads its weights (encoders/<m>/model.safetensors)")
    if cfg["modality"] != "image":
        raise _refuse(f"timm holds image models, this is a {cfg['modality']} encoder; nearest: mmssl export hf "
                      f"(speech: HubertModel)")
    if not cfg["backbone"]["norm_first"]:
        raise _refuse("a post-norm image encoder (norm_first=false): timm's ViT is pre-norm")
    if float(cfg["backbone"]["eps"]) != 1e-6:
        raise _refuse(f"LayerNorm eps {cfg['backbone']['eps']}: timm's ViT fixes 1e-6; nearest: mmssl export hf "
                      f"(ViTModel takes layer_norm_eps)")
    ffn, dim = int(cfg["backbone"]["ffn_dim"]), int(cfg["backbone"]["dim"])
    if int(dim * (ffn / dim)) != ffn:
        raise _refuse(f"FFN width {ffn} is no mlp_ratio of width {dim} in timm")
    args = timm_args(cfg)
    args["mmssl_source"] = str(run)
    out = Path(out)
    tmp = make_tmp_dir(out)
    try:
        save_file(timm_state(enc), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "timm.json").write_text(json.dumps(args, indent=2))
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
