"""HuBERT: masked prediction of discrete units (Hsu et al., 2021), for any adapter with frame-level
unit features.

The student sees ``replace``-masked tokens (span masking from the adapter); a projection of each
output frame is compared by cosine similarity / 0.1 with learned unit embeddings; cross-entropy over
masked frames (``unmasked_weight`` adds the unmasked ones, 0 as in the paper). Targets come from
``unit_targets``: iteration 1 clusters MFCCs (k=100), iteration 2 clusters layer L of a teacher run
(k=500)."""
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
from mmssl.objectives.unit_targets import UnitTable, check_alignment, fingerprint, fit_units, load_units
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

    needs = ("unit_features", "frame-level unit features")

    no_val_loss = "HuBERT's unit targets are fitted on the train split only: held-out items have none"

    def __init__(self, tower: tuple[str, Encoder], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.modality, encoder = tower
        self.towers[self.modality] = encoder
        self.cfg = dict(cfg)
        self.mask_ratio = float(cfg.get("mask_ratio", 0.5656))
        self.temperature = float(cfg.get("temperature", 0.1))
        self.unmasked_weight = float(cfg.get("unmasked_weight", 0.0))
        self.target_kind = cfg.get("targets", "mfcc")
        if self.target_kind not in ("mfcc", "layer"):
            raise ValueError(f"objective.targets must be 'mfcc' or 'layer', not {self.target_kind!r}")
        default_k = 100 if self.target_kind == "mfcc" else 500
        self.k = int(cfg.get("k") or default_k)
        final_dim = int(cfg.get("final_dim", 256))
        self.final_proj = nn.Linear(encoder.dim, final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(self.k, final_dim).normal_(0, 1))
        self.units: UnitTable | None = None

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
        if self.target_kind == "mfcc":
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

    def prepare(self, ctx: PrepareContext) -> dict[str, Any]:
        meta, feature_fn = self._target_spec()
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
                    fit_units(ctx, feature_fn, self.k, meta, out, seed=seed,
                              max_iter=int(self.cfg.get("kmeans_iters", 30)))
        ctx.barrier()
        table = load_units(out, expect={"k": self.k, "data": ctx.data_fingerprint,
                                        **{k: v for k, v in meta.items() if k != "teacher"}})
        self.units = table.to(ctx.device)
        check_alignment(self.units, ctx, self.encoder.adapter.num_tokens)
        self._teacher = []
        m = table.meta
        info = {"targets_dir": str(out), "targets_feature": m["feature"], "targets_k": m["k"],
                "targets_clusters_used": m["cluster_usage"]["used"],
                "targets_perplexity": m["cluster_usage"]["perplexity"]}
        if "pnmi" in m:
            info["targets_pnmi"] = m["pnmi"]
        if "layer" in m:
            info["targets_layer"] = m["layer"]
        return info

    # -- loss -----------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> ObjectiveOutput:
        if self.units is None:
            raise RuntimeError("HuBERT targets are not prepared: call prepare() first")
        enc = self.encoder
        tok = enc.adapter.tokenize(batch)
        mask = enc.adapter.make_mask(tok, self.mask_ratio)
        out = enc.encode(tok, mask, "replace")
        labels = self.units.lookup(batch["sample_id"], tok.index[..., 0], tok.pad)  # [B, N]
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
