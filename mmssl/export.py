"""Exports: ``encoders/<modality>/{model.safetensors,config.json}`` and ``heads/``; loading them back.

Only safetensors and JSON are read: nothing here can execute code from a file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mmssl.atomic import make_tmp_dir, replace_dir
from mmssl.encoder import Encoder
from mmssl.errors import BadFileError, ConfigError, MissingFileError, read_json_object, read_safetensors
from mmssl.factory import build_encoder
from mmssl.types import Batch


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_encoder(encoder: Encoder, out_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write an encoder export atomically (temporary folder, then rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp_dir(out_dir)
    try:
        save_file(_state(encoder), str(tmp / "model.safetensors"))
        cfg = dict(encoder.config)
        cfg.update(extra or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def save_heads(heads: dict[str, nn.Module], out_dir: Path) -> None:
    """Write the objective's heads into a fresh folder, swapped in whole: ``<name>.safetensors`` and, for a
    head with a ``config`` dict (what rebuilds it), ``<name>.json``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp_dir(out_dir)
    try:
        for name, h in heads.items():
            save_file(_state(h), str(tmp / f"{name}.safetensors"))
            if isinstance(getattr(h, "config", None), dict):
                (tmp / f"{name}.json").write_text(json.dumps(h.config, indent=2, default=str))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_encoder_dir(path: Path, modality: str | None = None, which: str = "encoders") -> Path:
    """An export folder (with config.json) from an export or a run directory."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        if which == "encoders":
            return path
        # an export inside a run directory (RUN/encoders/<m>): its sibling RUN/<which>/<m>
        sib = path.parent.parent / which / path.name
        if path.parent.name == "encoders" and (sib / "config.json").exists():
            return sib
        raise MissingFileError(path, f"an export without {which}/ beside it")
    root = path / which
    if not root.is_dir():
        old = root.with_name(root.name + ".old")
        if old.is_dir():
            root = old
        else:
            raise MissingFileError(path, f"neither an encoder export (config.json + model.safetensors) nor a run "
                                         f"directory with {which}/")
    # leftovers of an interrupted write (.tmp-*, *.old) are not towers
    towers = sorted(p.name for p in root.iterdir() if (p / "config.json").exists()
                    and not p.name.startswith(".") and not p.name.endswith(".old"))
    if not towers:
        raise MissingFileError(root, "no encoder in it")
    if modality is None:
        if len(towers) > 1:
            raise ConfigError(f"{path} has several towers; pass modality= one of: {', '.join(towers)}")
        modality = towers[0]
    if modality not in towers:
        raise ConfigError(f"{path} has no {modality!r} encoder; choose one of: {', '.join(towers)}")
    return root / modality


def load_encoder(path: str | Path, modality: str | None = None, device: str | torch.device = "cpu",
                 which: str = "encoders") -> Encoder:
    """A ready Encoder (eval mode) from a run directory or an export.

    ``which="encoders_init"`` loads a run's step-0 weights (the probe's random-init baseline). A Hugging
    Face model directory (HubertModel, ViTModel, CLIPModel, ...; ``mmssl.convert.hf``) is detected and
    converted in memory, with a one-line note on stderr."""
    from mmssl.convert.hf_io import is_hf_dir

    if which == "encoders" and is_hf_dir(path):
        from mmssl.convert.hf import hf_encoder

        return hf_encoder(path, modality).to(device).eval()
    d = resolve_encoder_dir(Path(path), modality, which)
    cfg = read_json_object(d / "config.json", "an encoder config.json", ("modality", "backbone"))
    try:
        enc = build_encoder(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise BadFileError(d / "config.json", f"does not describe an encoder ({type(e).__name__}: {e})") from None
    state = read_safetensors(d / "model.safetensors", "the encoder's weights")
    try:
        missing, unexpected = enc.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise BadFileError(d / "model.safetensors", f"weights do not fit config.json ({str(e).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise BadFileError(d / "model.safetensors",
                           f"weights do not fit config.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    enc.source = str(d)  # type: ignore[attr-defined]
    return enc.to(device).eval()


class PairModel(nn.Module):
    """Two exported towers and their contrastive head: embeddings in the shared space (evaluation)."""

    def __init__(self, encoders: dict[str, Encoder], head: nn.Module) -> None:
        super().__init__()
        self.modalities = list(head.modalities)
        self.encoders = nn.ModuleDict(encoders)
        self.head = head

    @property
    def logit_scale(self) -> float:
        return float(self.head.log_scale.detach().clamp(max=self.head.max_log_scale).exp())

    def input_size(self, modality: str) -> int | None:
        v = self.encoders[modality].config.get("preprocessing", {}).get("max_len")
        return None if v is None else int(v)

    @torch.no_grad()
    def embed(self, modality: str, batch: Batch) -> torch.Tensor:
        """Batch -> [B, E] L2-normalised embeddings of tower ``modality``."""
        return self.head.project(modality, self.encoders[modality].embed(batch))


def load_pair(path: str | Path, which: str = "encoders", device: str | torch.device = "cpu") -> PairModel:
    """The pair of a contrastive run directory: ``which="encoders"`` (trained) or ``"encoders_init"`` (its
    step-0 weights with the step-0 head, the random-init baseline)."""
    from mmssl.objectives.contrastive import ContrastiveHead

    root = Path(path)
    heads = root / ("heads" if which == "encoders" else "heads_init")
    cfg_path = heads / "contrastive.json"
    if not cfg_path.exists():
        raise MissingFileError(root, f"no {heads.name}/contrastive.json: not a run of a contrastive objective "
                                     f"(clip, clap, cloob)")
    cfg = read_json_object(cfg_path, "a contrastive head's config", ("dims", "modalities"))
    head = ContrastiveHead(cfg["dims"], cfg)
    missing, unexpected = head.load_state_dict(read_safetensors(heads / "contrastive.safetensors", "the head's weights"),
                                               strict=False)
    if missing or unexpected:
        raise BadFileError(heads / "contrastive.safetensors", f"{heads}: weights do not fit the head (missing {missing[:3]}, unexpected {unexpected[:3]})")
    encoders = {m: load_encoder(root, modality=m, which=which) for m in cfg["modalities"]}
    return PairModel(encoders, head).to(device).eval()
