"""Hugging Face ``CLIPModel`` -> a pair of open_clip towers (mmssl's ``OpenClipTower``) and a
contrastive head: a directory laid out as a contrastive run (``encoders/{image,text}``, ``heads/``),
which ``mmssl.export.load_pair`` and ``mmssl eval retrieval|zero-shot encoder=OUT`` read.

transformers' CLIP is open_clip's architecture (pre-LayerNorm on the patch tokens, quick-GELU or GELU,
a causal text transformer pooled at the end-of-text token, bias-free projections), so each tower is
open_clip's own module and the weights move by name:

  vision_model.embeddings.class_embedding            -> visual.class_embedding
  vision_model.embeddings.patch_embedding.weight     -> visual.conv1.weight
  vision_model.embeddings.position_embedding.weight  -> visual.positional_embedding
  vision_model.pre_layrnorm.*, post_layernorm.*      -> visual.ln_pre.*, visual.ln_post.*
  visual_projection.weight [E, W]                    -> visual.proj [W, E] (transposed)
  text_model.embeddings.token_embedding.weight       -> text.token_embedding.weight
  text_model.embeddings.position_embedding.weight    -> text.positional_embedding
  text_model.final_layer_norm.*                      -> text.ln_final.*
  text_projection.weight [E, W]                      -> text.text_projection [W, E] (transposed)
  {vision,text}_model.encoder.layers.l.layer_norm1.*, layer_norm2.* -> {visual,text}.transformer.resblocks.l.ln_1.*, ln_2.*
  ...self_attn.{q,k,v}_proj.*                        -> ...attn.in_proj_weight / in_proj_bias (concatenated)
  ...self_attn.out_proj.*                            -> ...attn.out_proj.*
  ...mlp.fc1.*, mlp.fc2.*                            -> ...mlp.c_fc.*, mlp.c_proj.*
  logit_scale                                        -> heads/contrastive: log_scale

The text tower reads open_clip BPE ids (mmssl's text codec), which are CLIP's tokenizer's ids; it pools at
the largest id (the end-of-text token 49407), where transformers pools at the first ``eos_token_id``."""
from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from mmssl.convert.hf_io import Plan, plan_in
from mmssl.errors import ConfigError
from mmssl.factory import build_encoder, encoder_config

#: the two towers: mmssl modality, transformers prefix, open_clip prefix
TOWERS = (("image", "vision_model", "visual"), ("text", "text_model", "text"))
EOT_ID, VOCAB = 49407, 49408


def _refuse(what: str) -> ConfigError:
    return ConfigError(f"this Hugging Face CLIP cannot be converted exactly: {what}")


def open_clip_model_cfg(hf: dict[str, Any]) -> dict[str, Any]:
    """open_clip's model config ({embed_dim, quick_gelu, vision_cfg, text_cfg}) of a CLIPModel config.json."""
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise _refuse(f"hidden_act {sorted(acts)}; open_clip's towers share one of quick_gelu or gelu")
    for name, c in (("vision", v), ("text", t)):
        if float(c.get("layer_norm_eps", 1e-5)) != 1e-5:
            raise _refuse(f"{name} layer_norm_eps={c['layer_norm_eps']}; open_clip uses 1e-5")
    if int(t.get("vocab_size", VOCAB)) != VOCAB:
        raise _refuse(f"vocab_size={t['vocab_size']}; mmssl's text codec is CLIP's BPE ({VOCAB} ids)")
    if int(t.get("eos_token_id", EOT_ID)) not in (EOT_ID, 2):  # 2: old configs, which pool at the largest id too
        raise _refuse(f"eos_token_id={t['eos_token_id']}; the text tower pools at CLIP's end-of-text {EOT_ID}")
    vw, tw = int(v.get("hidden_size", 768)), int(t.get("hidden_size", 512))
    return {"embed_dim": int(hf.get("projection_dim", 512)), "quick_gelu": acts == {"quick_gelu"},
            "vision_cfg": {"layers": int(v.get("num_hidden_layers", 12)), "width": vw,
                           "head_width": vw // int(v.get("num_attention_heads", 12)),
                           "mlp_ratio": int(v.get("intermediate_size", 3072)) / vw,
                           "patch_size": int(v.get("patch_size", 32)), "image_size": int(v.get("image_size", 224))},
            "text_cfg": {"context_length": int(t.get("max_position_embeddings", 77)), "vocab_size": VOCAB,
                         "width": tw, "heads": int(t.get("num_attention_heads", 8)),
                         "layers": int(t.get("num_hidden_layers", 12)),
                         "mlp_ratio": int(t.get("intermediate_size", 2048)) / tw}}


def clip_plan(model_cfg: dict[str, Any]) -> dict[str, Plan]:
    """Per tower: (open_clip key of the tower, transformers keys)."""
    out: dict[str, Plan] = {}
    for modality, hf, _ in TOWERS:
        layers = int(model_cfg["vision_cfg" if modality == "image" else "text_cfg"]["layers"])
        plan: Plan = []
        for i in range(layers):
            s, d = f"{hf}.encoder.layers.{i}", f"transformer.resblocks.{i}"
            plan.append((f"{d}.attn.in_proj_weight", [f"{s}.self_attn.{x}_proj.weight" for x in "qkv"]))
            plan.append((f"{d}.attn.in_proj_bias", [f"{s}.self_attn.{x}_proj.bias" for x in "qkv"]))
            for p in ("weight", "bias"):
                plan += [(f"{d}.attn.out_proj.{p}", [f"{s}.self_attn.out_proj.{p}"]),
                         (f"{d}.ln_1.{p}", [f"{s}.layer_norm1.{p}"]), (f"{d}.ln_2.{p}", [f"{s}.layer_norm2.{p}"]),
                         (f"{d}.mlp.c_fc.{p}", [f"{s}.mlp.fc1.{p}"]), (f"{d}.mlp.c_proj.{p}", [f"{s}.mlp.fc2.{p}"])]
        if modality == "image":
            plan += [("class_embedding", [f"{hf}.embeddings.class_embedding"]),
                     ("conv1.weight", [f"{hf}.embeddings.patch_embedding.weight"]),
                     ("positional_embedding", [f"{hf}.embeddings.position_embedding.weight"])]
            plan += [(f"ln_{n}.{p}", [f"{hf}.{h}.{p}"]) for n, h in (("pre", "pre_layrnorm"), ("post", "post_layernorm"))
                     for p in ("weight", "bias")]
        else:
            plan += [("token_embedding.weight", [f"{hf}.embeddings.token_embedding.weight"]),
                     ("positional_embedding", [f"{hf}.embeddings.position_embedding.weight"])]
            plan += [(f"ln_final.{p}", [f"{hf}.final_layer_norm.{p}"]) for p in ("weight", "bias")]
        out[modality] = plan
    return out


def tower_configs(hf: dict[str, Any], pre: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """mmssl encoder configs of the two open_clip towers (open_clip entry with the written-out model config;
    the image processor's mean and std)."""
    model_cfg = open_clip_model_cfg(hf)
    out = {}
    for modality, _, _ in TOWERS:
        mcfg = OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality" / f"{modality}.yaml"))
        oc = {"model": "hf-clip", "model_cfg": model_cfg, "weights": None}
        if modality == "image" and pre:
            oc.update(mean=[float(x) for x in pre.get("image_mean", [])] or None,
                      std=[float(x) for x in pre.get("image_std", [])] or None)
        mcfg["open_clip"] = oc
        out[modality] = encoder_config(modality, "base", mcfg)
        out[modality]["size"] = "hf-clip"
    return out


def clip_towers(hf: dict[str, Any], sd: dict[str, Tensor], pre: dict[str, Any] | None) -> dict[str, Any]:
    """(modality -> OpenClipTower with the CLIP's weights), plus the logit scale under ``"logit_scale"``."""
    cfgs = tower_configs(hf, pre)
    plans = clip_plan(open_clip_model_cfg(hf))
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    # the projections are transposed (open_clip multiplies x @ proj); position ids are buffers
    state = plan_in(sd, [(f"{m}.{k}", s) for m, p in plans.items() for k, s in p]
                    + [("image.proj", ["visual_projection.weight"]), ("text.text_projection", ["text_projection.weight"]),
                       ("logit_scale", ["logit_scale"])], (), "Hugging Face CLIPModel")
    towers: dict[str, Any] = {}
    for modality, _, _ in TOWERS:
        tower = build_encoder(cfgs[modality])
        own = {k.removeprefix(modality + "."): v for k, v in state.items() if k.startswith(modality + ".")}
        own = {k: v.T.contiguous() if k in ("proj", "text_projection") else v for k, v in own.items()}
        missing, unexpected = tower.tower.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(f"cannot convert the Hugging Face CLIPModel's {modality} tower: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        towers[modality] = tower.eval()
    towers["logit_scale"] = float(state["logit_scale"])
    return towers


def write_clip_pair(hf: dict[str, Any], sd: dict[str, Tensor], pre: dict[str, Any] | None, out: Path,
                    src: Path) -> Path:
    """Write the pair as a contrastive run directory: ``encoders/`` and ``heads/`` hold the CLIP, and
    ``encoders_init/`` + ``heads_init/`` the same architecture freshly initialised (seed 0), the
    random-init twin every retrieval and zero-shot result reports beside the trained numbers."""
    from mmssl.atomic import make_tmp_dir, replace_dir
    from mmssl.export import save_encoder, save_heads
    from mmssl.objectives.contrastive import ContrastiveHead

    towers = clip_towers(hf, sd, pre)
    log_scale = towers.pop("logit_scale")
    dims = {m: int(t.dim) for m, t in towers.items()}
    head_cfg = {"loss": "clip", "embed_dim": next(iter(dims.values())), "identity": sorted(dims),
                "init_logit_scale": math.exp(log_scale)}
    head = ContrastiveHead(dims, head_cfg)
    with torch.no_grad():
        head.log_scale.fill_(log_scale)  # exactly the file's log, not log(exp(.))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp_dir(out)
    try:
        extra = {"converted_from": "transformers.CLIPModel", "source": str(src)}
        for m, t in towers.items():
            save_encoder(t, tmp / "encoders" / m, extra=extra)
        save_heads({"contrastive": head}, tmp / "heads")
        torch.manual_seed(0)
        for m, t in towers.items():
            save_encoder(build_encoder(t.config), tmp / "encoders_init" / m, extra={"init": "fresh_init_seed0"})
        save_heads({"contrastive": ContrastiveHead(dims, {**head_cfg, "init_logit_scale": 1 / 0.07})}, tmp / "heads_init")
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out
