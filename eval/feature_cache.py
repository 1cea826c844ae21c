"""Features extracted once per (encoder weights, data, split, input size) and cached on disk.

Every evaluator that trains on frozen features (linear probe sweeps, k-NN, the layer-weighted probe)
reads them from here, so an encoder passes over a split once however many probe variants, layers,
poolings, label fractions and seeds follow. Features are keyed ``"<layer>:<pool>"``: ``-1`` is the
encoder's final output (after the final norm), ``i >= 0`` block i's output; pools are ``mean`` and
``max`` (over real tokens), ``cls`` (the first prefix token, final output only) and ``meanmax``, the
two concatenated ([n, 2D], DGCNN's global feature; built from the cached ``mean`` and ``max``, so it
costs no extraction). ``"baseline"`` holds the adapter's classical features. Files are safetensors
(no pickle) written atomically."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmssl.atomic import write_text
from mmssl.data.loader import DataSource, iter_split
from mmssl.encoder import POOLS, Encoder, pool_tokens
from mmssl.modalities.base import ProbeTransform as Transform

FORMAT = 3  # 3: max pooling cached too
#: poolings the probes read: the encoder's own (``POOLS``) plus ``meanmax``, [mean, max] side by side
PROBE_POOLS = (*POOLS, "meanmax")


@dataclass
class FeatureSet:
    """feats: key -> [n, D] float32 (cpu); labels: [n] int64 (-1 = unlabelled) or [n, K] multi-hot;
    ids: [n] sample ids. Rows are in the same order in every tensor."""

    feats: dict[str, torch.Tensor]
    labels: torch.Tensor
    ids: torch.Tensor
    skipped: dict[str, int]


def feature_key(layer: int, pool: str) -> str:
    return f"{int(layer)}:{pool}"


def weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _wanted(encoder: Encoder, layers: Sequence[int], pools: Sequence[str]) -> list[tuple[int, str]]:
    out = []
    for layer in layers:
        if not -1 <= int(layer) < encoder.depth:
            raise ValueError(f"layer must be -1 (final output) or 0..{encoder.depth - 1}, got {layer}")
        for pool in pools:
            if pool not in PROBE_POOLS:
                raise ValueError(f"pool must be one of {', '.join(PROBE_POOLS)}, not {pool!r}")
            if pool == "cls" and (int(layer) != -1 or encoder.prefix is None):
                continue  # a CLS feature exists only at the output of an encoder with a prefix token
            out.append((int(layer), pool))
    if not out:
        raise ValueError(f"no features for layers {list(layers)} with pools {list(pools)} "
                         f"(cls needs layer -1 and an encoder with a CLS token)")
    return out


@torch.no_grad()
def _extract(encoder: Encoder, source: DataSource, split: str, device: torch.device, batch_size: int,
             wanted: list[tuple[int, str]], max_len: int | None, baseline: bool,
             bad: Counter, transform: Transform | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    encoder.eval()
    joined = [layer for layer, pool in wanted if pool == "meanmax"]
    wanted = list(dict.fromkeys([w for w in wanted if w[1] != "meanmax"]
                                + [(layer, p) for layer in joined for p in ("mean", "max")]))
    need_layers = any(layer >= 0 for layer, _ in wanted)
    cols: dict[str, list[torch.Tensor]] = {feature_key(*w): [] for w in wanted}
    if baseline:
        cols["baseline"] = []
    labels, ids = [], []
    for batch in iter_split(source, split, batch_size, bad, max_len=max_len):
        b = {k: v.to(device) for k, v in batch.items()}
        if transform is not None:  # a probe variant (e.g. one MRI contrast alone): items it cannot use leave
            b, keep = transform(b)
            keep = keep.to(device)
            if not bool(keep.any()):
                continue
            b = {k: v[keep] for k, v in b.items()}
            batch = {k: v[keep.cpu()] for k, v in batch.items()}
        out = encoder(b, return_layers=need_layers)
        for layer, pool in wanted:
            if pool == "cls":
                f = out.prefix[:, 0]
            else:
                f = pool_tokens(out.last if layer == -1 else out.layers[layer], out.pad, pool)
            cols[feature_key(layer, pool)].append(f.float().cpu())
        if baseline:
            cols["baseline"].append(encoder.adapter.baseline_features(b).float().cpu())
        labels.append(batch.get("label", torch.full_like(batch["sample_id"], -1)))
        ids.append(batch["sample_id"])
    if not ids:
        raise ValueError(f"split {split!r} of {source.root} has no usable samples")
    feats = {k: torch.cat(v) for k, v in cols.items()}
    return {**feats, **{feature_key(layer, "meanmax"): meanmax(feats, layer) for layer in joined}}, \
        torch.cat(labels), torch.cat(ids)


def meanmax(feats: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """[n, 2D]: a layer's mean- and max-pooled features side by side (mean first)."""
    return torch.cat([feats[feature_key(layer, "mean")], feats[feature_key(layer, "max")]], 1)


def encoder_features(encoder: Encoder, source: DataSource, split: str, device: torch.device,
                     batch_size: int = 32, layers: Sequence[int] = (-1,), pools: Sequence[str] = ("mean",),
                     max_len: int | None = None, baseline: bool = False,
                     cache_root: Path | None = None, variant: tuple[str, Transform] | None = None) -> FeatureSet:
    """Pooled features of every sample of ``split`` for each (layer, pool) asked (see module doc).

    With ``cache_root``, one pass extracts every feature the encoder has (each block's mean, the final
    mean and CLS, the classical baseline) and caches them all, so the linear probe, k-NN and the
    layer probe of one encoder share a single pass over the data; later calls read them back.

    ``variant``: (name, transform) of the adapter's ``probe_variants``: every batch goes through the
    transform, which returns the altered batch and which items to keep [B] (cached under its name)."""
    transform = variant[1] if variant else None
    wanted = _wanted(encoder, layers, pools)
    keys = [feature_key(*w) for w in wanted] + (["baseline"] if baseline else [])
    if cache_root is None:
        bad: Counter = Counter()
        feats, labels, ids = _extract(encoder, source, split, device, batch_size, wanted, max_len, baseline, bad,
                                      transform)
        return FeatureSet(feats, labels, ids, dict(bad))
    every = _wanted(encoder, [*range(encoder.depth), -1], list(POOLS))
    ident = json.dumps({"format": FORMAT, "weights": weights_hash(encoder), "data": source.fingerprint,
                        "root": str(Path(source.root).resolve()), "split": split, "max_len": max_len,
                        "variant": variant[0] if variant else None,
                        "encoder": {k: v for k, v in encoder.config.items() if k not in ("step", "objective")}},
                       sort_keys=True, default=str)  # the architecture too: equal weights, other heads
    path = Path(cache_root) / f"{hashlib.sha1(ident.encode()).hexdigest()[:20]}.safetensors"
    if not path.exists():
        bad = Counter()
        feats, labels, ids = _extract(encoder, source, split, device, batch_size, every, max_len, True, bad, transform)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({**{f"f/{k}": v.contiguous() for k, v in feats.items()}, "labels": labels.contiguous(),
                   "ids": ids.contiguous()}, str(tmp))
        write_text(path.with_suffix(".json"), json.dumps({"skipped": dict(bad), "split": split,
                                                         "encoder": str(getattr(encoder, "source", "")),
                                                         "data": str(source.root)}))
        os.replace(tmp, path)  # the json first: a present .safetensors always has its meta
    t = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    cached = {k[2:]: v for k, v in t.items() if k.startswith("f/")}
    feats = {k: meanmax(cached, int(k.split(":")[0])) if k.endswith(":meanmax") else cached[k] for k in keys}
    return FeatureSet(feats, t["labels"], t["ids"], meta["skipped"])


def cache_root_for(cache_dir: Path | str | None, enabled: bool = True) -> Path | None:
    """Where cached features live: ``<cache_dir>/features`` (``eval.cache_features=false``: nowhere)."""
    return Path(cache_dir) / "features" if (enabled and cache_dir is not None) else None
