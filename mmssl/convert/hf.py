"""Hugging Face model directories (``config.json`` + ``model.safetensors``, as ``save_pretrained``
writes them) -> mmssl encoders: ``HubertModel``, ``Wav2Vec2Model``, ``Data2VecAudioModel`` (speech),
``ViTModel``, ``ViTMAEModel`` (image), ``CLIPModel`` (a pair of towers with their projections and
logit scale, written as a contrastive run). Task models of the same encoders (``HubertForCTC``,
``ViTForImageClassification``, ``ViTMAEForPreTraining``, ...) convert too; their heads are left out
and named in the export's ``skipped``.

The architecture is read from ``config.json`` (``model_type`` and the sizes), the weights from
safetensors; nothing is downloaded, no remote code runs, no pickle is read. The key maps are in
``hf_speech``, ``hf_vision`` and ``hf_clip``; ``mmssl.exporters.hf`` uses the same maps the other way."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmssl.convert.hf_io import check_filled, is_hf_dir, plan_in, read_hf_dir, strip_prefix
from mmssl.encoder import Encoder
from mmssl.errors import ConfigError, read_json_object

__all__ = ["convert_hf", "hf_encoder", "hf_kind", "is_hf_dir"]


def hf_kind(cfg: dict[str, Any]) -> str:
    """``speech``, ``image`` or ``clip`` for a transformers config.json, else a one-line error naming
    what converts."""
    from mmssl.convert.hf_speech import SPEECH_TYPES
    from mmssl.convert.hf_vision import VISION_TYPES

    mt = cfg.get("model_type")
    if mt in SPEECH_TYPES:
        return "speech"
    if mt in VISION_TYPES:
        return "image"
    if mt == "clip":
        return "clip"
    names = [a for a, _ in SPEECH_TYPES.values()] + [a for a, _ in VISION_TYPES.values()] + ["CLIPModel"]
    raise ConfigError(f"Hugging Face model_type {mt!r} ({', '.join(cfg.get('architectures') or [])}) has no "
                      f"mmssl converter; these convert: {', '.join(names)}")


#: transformers' Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm: (x - mean) / sqrt(var + 1e-7)
HF_WAVEFORM_EPS = 1e-7


def _preprocessor(d: Path) -> dict[str, Any] | None:
    p = d / "preprocessor_config.json"
    return read_json_object(p, "a preprocessor config") if p.is_file() else None


def _overrides(cfg: dict[str, Any], kv: dict[str, str]) -> None:
    """mean= / std= (``0.5,0.5,0.5``) override the image normalisation the directory states."""
    for k in ("mean", "std"):
        if k in kv:
            vals = [float(x) for x in kv[k].strip("[]").split(",")]
            if len(vals) != 3:
                raise ConfigError(f"{k}= needs 3 values (R,G,B), got {kv[k]!r}")
            cfg["adapter"][k] = vals


def _single(src: Path, hf: dict[str, Any], sd: dict[str, Tensor], kind: str, kv: dict[str, str]
            ) -> tuple[Encoder, list[str]]:
    """One speech or image encoder with the directory's weights, and the heads left out."""
    from mmssl.factory import build_encoder

    mt = hf["model_type"]
    if kind == "speech":
        from mmssl.convert.hf_speech import SPEECH_HEADS, SPEECH_TYPES, speech_config_from_hf, speech_plan

        sd = strip_prefix(sd, [SPEECH_TYPES[mt][1]], "feature_projection.projection.weight")
        cfg = speech_config_from_hf(hf)
        pre = _preprocessor(src)
        if pre is not None and pre.get("do_normalize"):
            # the feature extractor normalised each utterance before the model: the adapter does it now
            cfg["adapter"].update(waveform_normalize=True, waveform_norm_eps=HF_WAVEFORM_EPS)
        legacy = "encoder.pos_conv_embed.conv.weight_g" in sd
        plan = speech_plan(cfg, legacy, mask="masked_spec_embed" in sd)
        heads, what = SPEECH_HEADS, f"Hugging Face {SPEECH_TYPES[mt][0]}"
        state = plan_in(sd, plan, heads, what)
    else:
        from mmssl.convert.hf_vision import (
            VISION_HEADS,
            VISION_TYPES,
            vision_config_from_hf,
            vision_plan,
            vision_specials_in,
        )

        sd = strip_prefix(sd, [VISION_TYPES[mt][1]], "embeddings.cls_token")
        cfg = vision_config_from_hf(hf, sd, _preprocessor(src))
        _overrides(cfg, kv)
        special, used = vision_specials_in(sd, cfg)
        heads, what = VISION_HEADS, f"Hugging Face {VISION_TYPES[mt][0]}"
        rest = {k: v for k, v in sd.items() if k not in used}
        state = {**plan_in(rest, vision_plan(int(cfg["backbone"]["depth"]), "embeddings.mask_token" in sd), heads, what),
                 **special}
    if "mask_embedding" in state:
        state["mask_embedding"] = state["mask_embedding"].reshape(-1)  # ViT's mask_token is [1, 1, D]
    enc = build_encoder(cfg)
    template = enc.state_dict()
    if "mask_embedding" not in state:
        # no mask embedding in the source (transformers makes one only when masking is configured):
        # HuBERT's uniform init, seeded so that converting the same directory twice gives the same export
        state["mask_embedding"] = torch.rand(int(cfg["backbone"]["dim"]), generator=torch.Generator().manual_seed(0))
    check_filled(template, state, {k for k, _ in enc.named_buffers()}, what)
    enc.load_state_dict({k: state.get(k, v).to(v.dtype) for k, v in template.items()}, strict=True)
    skipped = sorted({k.split(".")[0] for k in sd if k.startswith(heads)})
    return enc.eval(), skipped


def hf_encoder(path: str | Path, modality: str | None = None) -> Encoder:
    """A ready Encoder (eval mode) straight from a Hugging Face model directory, converted in memory;
    a CLIPModel directory gives its ``modality`` tower (image or text)."""
    src = Path(path)
    hf, sd = read_hf_dir(src)
    kind = hf_kind(hf)
    if kind == "clip":
        from mmssl.convert.hf_clip import clip_towers

        towers = clip_towers(hf, sd, _preprocessor(src))
        towers.pop("logit_scale")
        if modality not in towers:
            raise ConfigError(f"{src} is a CLIPModel with two towers; pass modality= one of: {', '.join(towers)}")
        enc = towers[modality]
    else:
        if modality is not None and modality != kind:
            raise ConfigError(f"{src} is a {hf.get('architectures')} ({kind}), not a {modality} encoder")
        enc, _ = _single(src, hf, sd, kind, {})
    print(f"mmssl: {src} is a Hugging Face {', '.join(hf.get('architectures') or [hf['model_type']])} "
          f"directory: converted in memory ({kind})", file=sys.stderr)
    enc.source = str(src)  # type: ignore[attr-defined]
    return enc


def convert_hf(src: Path, out: Path, kv: dict[str, str]) -> Path:
    """``mmssl convert SRC OUT format=hf``: an encoder export (speech, image) or, for a CLIPModel, a
    contrastive pair directory (``encoders/``, ``heads/`` and their random-init twins). kv: ``mean=`` /
    ``std=`` for image models whose directory states no normalisation."""
    from mmssl.export import save_encoder

    src, out = Path(src), Path(out)
    if not is_hf_dir(src):
        raise ConfigError(f"{src} is not a Hugging Face model directory (config.json with model_type, "
                          f"model.safetensors)")
    hf, sd = read_hf_dir(src)
    kind = hf_kind(hf)
    if kind == "clip":
        from mmssl.convert.hf_clip import write_clip_pair

        return write_clip_pair(hf, sd, _preprocessor(src), out, src)
    enc, skipped = _single(src, hf, sd, kind, kv)
    arch = ", ".join(hf.get("architectures") or [hf["model_type"]])
    return save_encoder(enc, out, extra={"converted_from": f"transformers.{arch}", "source": str(src),
                                         "skipped": skipped})
