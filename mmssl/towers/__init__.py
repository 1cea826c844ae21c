"""Towers from other libraries behind mmssl's Encoder contract, chosen by a modality config.

``mmssl.towers.open_clip.OpenClipTower``: an open_clip image or text tower (``open_clip:`` in
configs/modality/image.yaml or text.yaml). Imported on demand, so mmssl does not import open_clip's
models unless a config asks for one."""
from __future__ import annotations

from typing import Any

__all__ = ["OpenClipTower"]


def __getattr__(name: str) -> Any:
    if name == "OpenClipTower":
        from mmssl.towers.open_clip import OpenClipTower

        return OpenClipTower
    raise AttributeError(f"module 'mmssl.towers' has no attribute {name!r}")
