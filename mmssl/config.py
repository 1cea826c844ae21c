"""Hydra composition with one-line errors that name the valid choices."""
from __future__ import annotations

import os
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmssl.registry import MODALITIES, OBJECTIVES

GROUPS = ("modality", "objective", "data", "trainer", "model", "eval")

# ${mmssl.first_set:a,b}: the first argument that is not null (a tower's own size, else model.name)
if not OmegaConf.has_resolver("mmssl.first_set"):
    OmegaConf.register_new_resolver("mmssl.first_set", lambda *xs: next((x for x in xs if x is not None), None))


class ConfigError(ValueError):
    """A user error in the command line: printed as one line, exit code 2."""


def _search_path() -> list[str]:
    """Config packages: mmssl's own, then plug-ins' (entry-point group ``mmssl.configs``)."""
    return [f"pkg://{ep.value}" for ep in entry_points(group="mmssl.configs")]


def group_options(group: str) -> list[str]:
    names = set()
    for pkg in ["mmssl.configs"] + [p[len("pkg://"):] for p in _search_path()]:
        try:
            d = resources.files(pkg) / group
            names |= {p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml")}
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
            continue
    return sorted(names)


def _check_group_values(overrides: list[str]) -> None:
    for ov in overrides:
        key, _, val = ov.partition("=")
        key = key.lstrip("+~")
        if key in GROUPS and val:
            vals = [v.strip() for v in val.strip("[]").split(",") if v.strip()]
            opts = group_options(key)
            for v in vals:
                if v not in opts:
                    raise ConfigError(f"unknown {key} {v!r}; choose one of: {', '.join(opts)}")


def compose(overrides: list[str]) -> DictConfig:
    """The resolved config for ``overrides`` (key=value strings)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _check_group_values(overrides)
    sp = _search_path()
    extra = [f"hydra.searchpath=[{','.join(sp)}]"] if sp else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="mmssl.configs", version_base="1.3"):
            cfg = hcompose(config_name="config", overrides=list(overrides) + extra)
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e).strip().splitlines()[0]
        if "Could not override" in msg or "not in struct" in str(e) or "Key '" in str(e):
            # the longest key the error names: modality.point.backbone.x, not the group override modality=point
            named = [o.split("=")[0] for o in overrides if o.split("=")[0].lstrip("+~") in str(e)]
            key = max(named, key=len) if named else None
            top = ", ".join(k for k in ("run_dir", "init", "resume", "allow_config_change", "cache_dir", "encoder",
                                        "out", "split") + GROUPS)
            raise ConfigError(f"unknown key {key or msg!r}; top-level keys: {top} "
                              f"(a group's keys: see `mmssl list` and configs/<group>/*.yaml)") from None
        raise ConfigError(msg) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def modalities_of(cfg: DictConfig) -> list[str]:
    mods = list(cfg.modality.keys())
    for m in mods:
        if m not in MODALITIES:
            raise ConfigError(f"modality {m!r} has a config but no adapter; adapters: {', '.join(MODALITIES.names())}")
    return mods


def check_pair(cfg: DictConfig) -> None:
    name = cfg.objective.name
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES.names())}")
    why = OBJECTIVES.get(name).supports(modalities_of(cfg))
    if why:
        from mmssl.factory import supported_pairs

        pairs = ', '.join(f'modality={m}' for m in supported_pairs()[name]) or 'none'
        raise ConfigError(f"unsupported pair: {why}; supported: {name} with {pairs}")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.get("cache_dir") or os.environ.get("MMSSL_CACHE") or Path.home() / ".cache" / "mmssl")
