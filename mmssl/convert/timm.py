"""timm ViT weights (``VisionTransformer.state_dict()``, MAE-pretrained ones included) -> an mmssl
image encoder export.

Key map (timm -> mmssl); l is a block:

  patch_embed.proj.*             -> adapter.patch_embed.*
  pos_embed [1, P + G, D]        -> adapter.pos_embed = pos_embed[:, P:]   (G grid positions)
  cls_token, reg_token           -> prefix = cat(cls_token, reg_token) + pos_embed[:, :P]
  blocks.l.norm1.*               -> backbone.blocks.l.norm1.*
  blocks.l.attn.qkv.*            -> backbone.blocks.l.attn.qkv.*   (absent bias, qkv_bias=False: zeros)
  blocks.l.attn.proj.*           -> backbone.blocks.l.attn.proj.*
  blocks.l.norm2.*               -> backbone.blocks.l.norm2.*
  blocks.l.mlp.fc1.*, mlp.fc2.*  -> backbone.blocks.l.ffn.fc1.*, ffn.fc2.*
  norm.*  (global_pool='token')  -> backbone.norm.*, pool: cls
  fc_norm.* (global_pool='avg')  -> backbone.norm.*, pool: mean

timm adds the prefix tokens' own position embedding (``pos_embed[:, :P]``) to them before the blocks;
adding it once into the Encoder's ``prefix`` parameter is exactly equivalent. Models built with
``no_embed_class=True`` have no prefix positions (``pos_embed`` has G rows), and the prefix is the raw
tokens.

``fc_norm`` models (timm's ``global_pool='avg'``, MAE's fine-tuned ViTs) normalise the *pooled* patch
tokens, ``fc_norm(mean(x))``; mmssl's Encoder normalises each token then pools, ``mean(fc_norm(x))``.
Every block's output is the same, the pooled feature is not exactly timm's.

Skipped on purpose: the classifier ``head.*`` and, for a whole MAE pretraining state dict, its decoder
(``decoder_*``, ``mask_token``). Any other key not used, and any mmssl parameter left unfilled (layer
scale ``ls1/ls2``, ``norm_pre``, q/k norms, ...), is an error naming it.
"""
from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from mmssl.convert.common import count_indexed, load_state_dict, need
from mmssl.encoder import Encoder
from mmssl.export import save_encoder
from mmssl.factory import build_encoder, encoder_config
from mmssl.sizes import SIZES

#: heads and MAE's pretraining decoder around the encoder, skipped on purpose
SKIP_PREFIXES = ("head.", "decoder_", "mask_token")
#: timm's ViT presets' heads per width (tiny, small, base, large, huge): shapes cannot tell
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}




def _layout(sd: dict[str, Tensor]) -> dict[str, Any]:
    """Sizes, prefix tokens, position grid and final norm, read off the tensor shapes."""
    w = need(sd, "patch_embed.proj.weight", "patch size", " (not a timm ViT?)")
    if w.dim() != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {tuple(w.shape)}; mmssl needs [D, 3, p, p]")
    dim, patch = int(w.shape[0]), int(w.shape[2])
    n_prefix = sum(int(sd[k].shape[1]) for k in ("cls_token", "reg_token") if k in sd)
    pos = need(sd, "pos_embed", "position grid", " (not a timm ViT?)")
    rows = int(pos.shape[1])
    for n_pos_prefix in (n_prefix, 0):  # timm's default, then no_embed_class=True
        g = math.isqrt(rows - n_pos_prefix)
        if g * g == rows - n_pos_prefix and g > 0:
            break
    else:
        raise ValueError(f"pos_embed has {rows} rows: no square grid after {n_prefix} prefix tokens")
    has_norm, has_fc_norm = "norm.weight" in sd, "fc_norm.weight" in sd
    if has_norm == has_fc_norm:
        raise ValueError("expected exactly one final norm (norm.* for global_pool='token', fc_norm.* for "
                         f"global_pool='avg'); found {'both' if has_norm else 'neither'}")
    return {"dim": dim, "patch": patch, "grid": g, "n_prefix": n_prefix, "n_pos_prefix": n_pos_prefix,
            "depth": count_indexed(sd, "blocks"), "final_norm": "norm" if has_norm else "fc_norm",
            "ffn_dim": int(need(sd, "blocks.0.mlp.fc1.weight", "FFN width", " (not a timm ViT?)").shape[0])}


def infer_config(sd: dict[str, Tensor], size: str | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None) -> dict[str, Any]:
    """An mmssl image ``encoder_config`` for a timm ViT state dict.

    size: tiny | small | base, checked against the shapes; by default the size whose numbers match, or
    the shapes' own numbers (heads from timm's preset for the width). mean/std: the input normalisation
    the weights were trained with (ImageNet's by default; timm's augreg and CLIP weights use others)."""
    lay = _layout(sd)
    numbers = {"dim": lay["dim"], "depth": lay["depth"], "ffn_dim": lay["ffn_dim"]}
    if size is not None:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
        want = {k: SIZES[size][k] for k in numbers}
        if want != numbers:
            raise ValueError(f"the weights are {numbers}, not size {size!r} {want}")
        numbers["heads"] = SIZES[size]["heads"]
    else:
        if lay["dim"] not in HEADS_BY_WIDTH:
            raise ValueError(f"width {lay['dim']} is no timm ViT preset; pass size= explicitly")
        numbers["heads"] = HEADS_BY_WIDTH[lay["dim"]]
        size = next((n for n, s in SIZES.items() if s == numbers), None)
    fc_norm = lay["final_norm"] == "fc_norm"
    image_yaml = resources.files("mmssl.configs") / "modality" / "image.yaml"
    image_cfg = OmegaConf.to_container(OmegaConf.load(image_yaml))
    # pool: timm's token pooling reads the CLS token; fc_norm models (and class-token-free ones) average.
    image_cfg["pool"] = "cls" if "cls_token" in sd and not fc_norm else "mean"
    image_cfg["num_prefix"] = lay["n_prefix"]
    cfg = encoder_config("image", size or "base", image_cfg, numbers)
    if size is None:
        cfg["size"] = f"{lay['depth']}x{lay['dim']}"  # no mmssl size has these numbers: say what it is
    cfg["adapter"].update(patch_size=lay["patch"], image_size=lay["grid"] * lay["patch"], position="learned")
    if mean is not None:
        cfg["adapter"]["mean"] = [float(v) for v in mean]
    if std is not None:
        cfg["adapter"]["std"] = [float(v) for v in std]
    return cfg


def _problems(unused: list[str], unfilled: list[str]) -> ValueError:
    """One summary line (the CLI prints only the first line), then the full lists."""
    parts = []
    if unused:
        parts.append(f"{len(unused)} source keys not used ({', '.join(unused[:4])}"
                     f"{', ...' if len(unused) > 4 else ''})")
    if unfilled:
        parts.append(f"{len(unfilled)} mmssl keys not filled ({', '.join(unfilled[:4])}"
                     f"{', ...' if len(unfilled) > 4 else ''})")
    lines = ["cannot convert the timm ViT state dict: " + "; ".join(parts)]
    lines += [f"  unused source key: {k}" for k in unused] + [f"  unfilled mmssl key: {k}" for k in unfilled]
    return ValueError("\n".join(lines))


def _convert(sd: dict[str, Tensor], size: str | None, mean: list[float] | None, std: list[float] | None
             ) -> tuple[dict[str, Any], dict[str, Tensor], Encoder]:
    cfg = infer_config(sd, size, mean, std)
    lay = _layout(sd)
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    unfilled: list[str] = []

    def copy(dst: str, src: str) -> None:
        if src in sd:
            state[dst] = sd[src]
            used.add(src)
        else:
            unfilled.append(f"{dst} (needs {src})")

    for p in ("weight", "bias"):
        copy(f"adapter.patch_embed.{p}", f"patch_embed.proj.{p}")
        copy(f"backbone.norm.{p}", f"{lay['final_norm']}.{p}")
    pos = sd["pos_embed"]
    used.add("pos_embed")
    n_pos_prefix = lay["n_pos_prefix"]
    state["adapter.pos_embed"] = pos[:, n_pos_prefix:]
    if lay["n_prefix"]:
        tokens = [sd[k] for k in ("cls_token", "reg_token") if k in sd]
        used.update(k for k in ("cls_token", "reg_token") if k in sd)
        prefix = torch.cat(tokens, 1)
        state["prefix"] = prefix + pos[:, :n_pos_prefix] if n_pos_prefix else prefix
    # timm's qkv_bias=False: no bias tensors at all, which a zero bias reproduces exactly.
    no_qkv_bias = not any(re.fullmatch(r"blocks\.\d+\.attn\.qkv\.bias", k) for k in sd)
    for layer in range(lay["depth"]):
        src, dst = f"blocks.{layer}", f"backbone.blocks.{layer}"
        for p in ("weight", "bias"):
            for a, b in (("norm1", "norm1"), ("attn.proj", "attn.proj"), ("norm2", "norm2"),
                         ("mlp.fc1", "ffn.fc1"), ("mlp.fc2", "ffn.fc2")):
                copy(f"{dst}.{b}.{p}", f"{src}.{a}.{p}")
            if p == "bias" and no_qkv_bias:
                state[f"{dst}.attn.qkv.bias"] = torch.zeros(3 * lay["dim"])
            else:
                copy(f"{dst}.attn.qkv.{p}", f"{src}.attn.qkv.{p}")
    unused = sorted(k for k in sd if k not in used and not k.startswith(SKIP_PREFIXES))
    if unused or unfilled:
        raise _problems(unused, unfilled)

    enc = build_encoder(cfg)
    template = enc.state_dict()
    if "mask_embedding" not in state:
        # timm has no mask embedding (mask_mode=replace); HuBERT's uniform init, seeded so that
        # converting the same file twice gives the same export.
        state["mask_embedding"] = torch.rand(lay["dim"], generator=torch.Generator().manual_seed(0))
    unfilled = [k for k in template if k not in state]
    unfilled += [f"{k} (shape {tuple(state[k].shape)}, mmssl needs {tuple(template[k].shape)})"
                 for k in state if k in template and state[k].shape != template[k].shape]
    unused = [f"{k} (no such mmssl key)" for k in state if k not in template]
    if unused or unfilled:
        raise _problems(unused, unfilled)
    out = {k: state[k].to(v.dtype).contiguous() for k, v in template.items()}
    return cfg, out, enc


def convert_timm_state_dict(sd: dict[str, Tensor], size: str | None = None, mean: list[float] | None = None,
                            std: list[float] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A timm ``VisionTransformer`` state dict -> (mmssl ``encoder_config``, mmssl ``Encoder`` state dict
    that loads with strict=True). Raises ValueError naming every source key not used and every mmssl
    parameter not filled."""
    cfg, state, _ = _convert(sd, size, mean, std)
    return cfg, state


def convert_timm(src: Path, out: Path, size: str | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None) -> Path:
    """Convert a timm ViT state dict saved with torch.save (or a checkpoint holding one under ``model``
    or ``state_dict``, as MAE's) into an mmssl encoder export folder ``out``, loadable with
    ``mmssl.load_encoder(out)``."""
    src, out = Path(src), Path(out)
    sd = load_state_dict(src)
    _, state, enc = _convert(sd, size, mean, std)
    enc.load_state_dict(state, strict=True)
    skipped = sorted({k.split(".")[0] for k in sd if k.startswith(SKIP_PREFIXES)})
    extra = {"converted_from": "timm.vit", "source": str(src), "skipped": skipped}
    return save_encoder(enc, out, extra=extra)
