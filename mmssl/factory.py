"""Build encoders and objectives from configs (open_clip's factory pattern: models are data)."""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from mmssl import __version__
from mmssl.backbone import BackboneConfig
from mmssl.encoder import Encoder
from mmssl.errors import UnknownNameError
from mmssl.registry import MODALITIES, OBJECTIVES
from mmssl.sizes import size_spec

FORMAT_VERSION = 1


def objective_defaults(modality_cfg: dict[str, Any], objective: str | None) -> dict[str, Any]:
    """The modality's defaults for one objective (``objectives.<name>`` in its yaml): e.g. MAE's mask
    ratio is 0.75 for images and 0.30 for text. An ``adapter`` entry refines the adapter under that
    objective (speech uses sinusoidal positions under MAE); ``trainer`` and ``pool`` entries set training
    keys and the tower's pooling where the command line leaves them alone (mmssl.cli.apply_trainer_defaults).

    An objective class with ``inherits = "<other>"`` (sd_further: "mae") starts from the other
    objective's defaults; its own entry, if any, refines them."""
    if not objective:
        return {}
    table = modality_cfg.get("objectives") or {}
    parent = getattr(OBJECTIVES.get(objective), "inherits", None) if objective in OBJECTIVES else None
    out = objective_defaults(modality_cfg, parent) if parent else {}
    own = dict(table.get(objective) or {})
    for k in ("adapter", "trainer"):  # nested entries merge key by key
        if k in own and k in out:
            own[k] = {**out[k], **own[k]}
    out.update(own)
    return out


def encoder_config(modality: str, size: str, modality_cfg: dict[str, Any],
                   model_overrides: dict[str, Any] | None = None, objective: str | None = None) -> dict[str, Any]:
    """The complete description of one tower, as written into an export's ``config.json``.

    Size numbers come from ``sizes``; architecture details from the modality config, whose
    ``sizes.<size>`` entries refine them per size, then ``objectives.<objective>.adapter``;
    ``model.*`` keys override backbone numbers."""
    per_size = (modality_cfg.get("sizes") or {}).get(size) or {}
    backbone = size_spec(size)
    backbone.update(modality_cfg.get("backbone") or {})
    backbone.update(per_size.get("backbone") or {})
    known = {f.name for f in fields(BackboneConfig)}
    for k, v in (model_overrides or {}).items():
        if k == "name" or v is None:
            continue
        if k not in known:
            raise UnknownNameError(f"unknown model key {k!r}; choose one of: {', '.join(sorted(known))}")
        backbone[k] = v
    adapter = dict(modality_cfg.get("adapter") or {})
    for refine in (per_size.get("adapter"), objective_defaults(modality_cfg, objective).get("adapter")):
        for k, v in (refine or {}).items():  # a nested entry (views) is refined key by key
            adapter[k] = {**adapter[k], **v} if isinstance(v, dict) and isinstance(adapter.get(k), dict) else v
    oc = dict(modality_cfg.get("open_clip") or {})  # set when it names a model (model or model_cfg)
    return {
        "format_version": FORMAT_VERSION,
        "mmssl_version": __version__,
        "modality": modality,
        "size": size,
        "backbone": asdict(BackboneConfig(**backbone)),
        "adapter": adapter,
        "pool": modality_cfg.get("pool", "mean"),
        "num_prefix": int(modality_cfg.get("num_prefix", 0)),
        # an open_clip tower instead of an mmssl Encoder (mmssl/towers/open_clip.py); absent otherwise
        **({"open_clip": oc} if oc.get("model") or oc.get("model_cfg") else {}),
    }


def build_encoder(cfg: dict[str, Any]) -> Encoder:
    """Encoder from an ``encoder_config`` dict (or a loaded ``config.json``); an ``OpenClipTower`` (the
    Encoder interface over an open_clip tower) when the config has an ``open_clip`` entry."""
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"encoder format {cfg['format_version']} is newer than this mmssl reads ({FORMAT_VERSION})")
    if cfg.get("open_clip"):
        from mmssl.towers.open_clip import OpenClipTower

        return OpenClipTower(cfg)  # type: ignore[return-value]
    backbone = BackboneConfig(**cfg["backbone"])
    adapter_cls = MODALITIES.get(cfg["modality"])
    adapter = adapter_cls(backbone.dim, cfg.get("adapter") or {})
    enc = Encoder(adapter, backbone, pool=cfg.get("pool", "mean"), num_prefix=int(cfg.get("num_prefix", 0)))
    enc.config = dict(cfg, preprocessing=adapter.preprocessing())
    return enc


#: an objective's per-size tables (MAE's decoder_sizes, distill's sizes): the objective's yaml holds one for
#: every modality, and a modality's ``objectives.<name>`` may refine single entries (MRI's micro MAE
#: decoder). The command line reaches a size's value through the flat keys (objective.decoder_depth=...),
#: which win over every table.
SIZE_TABLES = ("decoder_sizes", "sizes")


def merge_objective_cfg(name: str, cfg: dict[str, Any], modality_cfgs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The objective's config with null keys filled from the modalities' ``objectives.<name>`` defaults
    (a value set in the objective config or on the command line always wins), except the per-size
    tables (``SIZE_TABLES``), whose entries a modality refines key by key."""
    out: dict[str, Any] = {}
    for mcfg in modality_cfgs.values():
        for k, v in objective_defaults(mcfg, name).items():
            if k not in ("adapter", "trainer", "pool"):  # the tower's and the trainer's keys, not the objective's
                out.setdefault(k, v)
    tables = {k: out.pop(k) for k in SIZE_TABLES if isinstance(out.get(k), dict)}
    out.update({k: v for k, v in cfg.items() if v is not None or k not in out})
    for k, mine in tables.items():  # a modality refines the size tables entry by entry
        base = dict(out.get(k) or {})
        out[k] = {size: {**(base.get(size) or {}), **(mine.get(size) or {})} for size in {*base, *mine}}
    return out


def build_objective(name: str, cfg: dict[str, Any], encoders: dict[str, Encoder],
                    modality_cfgs: dict[str, dict[str, Any]] | None = None):
    """The objective ``name`` over ``encoders``; ``modality_cfgs`` supply per-modality defaults."""
    obj_cls = OBJECTIVES.get(name)
    why = obj_cls.supports(list(encoders))
    if why:
        raise ValueError(why)
    return obj_cls.build(merge_objective_cfg(name, cfg, modality_cfgs or {}), encoders)


def supported_pairs() -> dict[str, list[str]]:
    """objective -> the single modalities (or pairs) it supports."""
    out: dict[str, list[str]] = {}
    mods = MODALITIES.names()
    for name in OBJECTIVES.names():
        cls = OBJECTIVES.get(name)
        if cls.num_modalities == 1:
            out[name] = [m for m in mods if cls.supports([m]) is None]
        else:
            out[name] = [f"[{a},{b}]" for a in mods for b in mods if a != b and cls.supports([a, b]) is None]
    return out
