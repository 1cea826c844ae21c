"""HuBERT: masked prediction of discrete units (Hsu et al., 2021), for any adapter with per-token
unit features.

The student sees ``replace``-masked tokens (the adapter's own mask shape); a projection of each
output token is compared by cosine similarity / 0.1 with learned unit embeddings; cross-entropy over
masked tokens (``unmasked_weight`` adds the unmasked ones, 0 as in the paper). Targets come from
``unit_targets``: iteration 1 (``targets: features``) clusters the adapter's hand-made per-token
``unit_features`` (k=100; features that are ids already are their own units), iteration 2
(``targets: layer``) clusters layer L of a teacher run (k=500).

``assign`` says how a training token gets its unit: ``table`` looks it up by (sample id,
``index[..., 0]``) in labels fitted once per item (HuBERT's offline labels: right where training crops
keep token positions, as hop-aligned audio crops do); ``online`` recomputes the token's feature at each
step and takes the nearest cached centroid, so random crops, subsets and resampling keep labels
aligned with the tokens the encoder sees (the teacher of iteration 2 then runs at every step).

Several codebooks (MS-HuBERT's multi-cluster targets; fairseq HuBERT's several label sets): a list
``k: [50, 100, 200]`` fits one k-means per k on the same features (with ``targets: layer``, a list
``layer: [6, 9]`` gives each codebook its own teacher layer), each with its own projection and unit
embeddings; the masked losses are summed, as fairseq's criterion sums its label sets. ``topics: T``
adds HuBERTopic's utterance-level target (Maekaku et al., 2023): an LDA topic model over each training
item's bag of units (the first codebook's), the item's most probable topic its label, predicted from
the mean of the masked pass's output tokens and weighted by ``topic_weight``."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from mmssl.encoder import Encoder, masked_mean
from mmssl.errors import ConfigError
from mmssl.objectives.base import Objective, PrepareContext
from mmssl.objectives.hubert_loss import unit_logits
from mmssl.objectives.unit_targets import (
    Codebook,
    FeatureFn,
    IdCodebook,
    UnitTable,
    check_alignment,
    fingerprint,
    fit_id_units,
    fit_units,
    is_discrete,
    load_codebook,
    load_units,
)
from mmssl.objectives.unit_topics import TopicTable, fit_or_load_topics, topics_path
from mmssl.registry import OBJECTIVES
from mmssl.types import Batch, ObjectiveOutput


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _int_list(value: Any, key: str) -> list[int]:
    """``100`` or ``[100, 500]`` -> [100] or [100, 500]; null -> []."""
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ConfigError(f"{key} must be an integer or a list of integers, not {value!r}")
    return [int(v) for v in values]


class _UnitHead(nn.Module):
    """An extra codebook's projection and unit embeddings [k, final_dim] (the first codebook's are
    HuBERT's own ``final_proj`` and ``label_embeddings``)."""

    def __init__(self, dim: int, final_dim: int, k: int) -> None:
        super().__init__()
        self.final_proj = nn.Linear(dim, final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(k, final_dim).normal_(0, 1))


class _Target:
    """One codebook's units: a table of labels per sample id, or centroids (an id vocabulary) with
    the feature function that labels each step's tokens."""

    def __init__(self, path: Path, meta: dict[str, Any], units: UnitTable | None = None,
                 codebook: Codebook | IdCodebook | None = None, features: FeatureFn | None = None,
                 ctx: PrepareContext | None = None) -> None:
        self.path, self.meta, self.units, self.codebook, self.features = path, meta, units, codebook, features
        self._ctx = ctx

    @property
    def online(self) -> bool:
        return self.codebook is not None and self.features is not None

    def labels(self, batch: Batch, index: torch.Tensor, pad: torch.Tensor,
               feats: torch.Tensor | None = None) -> torch.Tensor:
        """The unit of every token [B, N] (-100 at padding); ``feats`` [B, N, F]: this step's unit
        features when the caller computed them already (several codebooks on one feature)."""
        if self.online:
            if feats is None:
                # in float32 outside any autocast, as the features the centroids were fitted on
                with torch.no_grad(), torch.autocast(pad.device.type, enabled=False):
                    feats, _ = self.features(batch)  # type: ignore[misc]
            if tuple(feats.shape[:2]) != tuple(pad.shape):
                raise ValueError(f"unit features {tuple(feats.shape[:2])} do not align with the tokens {tuple(pad.shape)}")
            return self.codebook.assign(feats, pad)  # type: ignore[union-attr]
        if self.units is None:
            raise RuntimeError("HuBERT targets are not prepared: call prepare() first")
        if index.shape[-1] != 1:
            raise ConfigError("objective.assign=table looks units up by index[..., 0], a position only in "
                             "one-dimensional token sequences; use objective.assign=online")
        return self.units.lookup(batch["sample_id"], index[..., 0], pad)

    def sample_units(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(sample ids [B], units [B, N], -100 at padding) of every whole train item: the table's rows,
        or each item's tokens labelled now."""
        if self.units is not None:
            t = self.units
            for sid in (t.row >= 0).nonzero()[:, 0].split(256):
                length = t.lengths[t.row[sid]]
                frame = torch.arange(int(length.max()), device=sid.device)[None].expand(len(sid), -1)
                yield sid, t.lookup(sid, frame, frame >= length[:, None])
            return
        if self.codebook is None or self.features is None or self._ctx is None:
            raise RuntimeError("HuBERT targets are not prepared: call prepare() first")
        for batch in self._ctx.iter_split("train"):
            batch = {key: v.to(self._ctx.device) for key, v in batch.items()}
            with torch.no_grad():
                feats, pad = self.features(batch)
            yield batch["sample_id"], self.codebook.assign(feats, pad)


@OBJECTIVES.register("hubert")
class HuBERT(Objective):
    name = "hubert"

    needs = ("unit_features", "per-token unit features")

    no_val_loss = "HuBERT's unit targets are fitted on the train split only: held-out items have none"

    def __init__(self, tower: tuple[str, Encoder], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.modality, encoder = tower
        self.towers[self.modality] = encoder
        self.cfg = dict(cfg)
        self.mask_ratio = float(cfg.get("mask_ratio", 0.5656))
        self.temperature = float(cfg.get("temperature", 0.1))
        self.unmasked_weight = float(cfg.get("unmasked_weight", 0.0))
        kind = cfg.get("targets") or "features"
        # "mfcc": this option's name while speech was the only adapter with unit features
        self.target_kind = "features" if kind == "mfcc" else kind
        if self.target_kind not in ("features", "layer"):
            raise ConfigError(f"objective.targets must be 'features' or 'layer', not {kind!r}")
        self.assign = cfg.get("assign") or "table"
        if self.assign not in ("table", "online"):
            raise ConfigError(f"objective.assign must be 'table' or 'online', not {self.assign!r}")
        default_k = 100 if self.target_kind == "features" else 500
        self.ks = _int_list(cfg.get("k"), "objective.k") or [default_k]
        layers = _int_list(cfg.get("layer"), "objective.layer") or [None]
        if len(layers) not in (1, len(self.ks)):
            raise ConfigError(f"objective.layer lists {len(layers)} layers for {len(self.ks)} codebooks "
                             f"(objective.k): give one layer, or one per codebook")
        self.layers: list[int | None] = layers * len(self.ks) if len(layers) == 1 else layers
        if cfg.get("targets_dir") and len(self.ks) > 1:
            raise ConfigError("objective.targets_dir names one unit table; with several codebooks (a list "
                             "objective.k) leave it unset: each codebook is cached under cache_dir/units")
        self.k = self.ks[0]
        final_dim = int(cfg.get("final_dim", 256))
        # codebook 0 keeps the single-codebook names (heads/hubert), so the heads of a plain HuBERT, a
        # converted fairseq one included, still load into it; codebook i >= 1 is heads/hubert_<i>
        self.final_proj = nn.Linear(encoder.dim, final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(self.k, final_dim).normal_(0, 1))
        self.extra = nn.ModuleList(_UnitHead(encoder.dim, final_dim, k) for k in self.ks[1:])
        self.topics = int(cfg.get("topics") or 0)
        self.topic_weight = float(cfg.get("topic_weight", 0.1))
        self.topic_head = nn.Linear(encoder.dim, self.topics) if self.topics else None
        self.targets: list[_Target] = []
        self.topic_table: TopicTable | None = None
        self._teacher: list[Encoder] = []  # a list keeps it out of this module's parameters and checkpoints

    @property
    def encoder(self) -> Encoder:
        return self.towers[self.modality]

    def heads(self) -> dict[str, nn.Module]:
        h = nn.Module()
        h.final_proj = self.final_proj
        h.label_embeddings = self.label_embeddings
        out: dict[str, nn.Module] = {"hubert": h, **{f"hubert_{i + 1}": e for i, e in enumerate(self.extra)}}
        if self.topic_head is not None:
            out["hubert_topic"] = self.topic_head
        return out

    def use_units(self, table: UnitTable) -> None:
        """Train codebook 0 on a given unit table instead of ``prepare``'s (benchmarks and tests that
        bring their own labels)."""
        self.targets = [_Target(Path("."), table.meta, units=table)]

    def _unit_heads(self) -> list[tuple[nn.Linear, torch.Tensor]]:
        """(projection, unit embeddings [k, final_dim]) of each codebook, in ``objective.k``'s order."""
        return [(self.final_proj, self.label_embeddings)] + [(e.final_proj, e.label_embeddings) for e in self.extra]

    # -- targets --------------------------------------------------------------------------------------
    def _target_spec(self, layer_given: int | None) -> tuple[dict[str, Any], FeatureFn]:
        """(meta that identifies one codebook's targets, its feature function)."""
        adapter = self.encoder.adapter
        meta: dict[str, Any] = {"feature": self.target_kind, "frame_rate": adapter.token_rate() or 0.0}
        if self.target_kind == "features":
            meta["feature_impl"] = adapter.unit_features_id
            return meta, adapter.unit_features
        from mmssl.export import load_encoder, resolve_encoder_dir

        teacher_path = self.cfg.get("teacher")
        if not teacher_path:
            raise ConfigError("objective.targets=layer needs objective.teacher=RUN_DIR (a previous run)")
        enc_dir = resolve_encoder_dir(Path(teacher_path), self.modality)
        if not self._teacher:
            self._teacher = [load_encoder(enc_dir)]
        teacher = self._teacher[0]
        layer = int(layer_given or max(1, round(2 * teacher.depth / 3)))
        if not 1 <= layer <= teacher.depth:
            raise ConfigError(f"objective.layer must be in 1..{teacher.depth}, got {layer}")
        meta.update(teacher=str(enc_dir), teacher_sha1=_file_sha1(enc_dir / "model.safetensors"), layer=layer)

        def feats(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            t = self._teacher[0]
            t.to(batch[self.modality].device).eval()
            out = t(batch, return_layers=True)
            return out.layers[layer - 1], out.pad

        return meta, feats

    def _first_features(self, ctx: PrepareContext, feature_fn: FeatureFn) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """The first train batch and its unit features (whether they are ids decides the fit)."""
        batch = next(iter(ctx.iter_split("train")), None)
        if batch is None:
            raise ValueError("the train split is empty: there is nothing to fit units on")
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        with torch.no_grad():
            feats, pad = feature_fn(batch)
        return batch, feats, pad

    def _check_features(self, batch: Batch, feats: torch.Tensor, pad: torch.Tensor) -> None:
        """Online units need features 1:1 with the tokens: same shape [B, N], same padding."""
        with torch.no_grad():
            tok = self.encoder.adapter.tokenize(batch)
        if tuple(feats.shape[:2]) != tuple(tok.pad.shape) or not torch.equal(pad.to(tok.pad.device), tok.pad):
            raise ValueError(f"unit features of shape {tuple(feats.shape[:2])} do not align with the encoder's "
                             f"tokens {tuple(tok.pad.shape)} (or their padding differs)")

    def prepare(self, ctx: PrepareContext) -> dict[str, Any]:
        self.targets = []
        info: dict[str, Any] = {}
        for i, (k, layer) in enumerate(zip(self.ks, self.layers)):
            target, mine = self._prepare_codebook(ctx, k, layer)
            self.targets.append(target)
            info.update(mine if i == 0 else {f"{key}_{i}": v for key, v in mine.items()})
        if all(t.units is not None for t in self.targets):
            self._teacher = []  # tables of a teacher's units need the teacher no more
        if self.topic_head is not None:
            seed, iters = int(self.cfg.get("kmeans_seed", 0)), int(self.cfg.get("topic_iters", 20))
            first = self.targets[0]
            stem = topics_path(ctx.cache_dir / "units", first.path, self.topics, seed,
                               "online" if first.online else "table", iters)
            table = fit_or_load_topics(first.sample_units, stem, self.k, self.topics, seed, iters,
                                       is_main=ctx.is_main, barrier=ctx.barrier)
            self.topic_table = table.to(ctx.device)
            info.update(targets_topics=self.topics, targets_topics_used=table.meta["used"],
                        targets_topics_perplexity=table.meta["perplexity"])
        return info

    def _prepare_codebook(self, ctx: PrepareContext, k: int, layer: int | None) -> tuple[_Target, dict[str, Any]]:
        """Fit (or load from the cache) one codebook's units -> (its targets, metrics to log)."""
        meta, feature_fn = self._target_spec(layer)
        first, feats, fpad = self._first_features(ctx, feature_fn)
        discrete = is_discrete(feats)
        if discrete:
            meta["discrete"] = True
        seed = int(self.cfg.get("kmeans_seed", 0))
        if self.cfg.get("targets_dir"):
            out = Path(self.cfg["targets_dir"])
        else:
            key = fingerprint(data=ctx.data_fingerprint, k=k, seed=seed,
                              **{n: v for n, v in meta.items() if n != "teacher"})
            out = ctx.cache_dir / "units" / f"{self.modality}-{meta['feature']}-k{k}-{key}"
        if ctx.is_main and not (out / "meta.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(out) + ".lock"):
                if not (out / "meta.json").exists():
                    if discrete:
                        fit_id_units(ctx, feature_fn, k, meta, out)
                    else:
                        fit_units(ctx, feature_fn, k, meta, out, seed=seed,
                                  max_iter=int(self.cfg.get("kmeans_iters", 30)))
        ctx.barrier()
        expect = {"k": k, "data": ctx.data_fingerprint, **{n: v for n, v in meta.items() if n != "teacher"}}
        if self.assign == "online" or discrete:
            # ids are labelled at each step whatever ``assign`` says: a lookup costs no more than a table
            codebook = load_codebook(out, expect).to(ctx.device)
            self._check_features(first, feats, fpad)
            target = _Target(out, codebook.meta, codebook=codebook, features=feature_fn, ctx=ctx)
        else:
            table = load_units(out, expect=expect).to(ctx.device)
            check_alignment(table, ctx, self.encoder.adapter.num_tokens)
            target = _Target(out, table.meta, units=table)
        m = target.meta
        info = {"targets_dir": str(out), "targets_feature": m["feature"], "targets_k": m["k"],
                "targets_assign": "online" if target.codebook is not None else "table",
                "targets_clusters_used": m["cluster_usage"]["used"],
                "targets_perplexity": m["cluster_usage"]["perplexity"]}
        if "pnmi" in m:
            info["targets_pnmi"] = m["pnmi"]
        if "layer" in m:
            info["targets_layer"] = m["layer"]
        return target, info

    def _shared_features(self, batch: Batch) -> dict[int | None, torch.Tensor]:
        """This step's unit features, once for every online codebook that shares them: the adapter's
        features (key None), or the teacher's layers from one pass (key: the layer). Empty with one
        codebook or with tables."""
        online = [i for i, t in enumerate(self.targets) if t.online]
        if len(online) < 2:
            return {}
        with torch.no_grad(), torch.autocast(batch[self.modality].device.type, enabled=False):
            if self.target_kind == "features":
                feats, _ = self.targets[online[0]].features(batch)  # type: ignore[misc]
                return {None: feats}
            t = self._teacher[0]
            t.to(batch[self.modality].device).eval()
            layers = t(batch, return_layers=True).layers
        return {self.layers[i]: layers[int(self.targets[i].meta["layer"]) - 1] for i in online}

    def labels(self, batch: Batch, index: torch.Tensor, pad: torch.Tensor, codebook: int = 0) -> torch.Tensor:
        """The unit of every token [B, N] (-100 at padding) in codebook ``codebook``: looked up in the
        table, or assigned now from the features of this very batch (``assign: online``)."""
        if not self.targets:
            raise RuntimeError("HuBERT targets are not prepared: call prepare() first")
        return self.targets[codebook].labels(batch, index, pad)

    # -- loss -----------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> ObjectiveOutput:
        enc = self.encoder
        tok = enc.adapter.tokenize(batch)
        mask = enc.adapter.make_mask(tok, self.mask_ratio)
        out = enc.encode(tok, mask, "replace")
        real = ~tok.pad
        m = (mask & real).float()
        u = (~mask & real).float()
        nm, nu = m.sum().clamp_min(1.0), u.sum().clamp_min(1.0)
        loss_m = loss_u = torch.zeros((), device=m.device)
        metrics: dict[str, torch.Tensor] = {}
        shared = self._shared_features(batch)
        for i, (proj, emb) in enumerate(self._unit_heads()):
            if not self.targets:
                raise RuntimeError("HuBERT targets are not prepared: call prepare() first")
            labels = self.targets[i].labels(batch, tok.index, tok.pad, shared.get(self.layers[i]))  # [B, N]
            B, N = labels.shape
            target = labels.reshape(-1).clamp_min(0)
            # Every frame's logits in one matmul; masks weight the per-frame loss afterwards, so the
            # step needs no boolean indexing (no host synchronisation).
            logits = unit_logits(proj(out.last).reshape(B * N, -1), emb, self.temperature, target)
            ce = F.cross_entropy(logits, target, reduction="none").view(B, N)
            correct = (logits.argmax(-1).view(B, N) == labels).float()
            lm, lu = (ce * m).sum() / nm, (ce * u).sum() / nu
            loss_m, loss_u = loss_m + lm, loss_u + lu  # several codebooks: summed, as fairseq sums label sets
            tag = "" if i == 0 else f"_{i}"
            metrics[f"acc_masked{tag}"] = (correct * m).sum() / nm
            metrics[f"acc_unmasked{tag}"] = (correct * u).sum() / nu
            if len(self.ks) > 1:
                metrics[f"loss_masked{tag}"] = lm.detach()
        loss = loss_m + self.unmasked_weight * loss_u if self.unmasked_weight else loss_m
        several = len(self.ks) > 1
        metrics["loss_masked_sum" if several else "loss_masked"] = loss_m.detach()
        metrics["loss_unmasked_sum" if several else "loss_unmasked"] = loss_u.detach()
        metrics["mask_fraction"] = m.sum() / real.float().sum().clamp_min(1.0)
        if self.topic_head is not None:
            if self.topic_table is None:
                raise RuntimeError("HuBERT topic targets are not prepared: call prepare() first")
            topic = self.topic_table.lookup(batch["sample_id"])  # [B]
            logits_t = self.topic_head(masked_mean(out.last, tok.pad)).float()  # [B, T]
            loss_t = F.cross_entropy(logits_t, topic)
            loss = loss + self.topic_weight * loss_t
            metrics["loss_topic"] = loss_t.detach()
            metrics["acc_topic"] = (logits_t.argmax(-1) == topic).float().mean()
        return ObjectiveOutput(loss, metrics)
