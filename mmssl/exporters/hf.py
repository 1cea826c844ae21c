"""mmssl encoders -> Hugging Face model directories that ``transformers.AutoModel.from_pretrained(OUT)``
loads: speech as ``HubertModel`` (or ``Wav2Vec2Model``, ``arch=wav2vec2``; ``Data2VecAudioModel``
for data2vec's position stack), images as ``ViTModel``. The key maps are the importers'
(``mmssl.convert.hf_speech``, ``hf_vision``) read the other way, so mmssl -> transformers -> mmssl
gives back the same tensors.

Written: ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` (the feature extractor /
image processor settings that produce mmssl's inputs: raw 16 kHz waveforms; resize, [0, 1], the
adapter's mean and std). Not written: the mask embedding of image encoders (``ViTModel`` has a mask
token only with ``use_mask_token``) and the objective's heads.

Refused, in one line naming the nearest option: encoders transformers cannot compute exactly
(sinusoidal speech positions, a front-end without norms, several prefix tokens or none, post-norm
ViTs, open_clip towers, and the modalities transformers has no such model for)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mmssl.atomic import make_tmp_dir, replace_dir
from mmssl.convert.hf_io import plan_out
from mmssl.encoder import Encoder
from mmssl.errors import ConfigError
from mmssl.export import load_encoder


def _refuse(what: str) -> ConfigError:
    return ConfigError(f"cannot export to Hugging Face exactly: {what}")


def speech_refusal(cfg: dict[str, Any], arch: str | None) -> str | None:
    """Why this speech encoder has no exact transformers equivalent, or None."""
    a, b = cfg["adapter"], cfg["backbone"]
    if a.get("position", "conv") != "conv":
        return (f"speech position={a.get('position')!r} (sinusoidal, the MAE setting) has no transformers "
                f"equivalent; nearest: a position=conv encoder (HubertModel)")
    if a.get("frontend_norm") not in ("group_norm", "layer_norm"):
        return (f"frontend_norm={a.get('frontend_norm')!r}: transformers' feature encoders normalise "
                f"(feat_extract_norm group or layer); nearest: frontend_norm=group_norm")
    if float(b["eps"]) != 1e-5:
        return f"backbone eps {b['eps']}: transformers' speech models use one layer_norm_eps with the feature LayerNorm's 1e-5"
    if int(a.get("pos_conv_depth", 1)) > 1:
        if a["frontend_norm"] != "layer_norm" or b["norm_first"]:
            return ("a position stack (pos_conv_depth > 1) exists in transformers only as Data2VecAudioModel, "
                    "with a layer-norm front-end and post-norm blocks; nearest: pos_conv_depth=1 (HubertModel)")
        if arch not in (None, "data2vec-audio"):
            return f"arch={arch}: a position stack (pos_conv_depth > 1) is Data2VecAudioModel's (arch=data2vec-audio)"
    elif arch == "data2vec-audio":
        return "arch=data2vec-audio needs data2vec's position stack (pos_conv_depth > 1); nearest: arch=hubert"
    return None


def vit_refusal(cfg: dict[str, Any]) -> str | None:
    """Why this image encoder has no exact ViTModel equivalent, or None."""
    n = int(cfg.get("num_prefix", 0))
    if n == 0:
        return "ViTModel always has a CLS token, this encoder has none (num_prefix=0); nearest: num_prefix=1"
    if n > 1:
        return f"{n} prefix tokens (registers): ViTModel has one CLS token; nearest: mmssl export timm (reg_tokens)"
    if not cfg["backbone"]["norm_first"]:
        return "a post-norm image encoder (norm_first=false): ViTModel is pre-norm; nearest: norm_first=true"
    return None


def _speech(enc: Encoder, arch: str | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from mmssl.convert.hf_speech import speech_hf_config, speech_plan

    cfg = enc.config
    why = speech_refusal(cfg, arch)
    if why:
        raise _refuse(why)
    a = cfg["adapter"]
    model_type = arch or ("data2vec-audio" if int(a.get("pos_conv_depth", 1)) > 1 else "hubert")
    if model_type not in ("hubert", "wav2vec2", "data2vec-audio"):
        raise ConfigError(f"arch={arch!r}: choose hubert, wav2vec2 or data2vec-audio")
    if a["frontend_norm"] == "group_norm":
        print("mmssl: note: transformers' group-norm feature encoder counts padding in its statistics, mmssl's "
              "does not: the features are equal per utterance (feed transformers unpadded audio without "
              "attention_mask, as it advises for group-norm models)", file=sys.stderr)
    state = {k: v for k, v in enc.state_dict().items()}
    weights = plan_out(state, speech_plan(cfg))
    pre = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
           "padding_value": 0.0, "padding_side": "right",
           # transformers normalises with eps 1e-7 where fairseq-trained models used 1e-5: the input
           # scale differs by sqrt((var + 1e-5) / (var + 1e-7)), about 1e-3 for speech at -26 dBFS,
           # which the front-end's first norm takes out up to its conv bias
           "do_normalize": bool(a.get("waveform_normalize", False)),
           "return_attention_mask": a["frontend_norm"] == "layer_norm"}
    return speech_hf_config(cfg, model_type), weights, pre


def _image(enc: Encoder) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from mmssl.convert.hf_vision import vision_plan, vision_specials_out, vit_hf_config, vit_preprocessor

    cfg = enc.config
    why = vit_refusal(cfg)
    if why:
        raise _refuse(why)
    if cfg.get("pool") != "cls":
        print(f"mmssl: note: this encoder pools {cfg.get('pool')!r} over its patch tokens; ViTModel's pooler_output "
              f"is the final CLS token (mean: last_hidden_state[:, 1:].mean(1) is mmssl's embedding)", file=sys.stderr)
    state = dict(enc.state_dict())
    depth = int(cfg["backbone"]["depth"])
    weights = plan_out(state, vision_plan(depth, mask=False))
    grid = enc.adapter.grid
    weights.update(vision_specials_out(state, cfg, enc.adapter.positions(*grid).detach().float()))
    return vit_hf_config(cfg), weights, vit_preprocessor(cfg)


def export_hf(run: Path, out: Path, kv: dict[str, str]) -> Path:
    """``mmssl export hf RUN OUT [modality=M] [arch=hubert|wav2vec2|data2vec-audio]``: the run's (or
    export's) encoder as a transformers model directory."""
    enc = load_encoder(run, modality=kv.get("modality"))
    cfg = enc.config
    if cfg.get("open_clip"):
        raise _refuse("an open_clip tower; nearest: its weights are open_clip's own (encoders/<m>/model.safetensors, "
                      "visual.* / text.*), which open_clip loads")
    modality = cfg["modality"]
    if modality == "speech":
        hf_cfg, weights, pre = _speech(enc, kv.get("arch"))
    elif modality == "image":
        if kv.get("arch") not in (None, "vit"):
            raise ConfigError(f"arch={kv['arch']!r}: image encoders export as ViTModel (arch=vit)")
        hf_cfg, weights, pre = _image(enc)
    else:
        raise _refuse(f"transformers has no model that computes mmssl's {modality} encoder; nearest: "
                      f"mmssl.load_encoder({str(run)!r}) in Python")
    hf_cfg["mmssl_source"] = str(run)
    out = Path(out)
    tmp = make_tmp_dir(out)
    try:
        save_file({k: v.detach().float().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
