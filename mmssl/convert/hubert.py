"""torchaudio HuBERT / wav2vec 2.0 weights (``Wav2Vec2Model``) -> an mmssl speech encoder export.

Key map (torchaudio -> mmssl); i is a conv layer, l a transformer layer:

  feature_extractor.conv_layers.i.conv.*                -> adapter.feature_extractor.conv_layers.i.conv.*
  feature_extractor.conv_layers.i.layer_norm.*          -> adapter.feature_extractor.conv_layers.i.norm.*
  encoder.feature_projection.layer_norm.*               -> adapter.feature_norm.*
  encoder.feature_projection.projection.*               -> adapter.feature_proj.*
  encoder.transformer.pos_conv_embed.conv.bias          -> adapter.content_position.conv.bias
  ...pos_conv_embed.conv.{weight_g | parametrizations.weight.original0}
                                                        -> adapter.content_position.conv.parametrizations.weight.original0
  ...pos_conv_embed.conv.{weight_v | parametrizations.weight.original1}
                                                        -> adapter.content_position.conv.parametrizations.weight.original1
  encoder.transformer.layer_norm.*                      -> backbone.norm.*
  encoder.transformer.layers.l.attention.{q,k,v}_proj.* -> backbone.blocks.l.attn.qkv.* (concatenated q, k, v)
  encoder.transformer.layers.l.attention.out_proj.*     -> backbone.blocks.l.attn.proj.*
  encoder.transformer.layers.l.layer_norm.*             -> backbone.blocks.l.norm1.*
  encoder.transformer.layers.l.feed_forward.intermediate_dense.* -> backbone.blocks.l.ffn.fc1.*
  encoder.transformer.layers.l.feed_forward.output_dense.*       -> backbone.blocks.l.ffn.fc2.*
  encoder.transformer.layers.l.final_layer_norm.*       -> backbone.blocks.l.norm2.*
  mask_generator.mask_embedding (hubert_pretrain_*)     -> mask_embedding

``hubert_pretrain_*`` models keep the encoder under ``wav2vec2.``; their ``logit_generator.*`` (and a
fine-tuned model's CTC head ``aux.*``) are heads, not encoder, and are skipped on purpose. Any other
key that is not used, and any mmssl parameter left unfilled, is an error.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from mmssl.convert.common import apply_plan, count_indexed, load_state_dict, need
from mmssl.encoder import Encoder
from mmssl.export import save_encoder
from mmssl.factory import build_encoder, encoder_config
from mmssl.modalities.speech.adapter import CONV_SHAPE
from mmssl.sizes import SIZES

#: prefixes of heads around the encoder, skipped on purpose (pretraining logits, CTC head)
HEAD_PREFIXES = ("logit_generator.", "aux.")
#: torchaudio presets' heads per width (base 768/12, large 1024/16, xlarge 1280/16): shapes cannot tell
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}

_FE = "feature_extractor.conv_layers"
_TR = "encoder.transformer"
_POS = f"{_TR}.pos_conv_embed.conv"
_MMPOS = "adapter.content_position.conv"


def _normalise_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """hubert_pretrain_* keys -> Wav2Vec2Model keys (strip ``wav2vec2.``); the rest unchanged."""
    return {k.removeprefix("wav2vec2."): v for k, v in sd.items()}




def infer_config(sd: dict[str, Tensor], heads: int | None = None,
                 norm_first: bool | None = None) -> dict[str, Any]:
    """An mmssl speech ``encoder_config`` with the sizes read off the tensor shapes.

    heads: shapes cannot tell it; defaults to torchaudio's preset for the width.
    norm_first: neither can they; torchaudio pairs a layer_norm feature extractor with pre-norm blocks
    (large, xlarge) and a group_norm one with post-norm blocks (base), so that decides by default."""
    sd = _normalise_keys(sd)
    n_conv = count_indexed(sd, _FE)
    if n_conv != len(CONV_SHAPE):
        raise ValueError(f"expected {len(CONV_SHAPE)} feature-extractor conv layers ({_FE}.N.*), found "
                         f"{n_conv}: not a torchaudio Wav2Vec2Model / HuBERT state dict?")
    widths = []
    for i, (k, _) in enumerate(CONV_SHAPE):
        w = need(sd, f"{_FE}.{i}.conv.weight", f"width of conv layer {i}")
        if w.shape[-1] != k:
            raise ValueError(f"conv layer {i} has kernel {w.shape[-1]}; mmssl's front-end uses {k}")
        widths.append(int(w.shape[0]))
    # Layer 0's GroupNorm and a LayerNorm have the same shapes; layer 1 having a norm tells them apart.
    if f"{_FE}.1.layer_norm.weight" in sd:
        frontend_norm = "layer_norm"
    elif f"{_FE}.0.layer_norm.weight" in sd:
        frontend_norm = "group_norm"
    else:
        raise ValueError(f"cannot tell the feature extractor's norm: no {_FE}.0.layer_norm.weight")

    dim = int(need(sd, "encoder.feature_projection.projection.weight", "model width").shape[0])
    depth = count_indexed(sd, f"{_TR}.layers")
    ffn_dim = int(need(sd, f"{_TR}.layers.0.feed_forward.intermediate_dense.weight", "FFN width").shape[0])
    if heads is None:
        if dim not in HEADS_BY_WIDTH:
            raise ValueError(f"width {dim} is no torchaudio preset; pass heads= explicitly")
        heads = HEADS_BY_WIDTH[dim]
    if norm_first is None:
        norm_first = frontend_norm == "layer_norm"
    v = sd.get(f"{_POS}.parametrizations.weight.original1", sd.get(f"{_POS}.weight_v"))
    if v is None:
        raise ValueError(f"cannot infer the position conv: no {_POS}.parametrizations.weight.original1 "
                         f"or {_POS}.weight_v")
    kernel, groups = int(v.shape[-1]), dim // int(v.shape[1])  # v: [D, D / groups, kernel]

    numbers = {"dim": dim, "depth": depth, "heads": heads, "ffn_dim": ffn_dim}
    # A named size keeps the modality's per-size refinements (HuBERT Base's dropouts for "base").
    size = next((n for n, s in SIZES.items() if s == numbers), "base")
    speech_cfg = OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality" / "speech.yaml"))
    cfg = encoder_config("speech", size, speech_cfg, {**numbers, "norm_first": norm_first})
    if size == "base" and SIZES["base"] != numbers:
        cfg["size"] = f"{depth}x{dim}"  # no mmssl size has these numbers: say what it is, not "base"
    cfg["adapter"].update(
        frontend_channels=widths[0] if len(set(widths)) == 1 else widths, frontend_norm=frontend_norm,
        frontend_bias=f"{_FE}.0.conv.bias" in sd, position="conv", pos_conv_kernel=kernel, pos_conv_groups=groups)
    return cfg


def _plan(sd: dict[str, Tensor], depth: int) -> list[tuple[str, list[str]]]:
    """(mmssl key, torchaudio keys): one key is copied, three (q, k, v) are concatenated."""
    plan: list[tuple[str, list[str]]] = []
    for i in range(len(CONV_SHAPE)):
        for p in ("weight", "bias"):
            for src, dst in ((f"conv.{p}", f"conv.{p}"), (f"layer_norm.{p}", f"norm.{p}")):
                # conv bias and norms exist per config: map what the source has, and let the
                # target-side check catch anything the config needs but the source lacks.
                if f"{_FE}.{i}.{src}" in sd:
                    plan.append((f"adapter.feature_extractor.conv_layers.{i}.{dst}", [f"{_FE}.{i}.{src}"]))
    for p in ("weight", "bias"):
        plan.append((f"adapter.feature_norm.{p}", [f"encoder.feature_projection.layer_norm.{p}"]))
        plan.append((f"adapter.feature_proj.{p}", [f"encoder.feature_projection.projection.{p}"]))
        plan.append((f"backbone.norm.{p}", [f"{_TR}.layer_norm.{p}"]))
    plan.append((f"{_MMPOS}.bias", [f"{_POS}.bias"]))
    # New parametrizations (original0 = g, original1 = v) or legacy weight_norm (weight_g, weight_v):
    # the same two tensors under two names.
    legacy = f"{_POS}.parametrizations.weight.original0" not in sd and f"{_POS}.weight_g" in sd
    for n, old in (("original0", "weight_g"), ("original1", "weight_v")):
        plan.append((f"{_MMPOS}.parametrizations.weight.{n}",
                     [f"{_POS}.{old}" if legacy else f"{_POS}.parametrizations.weight.{n}"]))
    for layer in range(depth):
        src, dst = f"{_TR}.layers.{layer}", f"backbone.blocks.{layer}"
        for p in ("weight", "bias"):
            plan.append((f"{dst}.attn.qkv.{p}", [f"{src}.attention.{x}_proj.{p}" for x in "qkv"]))
            plan.append((f"{dst}.attn.proj.{p}", [f"{src}.attention.out_proj.{p}"]))
            plan.append((f"{dst}.norm1.{p}", [f"{src}.layer_norm.{p}"]))
            plan.append((f"{dst}.ffn.fc1.{p}", [f"{src}.feed_forward.intermediate_dense.{p}"]))
            plan.append((f"{dst}.ffn.fc2.{p}", [f"{src}.feed_forward.output_dense.{p}"]))
            plan.append((f"{dst}.norm2.{p}", [f"{src}.final_layer_norm.{p}"]))
    if "mask_generator.mask_embedding" in sd:
        plan.append(("mask_embedding", ["mask_generator.mask_embedding"]))
    return plan


def _problems(unused: list[str], unfilled: list[str]) -> ValueError:
    """One summary line (the CLI prints only the first line), then the full lists."""
    parts = []
    if unused:
        parts.append(f"{len(unused)} source keys not used ({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''})")
    if unfilled:
        parts.append(f"{len(unfilled)} mmssl keys not filled ({', '.join(unfilled[:4])}"
                     f"{', ...' if len(unfilled) > 4 else ''})")
    lines = ["cannot convert the HuBERT state dict: " + "; ".join(parts)]
    lines += [f"  unused source key: {k}" for k in unused] + [f"  unfilled mmssl key: {k}" for k in unfilled]
    return ValueError("\n".join(lines))


def _convert(sd: dict[str, Tensor], heads: int | None, norm_first: bool | None
             ) -> tuple[dict[str, Any], dict[str, Tensor], Encoder]:
    sd = _normalise_keys(sd)
    cfg = infer_config(sd, heads, norm_first)
    state, unused, unfilled = apply_plan(sd, _plan(sd, cfg["backbone"]["depth"]), HEAD_PREFIXES)
    if unused or unfilled:
        raise _problems(unused, unfilled)

    enc = build_encoder(cfg)
    template = enc.state_dict()
    buffers = {k for k, _ in enc.named_buffers()}
    if "mask_embedding" not in state:
        # Wav2Vec2Model has no mask embedding; use HuBERT's uniform init, seeded so that converting
        # the same file twice gives the same export.
        dim = cfg["backbone"]["dim"]
        state["mask_embedding"] = torch.rand(dim, generator=torch.Generator().manual_seed(0))
    # Buffers are constants computed from the config (the adapter's MFCC / mel filterbanks), not weights.
    unfilled = [k for k in template if k not in state and k not in buffers]
    unfilled += [f"{k} (shape {tuple(state[k].shape)}, mmssl needs {tuple(template[k].shape)})"
                 for k in state if k in template and state[k].shape != template[k].shape]
    unused = [f"{k} (no such mmssl key)" for k in state if k not in template]
    if unused or unfilled:
        raise _problems(unused, unfilled)
    out = {k: state.get(k, v).to(v.dtype).contiguous() for k, v in template.items()}
    return cfg, out, enc


def convert_hubert_state_dict(sd: dict[str, Tensor], heads: int | None = None,
                              norm_first: bool | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A torchaudio ``Wav2Vec2Model`` (hubert_base) or ``HuBERTPretrainModel`` state dict ->
    (mmssl ``encoder_config``, mmssl ``Encoder`` state dict that loads with strict=True).

    Raises ValueError naming every source key not used and every mmssl parameter not filled."""
    cfg, state, _ = _convert(sd, heads, norm_first)
    return cfg, state



def convert_hubert_file(src: Path, out: Path, heads: int | None = None,
                        norm_first: bool | None = None) -> Path:
    """Convert a torchaudio HuBERT checkpoint file into an mmssl encoder export folder ``out``
    (``model.safetensors`` + ``config.json``, loadable with ``mmssl.load_encoder(out)``)."""
    src, out = Path(src), Path(out)
    _, state, enc = _convert(load_state_dict(src), heads, norm_first)
    enc.load_state_dict(state, strict=True)
    return save_encoder(enc, out, extra={"converted_from": "torchaudio.hubert", "source": str(src)})
