"""Registries for modality adapters, objectives and data presets (timm's @register_model pattern).

Third-party packages add their own through the ``mmssl.plugins`` entry-point group: each entry point
names a module that is imported once, and whose import registers adapters/objectives with the
decorators below. Their configs are found through ``hydra.searchpath`` or a plug-in's
``mmssl_configs`` package (see README "Plug-ins")."""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from mmssl.errors import UnknownNameError


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        load_builtins()
        if name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        load_builtins()
        return name in self._items


MODALITIES = Registry("modality")
OBJECTIVES = Registry("objective")
PRESETS = Registry("data preset")

_BUILTINS = ("mmssl.modalities.speech", "mmssl.modalities.image", "mmssl.modalities.text",
             "mmssl.modalities.pairs", "mmssl.modalities.point", "mmssl.modalities.eeg",
             "mmssl.modalities.mri", "mmssl.objectives.hubert", "mmssl.objectives.mae",
             "mmssl.objectives.contrastive", "mmssl.objectives.data2vec",
             "mmssl.objectives.distill", "mmssl.objectives.sd_further", "mmssl.objectives.pqae",
             "mmssl.data.real")
_loaded = False


def load_builtins() -> None:
    """Import built-in modules and plug-ins once; their imports fill the registries."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTINS:
        import_module(mod)
    for ep in entry_points(group="mmssl.plugins"):
        import_module(ep.value)


def reconstructors() -> dict[str, str]:
    """modality -> the module of its ``reconstruct(encoder, src, out, device)`` (``mmssl reconstruct``):
    the built-in modalities that ship a ``reconstruct`` module."""
    from importlib.util import find_spec

    out = {}
    for m in MODALITIES.names():
        name = f"mmssl.modalities.{m}.reconstruct"
        try:
            if find_spec(name) is not None:
                out[m] = name
        except ModuleNotFoundError:  # a plug-in modality outside mmssl.modalities
            continue
    return out
