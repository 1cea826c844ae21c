"""Hugging Face ``HubertModel``, ``Wav2Vec2Model`` and ``Data2VecAudioModel`` <-> mmssl speech encoders.

The three share one layout (transformers names -> mmssl names; i a conv layer, l a block):

  feature_extractor.conv_layers.i.conv.*             -> adapter.feature_extractor.conv_layers.i.conv.*
  feature_extractor.conv_layers.i.layer_norm.*       -> adapter.feature_extractor.conv_layers.i.norm.*
                                                        (layer 0's GroupNorm(C, C) under feat_extract_norm=group)
  feature_projection.layer_norm.*, .projection.*     -> adapter.feature_norm.*, adapter.feature_proj.*
  encoder.pos_conv_embed.conv.{bias, parametrizations.weight.original0|1 (or weight_g|weight_v)}
                                                     -> adapter.content_position.conv.*   (HuBERT, wav2vec 2.0)
  encoder.pos_conv_embed.layers.j.conv.*             -> adapter.content_position.convs.j.* (data2vec audio)
  encoder.layer_norm.*                               -> backbone.norm.*
  encoder.layers.l.attention.{q,k,v}_proj.*          -> backbone.blocks.l.attn.qkv.*  (concatenated)
  encoder.layers.l.attention.out_proj.*              -> backbone.blocks.l.attn.proj.*
  encoder.layers.l.layer_norm.*, final_layer_norm.*  -> backbone.blocks.l.norm1.*, norm2.*
  encoder.layers.l.feed_forward.intermediate_dense.*, output_dense.* -> backbone.blocks.l.ffn.fc1.*, fc2.*
  masked_spec_embed                                  -> mask_embedding

``do_stable_layer_norm`` is mmssl's ``norm_first`` (pre-norm blocks, the final LayerNorm after the last
block); ``feat_extract_norm`` group / layer is ``frontend_norm`` group_norm / layer_norm.

One difference is by design: mmssl's first-layer group norm (and data2vec's position stack) keep
padding out of their statistics, so a padded utterance gets the features it gets alone; transformers'
group-norm models count the padding. Per utterance (unpadded input, how transformers says to feed
group-norm models) the two are equal; in a padded batch only the layer-norm models agree."""
from __future__ import annotations

from importlib import resources
from typing import Any

from omegaconf import OmegaConf

from mmssl.convert.hf_io import Plan
from mmssl.errors import ConfigError
from mmssl.factory import encoder_config
from mmssl.modalities.speech.adapter import CONV_SHAPE
from mmssl.sizes import SIZES

#: model_type -> the transformers class, and the prefix its task models (ForCTC, ForPreTraining) use
SPEECH_TYPES = {"hubert": ("HubertModel", "hubert."), "wav2vec2": ("Wav2Vec2Model", "wav2vec2."),
                "data2vec-audio": ("Data2VecAudioModel", "data2vec_audio.")}
#: task heads around the encoder, left out on purpose (CTC, classification, pretraining quantiser)
SPEECH_HEADS = ("lm_head.", "classifier.", "projector.", "layer_weights", "project_q.", "project_hid.",
                "quantizer.")
KERNELS, STRIDES = [k for k, _ in CONV_SHAPE], [s for _, s in CONV_SHAPE]
EPS = 1e-5  # mmssl's feature LayerNorm and transformers' default layer_norm_eps

_FE, _ENC = "feature_extractor.conv_layers", "encoder"


def _refuse(what: str) -> ConfigError:
    return ConfigError(f"this Hugging Face speech model cannot be converted exactly: {what}")


def speech_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """An mmssl speech ``encoder_config`` from a transformers config.json (HuBERT, wav2vec 2.0 or data2vec
    audio); one-line refusal for what mmssl's speech encoder cannot compute exactly."""
    mt = hf["model_type"]
    if list(hf.get("conv_kernel", KERNELS)) != KERNELS or list(hf.get("conv_stride", STRIDES)) != STRIDES:
        raise _refuse(f"conv_kernel {hf.get('conv_kernel')} / conv_stride {hf.get('conv_stride')}; mmssl's "
                      f"front-end is {KERNELS} / {STRIDES}")
    for key in ("feat_extract_activation", "hidden_act"):
        if hf.get(key, "gelu") != "gelu":
            raise _refuse(f"{key}={hf[key]!r}; mmssl uses gelu")
    if float(hf.get("layer_norm_eps", EPS)) != EPS:
        raise _refuse(f"layer_norm_eps={hf['layer_norm_eps']}; mmssl's feature LayerNorm uses {EPS}")
    if hf.get("conv_pos_batch_norm") or hf.get("add_adapter") or hf.get("feat_proj_layer_norm", True) is False:
        raise _refuse("conv_pos_batch_norm, add_adapter or feat_proj_layer_norm=false (mmssl has neither)")
    norm = {"group": "group_norm", "layer": "layer_norm"}.get(hf.get("feat_extract_norm", "group"))
    if mt == "data2vec-audio":
        norm, norm_first = "layer_norm", False  # transformers' data2vec audio: layer norm everywhere, post-norm
        kernel, depth = int(hf["conv_pos_kernel_size"]), int(hf["num_conv_pos_embeddings"])
    else:
        norm_first = bool(hf.get("do_stable_layer_norm", False))
        kernel, depth = int(hf["num_conv_pos_embeddings"]), 1
    if norm is None:
        raise _refuse(f"feat_extract_norm={hf.get('feat_extract_norm')!r}")
    widths = [int(c) for c in hf["conv_dim"]]
    numbers = {"dim": int(hf["hidden_size"]), "depth": int(hf["num_hidden_layers"]),
               "heads": int(hf["num_attention_heads"]), "ffn_dim": int(hf["intermediate_size"])}
    size = next((n for n, s in SIZES.items() if s == numbers), None)
    speech_cfg = OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality" / "speech.yaml"))
    backbone = {**numbers, "norm_first": norm_first, "eps": EPS,
                "dropout": float(hf.get("hidden_dropout", 0.0)), "attn_dropout": float(hf.get("attention_dropout", 0.0)),
                "ffn_dropout": float(hf.get("activation_dropout", 0.0)), "layer_drop": float(hf.get("layerdrop", 0.0))}
    cfg = encoder_config("speech", size or "base", speech_cfg, backbone)
    if size is None:
        cfg["size"] = f"{numbers['depth']}x{numbers['dim']}"  # no mmssl size has these numbers: say what it is
    cfg["adapter"].update(
        frontend_channels=widths[0] if len(set(widths)) == 1 else widths, frontend_norm=norm,
        frontend_bias=bool(hf.get("conv_bias", False)), position="conv", pos_conv_kernel=kernel,
        pos_conv_groups=int(hf["num_conv_pos_embedding_groups"]), pos_conv_depth=depth,
        feature_dropout=float(hf.get("feat_proj_dropout", 0.0)))
    return cfg


def speech_plan(cfg: dict[str, Any], legacy_weight_norm: bool = False, mask: bool = True) -> Plan:
    """(mmssl key, transformers keys) for a speech ``encoder_config``. ``legacy_weight_norm``: the
    position conv's gain and direction under the old ``weight_g`` / ``weight_v`` names."""
    a = cfg["adapter"]
    norm, bias = a["frontend_norm"], bool(a.get("frontend_bias", False))
    plan: Plan = []
    for i in range(len(CONV_SHAPE)):
        for p in ("weight", "bias") if bias else ("weight",):
            plan.append((f"adapter.feature_extractor.conv_layers.{i}.conv.{p}", [f"{_FE}.{i}.conv.{p}"]))
        if norm == "layer_norm" or (norm == "group_norm" and i == 0):
            for p in ("weight", "bias"):
                plan.append((f"adapter.feature_extractor.conv_layers.{i}.norm.{p}", [f"{_FE}.{i}.layer_norm.{p}"]))
    for p in ("weight", "bias"):
        plan.append((f"adapter.feature_norm.{p}", [f"feature_projection.layer_norm.{p}"]))
        plan.append((f"adapter.feature_proj.{p}", [f"feature_projection.projection.{p}"]))
        plan.append((f"backbone.norm.{p}", [f"{_ENC}.layer_norm.{p}"]))
    depth = int(a.get("pos_conv_depth", 1))
    if depth == 1:
        pos = f"{_ENC}.pos_conv_embed.conv"
        plan.append(("adapter.content_position.conv.bias", [f"{pos}.bias"]))
        for n, old in (("original0", "weight_g"), ("original1", "weight_v")):
            plan.append((f"adapter.content_position.conv.parametrizations.weight.{n}",
                         [f"{pos}.{old}" if legacy_weight_norm else f"{pos}.parametrizations.weight.{n}"]))
    else:
        for j in range(depth):
            for p in ("weight", "bias"):
                plan.append((f"adapter.content_position.convs.{j}.{p}", [f"{_ENC}.pos_conv_embed.layers.{j}.conv.{p}"]))
    for layer in range(int(cfg["backbone"]["depth"])):
        src, dst = f"{_ENC}.layers.{layer}", f"backbone.blocks.{layer}"
        for p in ("weight", "bias"):
            plan.append((f"{dst}.attn.qkv.{p}", [f"{src}.attention.{x}_proj.{p}" for x in "qkv"]))
            plan.append((f"{dst}.attn.proj.{p}", [f"{src}.attention.out_proj.{p}"]))
            plan.append((f"{dst}.norm1.{p}", [f"{src}.layer_norm.{p}"]))
            plan.append((f"{dst}.ffn.fc1.{p}", [f"{src}.feed_forward.intermediate_dense.{p}"]))
            plan.append((f"{dst}.ffn.fc2.{p}", [f"{src}.feed_forward.output_dense.{p}"]))
            plan.append((f"{dst}.norm2.{p}", [f"{src}.final_layer_norm.{p}"]))
    if mask:
        plan.append(("mask_embedding", ["masked_spec_embed"]))
    return plan


def speech_hf_config(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """A transformers config.json for an mmssl speech ``encoder_config`` (the refusals are the caller's:
    ``mmssl.exporters.hf.speech_refusal``)."""
    a, b = cfg["adapter"], cfg["backbone"]
    ch = a["frontend_channels"]
    widths = [int(ch)] * len(CONV_SHAPE) if isinstance(ch, int) else [int(c) for c in ch]
    arch, _ = SPEECH_TYPES[model_type]
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "hidden_size": int(b["dim"]),
        "num_hidden_layers": int(b["depth"]), "num_attention_heads": int(b["heads"]),
        "intermediate_size": int(b["ffn_dim"]), "hidden_act": "gelu", "feat_extract_activation": "gelu",
        "conv_dim": widths, "conv_kernel": KERNELS, "conv_stride": STRIDES, "num_feat_extract_layers": len(KERNELS),
        "conv_bias": bool(a.get("frontend_bias", False)), "layer_norm_eps": float(b["eps"]),
        "num_conv_pos_embedding_groups": int(a["pos_conv_groups"]),
        "hidden_dropout": float(b["dropout"]), "attention_dropout": float(b["attn_dropout"]),
        "activation_dropout": float(b["ffn_dropout"]), "layerdrop": float(b["layer_drop"]),
        "feat_proj_dropout": float(a.get("feature_dropout", 0.0)), "dtype": "float32",
        # mmssl's masking is its objectives'; keep the mask embedding (transformers creates it when > 0)
        "mask_time_prob": 0.05, "mask_feature_prob": 0.0,
    }
    if model_type == "data2vec-audio":
        out.update(num_conv_pos_embeddings=int(a.get("pos_conv_depth", 1)), conv_pos_kernel_size=int(a["pos_conv_kernel"]))
    else:
        out.update(num_conv_pos_embeddings=int(a["pos_conv_kernel"]), do_stable_layer_norm=bool(b["norm_first"]),
                   feat_extract_norm="group" if a["frontend_norm"] == "group_norm" else "layer")
        if model_type == "hubert":
            out["feat_proj_layer_norm"] = True
    return out
