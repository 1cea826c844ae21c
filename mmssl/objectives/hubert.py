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
aligned with the tokens the encoder sees (the teacher of iteration 2 then runs at every step)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from mmssl.encoder import Encoder
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
from mmssl.registry import OBJECTIVES
from mmssl.types import Batch, ObjectiveOutput


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
            raise ValueError(f"objective.targets must be 'features' or 'layer', not {kind!r}")
        self.assign = cfg.get("assign") or "table"
        if self.assign not in ("table", "online"):
            raise ValueError(f"objective.assign must be 'table' or 'online', not {self.assign!r}")
        default_k = 100 if self.target_kind == "features" else 500
        self.k = int(cfg.get("k") or default_k)
        final_dim = int(cfg.get("final_dim", 256))
        self.final_proj = nn.Linear(encoder.dim, final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(self.k, final_dim).normal_(0, 1))
        self.units: UnitTable | None = None
        self.codebook: Codebook | IdCodebook | None = None
        self._features: FeatureFn | None = None
        self._teacher: list[Encoder] = []

    @property
    def encoder(self) -> Encoder:
        return self.towers[self.modality]

    def heads(self) -> dict[str, nn.Module]:
        h = nn.Module()
        h.final_proj = self.final_proj
        h.label_embeddings = self.label_embeddings
        return {"hubert": h}

    # -- targets --------------------------------------------------------------------------------------
    def _target_spec(self) -> tuple[dict[str, Any], Any]:
        """(meta that identifies the targets, feature function)."""
        adapter = self.encoder.adapter
        meta: dict[str, Any] = {"feature": self.target_kind, "frame_rate": adapter.token_rate() or 0.0}
        if self.target_kind == "features":
            meta["feature_impl"] = adapter.unit_features_id
            return meta, adapter.unit_features
        from mmssl.export import load_encoder, resolve_encoder_dir

        teacher_path = self.cfg.get("teacher")
        if not teacher_path:
            raise ValueError("objective.targets=layer needs objective.teacher=RUN_DIR (a previous run)")
        enc_dir = resolve_encoder_dir(Path(teacher_path), self.modality)
        teacher = load_encoder(enc_dir)
        layer = int(self.cfg.get("layer") or max(1, round(2 * teacher.depth / 3)))
        if not 1 <= layer <= teacher.depth:
            raise ValueError(f"objective.layer must be in 1..{teacher.depth}, got {layer}")
        meta.update(teacher=str(enc_dir), teacher_sha1=_file_sha1(enc_dir / "model.safetensors"), layer=layer)
        self._teacher = [teacher]  # a list keeps it out of this module's parameters and checkpoints

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
        meta, feature_fn = self._target_spec()
        first, feats, fpad = self._first_features(ctx, feature_fn)
        discrete = is_discrete(feats)
        if discrete:
            meta["discrete"] = True
        seed = int(self.cfg.get("kmeans_seed", 0))
        if self.cfg.get("targets_dir"):
            out = Path(self.cfg["targets_dir"])
        else:
            key = fingerprint(data=ctx.data_fingerprint, k=self.k, seed=seed,
                              **{k: v for k, v in meta.items() if k != "teacher"})
            out = ctx.cache_dir / "units" / f"{self.modality}-{meta['feature']}-k{self.k}-{key}"
        if ctx.is_main and not (out / "meta.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(out) + ".lock"):
                if not (out / "meta.json").exists():
                    if discrete:
                        fit_id_units(ctx, feature_fn, self.k, meta, out)
                    else:
                        fit_units(ctx, feature_fn, self.k, meta, out, seed=seed,
                                  max_iter=int(self.cfg.get("kmeans_iters", 30)))
        ctx.barrier()
        expect = {"k": self.k, "data": ctx.data_fingerprint, **{k: v for k, v in meta.items() if k != "teacher"}}
        if self.assign == "online" or discrete:
            # ids are labelled at each step whatever ``assign`` says: a lookup costs no more than a table
            self.codebook = load_codebook(out, expect).to(ctx.device)
            self._check_features(first, feats, fpad)
            self._features = feature_fn
            m = self.codebook.meta
        else:
            table = load_units(out, expect=expect)
            self.units = table.to(ctx.device)
            check_alignment(self.units, ctx, self.encoder.adapter.num_tokens)
            self._teacher = []
            m = table.meta
        info = {"targets_dir": str(out), "targets_feature": m["feature"], "targets_k": m["k"],
                "targets_assign": "online" if self.codebook is not None else "table",
                "targets_clusters_used": m["cluster_usage"]["used"],
                "targets_perplexity": m["cluster_usage"]["perplexity"]}
        if "pnmi" in m:
            info["targets_pnmi"] = m["pnmi"]
        if "layer" in m:
            info["targets_layer"] = m["layer"]
        return info

    def labels(self, batch: Batch, index: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """The unit of every token [B, N] (-100 at padding): looked up in the table, or assigned now
        from the features of this very batch (``assign: online``)."""
        if self.codebook is not None and self._features is not None:
            # in float32 outside any autocast, as the features the centroids were fitted on
            with torch.no_grad(), torch.autocast(pad.device.type, enabled=False):
                feats, _ = self._features(batch)
            if tuple(feats.shape[:2]) != tuple(pad.shape):
                raise ValueError(f"unit features {tuple(feats.shape[:2])} do not align with the tokens {tuple(pad.shape)}")
            return self.codebook.assign(feats, pad)
        if self.units is None:
            raise RuntimeError("HuBERT targets are not prepared: call prepare() first")
        if index.shape[-1] != 1:
            raise ValueError("objective.assign=table looks units up by index[..., 0], a position only in "
                             "one-dimensional token sequences; use objective.assign=online")
        return self.units.lookup(batch["sample_id"], index[..., 0], pad)

    # -- loss -----------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> ObjectiveOutput:
        enc = self.encoder
        tok = enc.adapter.tokenize(batch)
        labels = self.labels(batch, tok.index, tok.pad)  # [B, N]
        mask = enc.adapter.make_mask(tok, self.mask_ratio)
        out = enc.encode(tok, mask, "replace")
        B, N = labels.shape
        # Every frame's logits in one matmul; masks weight the per-frame loss afterwards, so the
        # step needs no boolean indexing (no host synchronisation).
        logits = unit_logits(self.final_proj(out.last).reshape(B * N, -1), self.label_embeddings,
                             self.temperature, labels.reshape(-1).clamp_min(0))
        ce = F.cross_entropy(logits, labels.reshape(-1).clamp_min(0), reduction="none").view(B, N)
        correct = (logits.argmax(-1).view(B, N) == labels)
        real = ~tok.pad
        m = (mask & real).float()
        u = (~mask & real).float()
        nm, nu = m.sum().clamp_min(1.0), u.sum().clamp_min(1.0)
        loss_m = (ce * m).sum() / nm
        loss_u = (ce * u).sum() / nu
        loss = loss_m + self.unmasked_weight * loss_u if self.unmasked_weight else loss_m
        metrics = {"loss_masked": loss_m.detach(), "loss_unmasked": loss_u.detach(),
                   "acc_masked": (correct.float() * m).sum() / nm, "acc_unmasked": (correct.float() * u).sum() / nu,
                   "mask_fraction": m.sum() / real.float().sum().clamp_min(1.0)}
        return ObjectiveOutput(loss, metrics)
