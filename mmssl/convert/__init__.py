"""Converters from other frameworks' checkpoints to mmssl encoder exports.

``mmssl convert SRC OUT [format=auto|NAME] [modality=M] [key=value ...]`` dispatches on ``CONVERTERS``:
each entry names what it reads, the modalities it makes, the keys it takes and the function that writes
the export. ``format=auto`` (the default) reads what SRC is (``detect``) and says so in one line. The
older spelling ``mmssl convert NAME SRC OUT`` stays, with ``hubert`` an alias of ``torchaudio``.

Detection reads no pickle that could run code: a directory by its ``config.json``, a file through the
allow-listed unpickler (``mmssl.convert.unpickle``, which also reads plain state dicts) or safetensors."""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmssl.errors import ConfigError


@dataclass(frozen=True)
class Converter:
    reads: str                                   # what SRC is, for the usage line
    keys: tuple[str, ...]                        # the key=value options it takes
    run: Callable[[Path, Path, dict[str, str]], Path]
    modalities: tuple[str, ...] = ()             # what it makes (checked against modality=); () any


def _torchaudio(src: Path, out: Path, kv: dict[str, str]) -> Path:
    from mmssl.convert.hubert import convert_hubert_file

    # the heads cannot be read off the shapes: torchaudio's preset for the width unless heads= says
    return convert_hubert_file(src, out, heads=int(kv["heads"]) if "heads" in kv else None)


def _triple(v: str) -> list[float]:
    return [float(x) for x in v.strip("[]").split(",")]


def _timm(src: Path, out: Path, kv: dict[str, str]) -> Path:
    from mmssl.convert.timm import convert_timm

    # timm's augreg / CLIP-derived ViTs expect 0.5/0.5 normalisation instead of ImageNet's
    extra: dict[str, Any] = {k: _triple(kv[k]) for k in ("mean", "std") if k in kv}
    if "size" in kv:
        extra["size"] = kv["size"]
    return convert_timm(src, out, **extra)


def _fairseq(src: Path, out: Path, kv: dict[str, str]) -> Path:
    from mmssl.convert.fairseq import convert_fairseq

    return convert_fairseq(src, out, kv)


def _hf(src: Path, out: Path, kv: dict[str, str]) -> Path:
    # mmssl.convert.hf (config.json + safetensors readers) is its own module; say so if it is absent
    if importlib.util.find_spec("mmssl.convert.hf") is None:
        raise ConfigError(f"{src} is a Hugging Face model directory: converting it needs mmssl.convert.hf, "
                          f"which this installation lacks")
    from mmssl.convert.hf import convert_hf

    return convert_hf(src, out, kv)


CONVERTERS: dict[str, Converter] = {
    "fairseq": Converter("a fairseq HuBERT / wav2vec 2.0 / data2vec audio checkpoint (.pt)", (), _fairseq,
                         ("speech",)),
    "hf": Converter("a Hugging Face model directory (config.json + model.safetensors: HubertModel, Wav2Vec2Model, "
                    "Data2VecAudioModel, ViTModel, ViTMAEModel, CLIPModel)", ("mean", "std"), _hf),
    "torchaudio": Converter("a torchaudio HuBERT / wav2vec 2.0 state_dict", ("heads",), _torchaudio, ("speech",)),
    "timm": Converter("a timm ViT state_dict", ("size", "mean", "std"), _timm, ("image",)),
}
#: older names of the formats above
ALIASES = {"hubert": "torchaudio"}


def _hf_dir(path: Path) -> bool:
    p = path / "config.json"
    if not p.is_file():
        return False
    import json

    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "model_type" in cfg and "modality" not in cfg


def _state_dict_kind(sd: dict[str, Any]) -> str | None:
    """torchaudio or timm from a plain state dict's key names."""
    keys = [str(k) for k in sd]
    if any(k.startswith(("feature_extractor.conv_layers.", "wav2vec2.feature_extractor.")) for k in keys) and \
            any(k.startswith(("encoder.transformer.", "wav2vec2.encoder.transformer.")) for k in keys):
        return "torchaudio"
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm"
    return None


def detect(src: Path) -> tuple[str, str]:
    """(format name, what was seen) for ``format=auto``; a one-line error when nothing fits."""
    from mmssl.errors import MissingFileError

    src = Path(src)
    if not src.exists():
        raise MissingFileError(src, "no such file or directory (the checkpoint to convert)")
    if src.is_dir():
        if _hf_dir(src):
            return "hf", "a Hugging Face model directory (config.json with model_type)"
        if (src / "config.json").is_file() and (src / "model.safetensors").is_file():
            raise ConfigError(f"{src} is already an mmssl encoder export: load it with mmssl.load_encoder")
        raise ConfigError(f"{src} is a directory without a Hugging Face config.json; pass a checkpoint file "
                          f"or format=NAME")
    if src.suffix == ".safetensors":
        from mmssl.errors import read_safetensors

        kind = _state_dict_kind(read_safetensors(src, "a state dict in safetensors"))
        if kind is None:
            raise ConfigError(f"{src}: a safetensors file whose keys are no torchaudio or timm state dict; "
                              f"pass format=NAME")
        return kind, f"a {kind} state dict (safetensors)"
    from mmssl.convert.fairseq import looks_like_fairseq
    from mmssl.convert.unpickle import load_checkpoint

    obj = load_checkpoint(src, "a checkpoint saved with torch.save")
    if looks_like_fairseq(obj):
        return "fairseq", "a fairseq checkpoint (model + " + ("args" if obj.get("args") is not None else "cfg") + ")"
    if isinstance(obj, dict):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
        kind = _state_dict_kind(inner)
        if kind is not None:
            return kind, f"a {kind} state dict"
    raise ConfigError(f"{src}: cannot tell what this checkpoint is (no fairseq model + args/cfg, no torchaudio "
                      f"or timm keys); pass format= one of: {', '.join(CONVERTERS)}")


def resolve_format(name: str) -> str:
    """A format name or alias -> the CONVERTERS key; a one-line error naming the choices."""
    name = ALIASES.get(name, name)
    if name not in CONVERTERS:
        raise ConfigError(f"format={name}: choose auto or one of: {', '.join(CONVERTERS)} "
                          f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return name


def convert(src: Path, out: Path, fmt: str = "auto", modality: str | None = None,
            kv: dict[str, str] | None = None) -> tuple[Path, str]:
    """Convert ``src`` into an mmssl export at ``out`` -> (out, the format used). ``fmt="auto"`` detects it
    and prints one line saying what was detected; ``modality`` checks the format makes that modality."""
    import sys

    kv = dict(kv or {})
    if fmt == "auto":
        fmt, seen = detect(Path(src))
        print(f"mmssl: {src} is {seen}: converting with format={fmt}", file=sys.stderr)
    fmt = resolve_format(fmt)
    conv = CONVERTERS[fmt]
    if modality is not None and conv.modalities and modality not in conv.modalities:
        raise ConfigError(f"format={fmt} makes {' or '.join(conv.modalities)} encoders, not modality={modality}")
    unknown = sorted(set(kv) - set(conv.keys))
    if unknown:
        raise ConfigError(f"format={fmt} takes no {', '.join(unknown)}" + (f"; it takes: {', '.join(conv.keys)}"
                                                                          if conv.keys else ""))
    return conv.run(Path(src), Path(out), kv), fmt
