"""Discrete-unit targets for masked prediction (HuBERT): fitted once per data set, cached on disk.

A unit table maps each training sample id to its frame labels: ``units.safetensors`` holds one flat
int16 array of labels plus per-sample offsets and lengths; ``meta.json`` says what made them (k,
feature, teacher, layer, frame rate, data fingerprint, centroid hash). Iteration 1 clusters the
adapter's hand-made ``unit_features`` (MFCC for speech); iteration 2 clusters layer L of a previous
run's encoder."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from mmssl import faults
from mmssl.atomic import make_tmp_dir, replace_dir
from mmssl.errors import BadFileError, ConfigError, read_json_object, read_safetensors
from mmssl.kmeans import StreamingKMeans, pnmi
from mmssl.objectives.base import PrepareContext
from mmssl.types import Batch

FeatureFn = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]  # -> ([B, N, F], pad [B, N])


class UnitTable(torch.nn.Module):
    """Frame labels by (sample id, frame index), held as non-persistent buffers (not checkpointed:
    they are rebuilt from the cache)."""

    def __init__(self, units: torch.Tensor, sample_ids: torch.Tensor, offsets: torch.Tensor,
                 lengths: torch.Tensor, meta: dict[str, Any]) -> None:
        super().__init__()
        n = int(sample_ids.max()) + 1 if sample_ids.numel() else 0
        row = torch.full((n,), -1, dtype=torch.long)
        row[sample_ids.long()] = torch.arange(sample_ids.numel())
        self.register_buffer("units", units.long(), persistent=False)
        self.register_buffer("row", row, persistent=False)
        self.register_buffer("offsets", offsets.long(), persistent=False)
        self.register_buffer("lengths", lengths.long(), persistent=False)
        self.meta = meta

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def lookup(self, sample_id: torch.Tensor, frame: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """sample_id: [B], frame: [B, N] absolute frame index, pad: [B, N] -> labels [B, N] (-100 at pad).

        Raises if a sample has no units or a frame lies past its labelled length: label frames must
        align exactly with encoder frames."""
        sid = sample_id.long()
        # Device-side asserts: the checks cost no host synchronisation in the training step.
        known = (sid < self.row.numel()) & (self.row[sid.clamp(0, self.row.numel() - 1)] >= 0)
        torch._assert_async(known.all(), "a training sample has no unit labels: the targets were fitted on "
                            "other data (delete the targets cache or point objective.targets_dir elsewhere)")
        r = self.row[sid.clamp(0, self.row.numel() - 1)].clamp_min(0)
        length = self.lengths[r][:, None]
        real = ~pad
        torch._assert_async(~(real & (frame >= length)).any(),
                            "encoder frames run past the unit labels: frame alignment is broken")
        idx = (self.offsets[r][:, None] + frame.clamp_max(length - 1).clamp_min(0))
        return torch.where(real, self.units[idx], torch.full_like(idx, -100))


def fingerprint(**parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _frames(ctx: PrepareContext, feature_fn: FeatureFn, labels_key: str | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield (sample_id [B], features [B, N, F], pad [B, N], frame_labels [B, N] or None) over train."""
    for batch in ctx.iter_split("train"):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        with torch.no_grad():
            feats, pad = feature_fn(batch)
        fl = batch.get(labels_key) if labels_key else None
        yield batch["sample_id"], feats.float(), pad, fl


def _dump_features(ctx: PrepareContext, feature_fn: FeatureFn, path: Path, labels_key: str
                   ) -> tuple[int, int, list[int], list[int], list[torch.Tensor]]:
    """One pass over the train split, appending each real frame's features to a float32 file, so the
    k-means passes that follow read a memory map instead of recomputing features (as HuBERT's recipes
    dump features), and the features never need to fit in memory.
    Returns (rows, dim, sample ids, frames per sample, frame labels per sample if the data has them)."""
    ids, lens, phones = [], [], []
    rows, dim = 0, 0
    with open(path, "wb") as f:
        for sid, feats, pad, fl in _frames(ctx, feature_fn, labels_key):
            real = feats[~pad]  # row-major: sample by sample, frame by frame
            dim = real.shape[-1]
            f.write(real.cpu().numpy().astype(np.float32, copy=False).tobytes())
            rows += real.shape[0]
            n = (~pad).sum(1)
            for i in range(feats.shape[0]):
                ids.append(int(sid[i]))
                lens.append(int(n[i]))
                if fl is not None:
                    phones.append(fl[i, : n[i]].cpu())
    return rows, dim, ids, lens, phones


def fit_units(ctx: PrepareContext, feature_fn: FeatureFn, k: int, meta: dict[str, Any], out_dir: Path,
              seed: int = 0, max_iter: int = 30, frame_labels_key: str = "frame_label",
              chunk_rows: int = 65536) -> dict[str, Any]:
    """Fit k-means on the train split's per-frame features and write the unit table atomically into
    ``out_dir``. Returns the meta written (with cluster usage, and PNMI where the data has frame
    labels)."""
    out_dir = Path(out_dir)
    tmp = make_tmp_dir(out_dir)
    try:
        rows, dim, ids, lens, phones = _dump_features(ctx, feature_fn, tmp / "features.f32", frame_labels_key)
        faults.point("units_dumped")
        if rows == 0:
            raise ValueError("the train split produced no frames to cluster")
        mm = np.memmap(tmp / "features.f32", dtype=np.float32, mode="r", shape=(rows, dim))

        def chunks() -> Iterator[torch.Tensor]:
            for i in range(0, rows, chunk_rows):
                yield torch.from_numpy(np.array(mm[i:i + chunk_rows]))

        km = StreamingKMeans(k, max_iter=max_iter, seed=seed, device=ctx.device).fit(chunks)
        flat = torch.cat([km.predict(c.to(km.centroids.device)).cpu() for c in chunks()]).to(torch.int16)
        (tmp / "features.f32").unlink()
        faults.point("units_fitted")
        lengths = torch.tensor(lens, dtype=torch.long)
        offsets = torch.cumsum(lengths, 0) - lengths
        usage = km.cluster_usage(flat.long())
        meta = dict(meta, k=k, inertia=km.inertia_, num_frames=rows, num_samples=len(ids), cluster_usage=usage,
                    data=ctx.data_fingerprint,
                    centroids_sha1=hashlib.sha1(km.centroids.cpu().numpy().tobytes()).hexdigest())
        if phones:
            meta["pnmi"] = pnmi(flat.numpy(), torch.cat(phones).numpy())
        save_file({"units": flat, "sample_ids": torch.tensor(ids, dtype=torch.long), "offsets": offsets,
                   "lengths": lengths}, str(tmp / "units.safetensors"))
        save_file({"centroids": km.centroids.cpu().contiguous()}, str(tmp / "centroids.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def load_units(path: Path, expect: dict[str, Any] | None = None) -> UnitTable:
    """Load a unit table; ``expect`` keys (k, feature, layer, frame_rate, ...) must match its meta."""
    path = Path(path)
    meta = read_json_object(path / "meta.json", "a unit table's meta.json", ("k",))
    for key, val in (expect or {}).items():
        if key in meta and meta[key] != val:
            raise ConfigError(f"targets in {path} have {key}={meta[key]!r}, this run expects {val!r}")
    t = read_safetensors(path / "units.safetensors", "a unit table")
    missing = [k for k in ("units", "sample_ids", "offsets", "lengths") if k not in t]
    if missing:
        raise BadFileError(path / "units.safetensors", f"lacks {', '.join(missing)} (expected a unit table)")
    return UnitTable(t["units"], t["sample_ids"], t["offsets"], t["lengths"], meta)


def check_alignment(table: UnitTable, ctx: PrepareContext, num_tokens: Callable[[Batch], torch.Tensor]) -> None:
    """Every train sample's label count must equal the encoder's token count for it (checked on load,
    so cached targets from another front-end or frame rate are refused, not silently misaligned)."""
    for batch in ctx.iter_split("train"):
        sid = batch["sample_id"].to(table.row.device)
        n = num_tokens(batch).to(table.row.device)
        r = table.row[sid.clamp_max(table.row.numel() - 1)]
        if bool((sid >= table.row.numel()).any()) or bool((r < 0).any()):
            raise ValueError("the unit targets lack some training samples: they were fitted on other data")
        bad = table.lengths[r] != n
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"unit labels of sample {int(sid[i])} have {int(table.lengths[r[i]])} frames, "
                             f"the encoder makes {int(n[i])}: frame alignment is broken")


def frame_pnmi(table: UnitTable, ctx: PrepareContext, key: str = "frame_label") -> float | None:
    """PNMI of cached units against the data's own frame labels, where the data has them."""
    got_u, got_l = [], []
    for batch in ctx.iter_split("train"):
        if key not in batch:
            return None
        pad = batch[key] < 0
        frame = torch.arange(pad.shape[1])[None].expand_as(pad)
        lab = table.lookup(batch["sample_id"].to(table.units.device), frame.to(table.units.device),
                           pad.to(table.units.device)).cpu()
        got_u.append(lab[~pad])
        got_l.append(batch[key][~pad])
    return pnmi(np.concatenate([u.numpy() for u in got_u]), np.concatenate([x.numpy() for x in got_l]))


# -- units assigned at each step ------------------------------------------------------------------------
class Codebook(torch.nn.Module):
    """Nearest-centroid units of features computed at every step (``assign: online``): the labels
    follow whatever crop, subsample or augmentation the training batch got, where a table of labels
    per sample id only holds for crops that keep token positions. Centroids are non-persistent
    buffers (rebuilt from the cache, as ``UnitTable``)."""

    def __init__(self, centroids: torch.Tensor, meta: dict[str, Any]) -> None:
        super().__init__()
        c = centroids.float()
        # distances are computed about the centroids' mean: the expanded |x|^2 - 2 x.c + |c|^2 then
        # cancels as little as the k-means fit's, which works about the data mean
        self.register_buffer("centre", c.mean(0), persistent=False)
        self.register_buffer("centroids", c - c.mean(0), persistent=False)
        self.meta = meta

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @torch.no_grad()
    def assign(self, feats: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """feats [B, N, F], pad [B, N] -> units [B, N] int64 (-100 at padding)."""
        if feats.shape[-1] != self.centroids.shape[1]:
            raise ValueError(f"unit features are {feats.shape[-1]}-wide, the cached centroids "
                             f"{self.centroids.shape[1]}-wide: the features changed since the units were fitted")
        B, N, F = feats.shape
        x = feats.float().reshape(B * N, F) - self.centre
        c_sq = self.centroids.pow(2).sum(1)
        d = torch.addmm(c_sq[None], x, self.centroids.T, beta=1.0, alpha=-2.0)  # [B*N, K]
        return torch.where(pad, torch.full_like(pad, -100, dtype=torch.long), d.argmin(1).view(B, N))


class IdCodebook(torch.nn.Module):
    """Units of features that are discrete ids already (text tokens): each of the k - 1 most frequent
    ids of the train split is a unit of its own, the rarer ones share the last unit (none do when the
    split holds at most k distinct ids). No k-means: ids have no geometry to cluster, any two
    distinct ids are equally far apart, so k-means on one-hot ids could only group them by
    frequency."""

    def __init__(self, ids: torch.Tensor, units: torch.Tensor, meta: dict[str, Any]) -> None:
        super().__init__()
        order = torch.argsort(ids)
        self.register_buffer("ids", ids[order].long(), persistent=False)
        self.register_buffer("units", units[order].long(), persistent=False)
        self.meta = meta

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @torch.no_grad()
    def assign(self, feats: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """feats [B, N, 1] integer ids, pad [B, N] -> units [B, N] int64 (-100 at padding)."""
        ids = feats[..., 0].long()
        pos = torch.searchsorted(self.ids, ids.clamp_min(0)).clamp_max(self.ids.numel() - 1)
        known = self.ids[pos] == ids
        unit = torch.where(known, self.units[pos], torch.full_like(ids, self.k - 1))
        return torch.where(pad, torch.full_like(ids, -100), unit)


def is_discrete(feats: torch.Tensor) -> bool:
    """Whether unit features are ids (an integer tensor [B, N, 1]) rather than vectors to cluster."""
    return not feats.is_floating_point() and feats.shape[-1] == 1


def fit_id_units(ctx: PrepareContext, feature_fn: FeatureFn, k: int, meta: dict[str, Any], out_dir: Path
                 ) -> dict[str, Any]:
    """Count the train split's ids and write an ``IdCodebook`` (``vocab.safetensors``: ids, units)
    atomically into ``out_dir``. Ties in frequency go to the smaller id, so the fit is deterministic."""
    out_dir = Path(out_dir)
    tmp = make_tmp_dir(out_dir)
    try:
        counts = torch.zeros(0, dtype=torch.long)
        rows = 0
        for batch in ctx.iter_split("train"):
            batch = {key: v.to(ctx.device) for key, v in batch.items()}
            with torch.no_grad():
                feats, pad = feature_fn(batch)
            ids = feats[..., 0][~pad].long().cpu()
            if ids.numel() and int(ids.min()) < 0:
                raise ValueError("discrete unit features must be ids >= 0")
            c = torch.bincount(ids, minlength=counts.numel())
            counts = torch.cat([counts, counts.new_zeros(c.numel() - counts.numel())]) + c
            rows += ids.numel()
        faults.point("units_dumped")
        if rows == 0:
            raise ValueError("the train split produced no tokens to label")
        seen = counts.nonzero()[:, 0]
        # most frequent first, ties by the smaller id (a stable sort of ids already in ascending order)
        by_freq = seen[torch.argsort(-counts[seen], stable=True)]
        units = torch.arange(by_freq.numel()).clamp_max(k - 1)
        per_unit = torch.zeros(k, dtype=torch.long).scatter_add_(0, units, counts[by_freq])
        p = per_unit.double() / per_unit.sum()
        nz = p[p > 0]
        usage = {"used": int((per_unit > 0).sum()), "k": k, "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
                 "max_fraction": float(p.max())}
        meta = dict(meta, k=k, num_frames=rows, distinct_ids=int(seen.numel()),
                    shared_unit_fraction=float(per_unit[k - 1] / per_unit.sum()) if seen.numel() > k else 0.0,
                    cluster_usage=usage, data=ctx.data_fingerprint)
        faults.point("units_fitted")
        save_file({"ids": by_freq.contiguous(), "units": units.contiguous()}, str(tmp / "vocab.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _checked_meta(path: Path, expect: dict[str, Any] | None) -> dict[str, Any]:
    meta = read_json_object(path / "meta.json", "a unit table's meta.json", ("k",))
    for key, val in (expect or {}).items():
        if key in meta and meta[key] != val:
            raise ConfigError(f"targets in {path} have {key}={meta[key]!r}, this run expects {val!r}")
    return meta


def load_codebook(path: Path, expect: dict[str, Any] | None = None) -> Codebook | IdCodebook:
    """The cached units of ``path`` for step-wise assignment: its k-means centroids, or its id
    vocabulary where the features were ids; ``expect`` keys must match its meta."""
    path = Path(path)
    meta = _checked_meta(path, expect)
    if meta.get("discrete"):
        t = read_safetensors(path / "vocab.safetensors", "an id vocabulary")
        if "ids" not in t or "units" not in t:
            raise BadFileError(path / "vocab.safetensors", "lacks ids or units (expected an id vocabulary)")
        return IdCodebook(t["ids"], t["units"], meta)
    t = read_safetensors(path / "centroids.safetensors", "k-means centroids")
    if "centroids" not in t or t["centroids"].dim() != 2 or t["centroids"].shape[0] != int(meta["k"]):
        raise BadFileError(path / "centroids.safetensors", f"holds no [{meta['k']}, F] centroids")
    return Codebook(t["centroids"], meta)
