"""Exporters from mmssl runs to the formats other tools load.

``EXPORTERS`` is what ``mmssl export FORMAT RUN OUT [key=value ...]`` dispatches on: each entry says
what it writes, the keys it takes, and the function that writes it. An exporter refuses, in one line
naming the nearest option, an encoder the target cannot compute exactly: it never writes weights
that would give other features."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Exporter:
    writes: str                                  # what OUT becomes, for the usage line
    keys: tuple[str, ...]                        # the key=value options it takes
    run: Callable[[Path, Path, dict[str, str]], Path]


def _hf(run: Path, out: Path, kv: dict[str, str]) -> Path:
    from mmssl.exporters.hf import export_hf

    return export_hf(run, out, kv)


def _timm(run: Path, out: Path, kv: dict[str, str]) -> Path:
    from mmssl.exporters.timm import export_timm

    return export_timm(run, out, kv)


EXPORTERS: dict[str, Exporter] = {
    "hf": Exporter("a transformers model directory (AutoModel.from_pretrained(OUT))", ("modality", "arch"), _hf),
    "timm": Exporter("a timm state dict (model.safetensors) + create_model arguments (timm.json)", ("modality",), _timm),
}
