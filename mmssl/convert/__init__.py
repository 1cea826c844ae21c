"""Converters from other frameworks' checkpoints to mmssl encoder exports.

``CONVERTERS`` is what ``mmssl convert FORMAT SRC OUT [key=value ...]`` dispatches on: each entry names
what it reads, the keys it takes, and the function that writes the export."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Converter:
    reads: str                                   # what SRC is, for the usage line
    keys: tuple[str, ...]                        # the key=value options it takes
    run: Callable[[Path, Path, dict[str, str]], Path]


def _hubert(src: Path, out: Path, kv: dict[str, str]) -> Path:
    from mmssl.convert.hubert import convert_hubert_file

    return convert_hubert_file(src, out)


def _triple(v: str) -> list[float]:
    return [float(x) for x in v.strip("[]").split(",")]


def _timm(src: Path, out: Path, kv: dict[str, str]) -> Path:
    from mmssl.convert.timm import convert_timm

    # timm's augreg / CLIP-derived ViTs expect 0.5/0.5 normalisation instead of ImageNet's
    extra: dict[str, Any] = {k: _triple(kv[k]) for k in ("mean", "std") if k in kv}
    if "size" in kv:
        extra["size"] = kv["size"]
    return convert_timm(src, out, **extra)


def _hf(src: Path, out: Path, kv: dict[str, str]) -> Path:
    from mmssl.convert.hf import convert_hf

    return convert_hf(src, out, kv)


CONVERTERS: dict[str, Converter] = {
    "hubert": Converter("a torchaudio HuBERT state_dict", (), _hubert),
    "timm": Converter("a timm ViT state_dict", ("size", "mean", "std"), _timm),
    "hf": Converter("a Hugging Face model directory (config.json + model.safetensors: HubertModel, Wav2Vec2Model, "
                    "Data2VecAudioModel, ViTModel, ViTMAEModel, CLIPModel)", ("mean", "std"), _hf),
}
