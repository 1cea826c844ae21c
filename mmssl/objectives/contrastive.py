"""Contrastive objectives between two modalities: ``clip``, ``clap`` and ``cloob``.

Each modality is its own Encoder (any adapter, its own size), pooled (``Encoder.embed``), projected by
its own head to a shared ``embed_dim`` space and L2-normalised. Pair i of the batch is the positive.

- ``clip``: symmetric InfoNCE with a learnable logit scale stored as a log, initialised to
  log(1 / 0.07) and clamped at log 100 (open_clip's ``ClipLoss``; ``contrastive_loss.clip_loss``).
- ``clap``: the same loss with one audio tower (speech) and one text tower (LAION-CLAP's recipe).
- ``cloob``: modern-Hopfield retrieval within the batch and InfoLOOB (ml-jku/cloob), inverse
  temperature 30 and beta 8, fixed by default (``learn_inv_tau`` / ``learn_beta`` make them learnable).

Under DDP the normalised embeddings are gathered across ranks with gradients and every rank computes
the loss of the global batch (``mmssl.train.gather``), so gradients equal single-process ones. Only in
training: evaluation scores each rank's own batch. ``trainer.accumulate=N`` caches the features of N
micro-batches and computes the loss over all of them (``mmssl.train.accumulate``): the negatives are
N x batch x world, and loss and gradients equal the N-times larger batch's.

Heads (``heads/contrastive.safetensors`` + ``.json``): both projections and the temperatures;
``mmssl.export.load_pair(run_dir)`` rebuilds the pair in the shared space for retrieval and zero-shot evaluation."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.encoder import Encoder
from mmssl.objectives.base import Objective
from mmssl.objectives.contrastive_loss import MAX_LOG_SCALE, clamp_log_scale_, clip_loss, cloob_loss
from mmssl.registry import MODALITIES, OBJECTIVES
from mmssl.train.accumulate import FeatureCache
from mmssl.train.gather import gather_with_grad, rank_world
from mmssl.types import Batch, ObjectiveOutput


class Projection(nn.Module):
    """[B, D] pooled encoder features -> [B, E]. ``hidden=0``: CLIP's bias-free linear map; else a
    two-layer MLP (Linear, GELU, Linear), the kind of projection LAION-CLAP puts on both towers (theirs
    uses ReLU)."""

    def __init__(self, dim: int, embed_dim: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden:
            self.net: nn.Module = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        else:
            self.net = nn.Linear(dim, embed_dim, bias=False)
            nn.init.normal_(self.net.weight, std=dim ** -0.5)  # CLIP's projection init (width^-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveHead(nn.Module):
    """Everything of a contrastive objective beyond its encoders: one projection per modality and the
    temperatures, stored as logs (``log_scale`` for CLIP; ``log_inv_tau``, ``log_beta`` for CLOOB).
    ``config`` is written beside the weights so ``mmssl.export.load_pair`` can rebuild it."""

    def __init__(self, dims: dict[str, int], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.modalities = list(dims)
        self.config = {"loss": cfg["loss"], "modalities": self.modalities, "dims": dict(dims),
                       "embed_dim": int(cfg["embed_dim"]), "proj_hidden": int(cfg.get("proj_hidden") or 0),
                       "max_logit_scale": float(cfg.get("max_logit_scale") or 100.0),
                       "identity": list(cfg.get("identity") or [])}
        # towers that already end in the shared space (an open_clip tower's own projection) keep it
        self.proj = nn.ModuleDict({m: nn.Identity() if m in self.config["identity"]
                                   else Projection(d, self.config["embed_dim"], self.config["proj_hidden"])
                                   for m, d in dims.items()})
        # only what the loss uses may require gradients: DDP fails on trainable parameters without any
        init_scale = cfg.get("init_logit_scale") or 1.0 / float(cfg.get("init_temperature") or 0.07)
        self.log_scale = nn.Parameter(torch.tensor(math.log(float(init_scale))),
                                      requires_grad=cfg["loss"] == "clip" and bool(cfg.get("learn_scale", True)))
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(float(cfg.get("inv_tau") or 30.0))),
                                        requires_grad=bool(cfg.get("learn_inv_tau", False)))
        self.log_beta = nn.Parameter(torch.tensor(math.log(float(cfg.get("beta") or 8.0))),
                                     requires_grad=bool(cfg.get("learn_beta", False)))

    @property
    def max_log_scale(self) -> float:
        return math.log(self.config["max_logit_scale"])

    def project(self, modality: str, pooled: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, E] L2-normalised (in float32: the loss compares them in float32 anyway)."""
        return F.normalize(self.proj[modality](pooled).float(), dim=-1)

    def loss(self, a: torch.Tensor, b: torch.Tensor, params_live: bool = True) -> torch.Tensor:
        """a, b: [B, E] normalised embeddings of the whole (global) batch -> scalar. ``params_live``
        False: the temperatures enter as constants (feature accumulation's later passes, so they take
        their gradient once per step)."""
        def p(t: torch.Tensor) -> torch.Tensor:
            return t if params_live else t.detach()

        if self.config["loss"] == "cloob":
            return cloob_loss(a, b, inv_tau=p(self.log_inv_tau).clamp(max=MAX_LOG_SCALE).exp(),
                              beta=p(self.log_beta).exp())
        return clip_loss(a, b, p(self.log_scale), self.max_log_scale)

    def clamp_(self) -> None:
        """open_clip / ml-jku/cloob clamp the stored logs in place after each optimizer step."""
        clamp_log_scale_(self.log_scale, self.max_log_scale)
        clamp_log_scale_(self.log_inv_tau, MAX_LOG_SCALE)


def _open_clip_logit_scale(tower_cfgs: Any) -> float | None:
    """exp(logit_scale) of the first open_clip weights file among the towers, if one was given."""
    from mmssl.towers.open_clip import read_state_dict

    for oc in tower_cfgs:
        src = oc.get("weights") or oc.get("initialised_from")
        if src and Path(src).exists():
            sd = read_state_dict(src)
            if "logit_scale" in sd:
                return float(sd["logit_scale"].float().exp())
    return None


class Contrastive(Objective):
    """Two towers, their projections and a contrastive loss (module docstring)."""

    num_modalities = 2
    loss_name = "clip"
    bucket_by_length = False  # in-batch negatives need i.i.d. batches (see Objective.bucket_by_length)
    #: trainer.accumulate caches every micro-batch's features and computes one loss over all of them
    #: (mmssl.train.accumulate), so accumulation keeps every negative
    accumulates_features = True

    def __init__(self, encoders: dict[str, Encoder], cfg: dict[str, Any]) -> None:
        super().__init__()
        for m, enc in encoders.items():
            self.towers[m] = enc
        self.cfg = dict(cfg)
        self.pair = list(encoders)
        self.gather = bool(cfg.get("gather", True))
        for enc in encoders.values():  # contrastive objectives never mask: no gradient reaches it
            if isinstance(getattr(enc, "mask_embedding", None), nn.Parameter):
                enc.mask_embedding.requires_grad_(False)
        head_cfg = dict(cfg, loss=self.loss_name, embed_dim=int(cfg.get("embed_dim") or 256))
        # an open_clip tower ends in its model's shared space: no second projection, the other tower maps
        # into that space, and a weights file's logit scale is the starting one
        library = {m: e.config["open_clip"] for m, e in encoders.items() if "open_clip" in e.config}
        if library:
            dims = {int(encoders[m].dim) for m in library}
            if len(dims) > 1:
                raise ValueError(f"the open_clip towers {sorted(library)} end in spaces of different widths {sorted(dims)}")
            head_cfg.update(embed_dim=dims.pop(), identity=sorted(library))
            scale = _open_clip_logit_scale(library.values())
            if scale is not None:
                head_cfg["init_logit_scale"] = scale
        self.head = ContrastiveHead({m: int(e.dim) for m, e in encoders.items()}, head_cfg)

    @classmethod
    def build(cls, cfg: dict[str, Any], encoders: dict[str, Encoder]) -> Contrastive:
        return cls(encoders, cfg)

    def heads(self) -> dict[str, nn.Module]:
        return {"contrastive": self.head}

    def embed(self, modality: str, batch: Batch) -> torch.Tensor:
        """Batch -> [B, E] normalised embeddings of one tower in the shared space."""
        return self.head.project(modality, self.towers[modality].embed(batch))

    def features(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{modality: [B, E]} normalised embeddings of both towers: what feature accumulation caches."""
        return {m: self.embed(m, batch) for m in self.pair}

    def forward(self, batch: Batch, cache: FeatureCache | None = None) -> ObjectiveOutput:
        """The loss of ``batch``; with ``cache`` (``trainer.accumulate``, mmssl.train.accumulate): while
        collecting, the features go into the cache and the loss is 0; afterwards the loss is that of
        every cached micro-batch with this one's features fresh."""
        feats = self.features(batch)
        a, b = (feats[m] for m in self.pair)
        with torch.no_grad():  # in-batch top-1 accuracy, both directions, on this rank's items
            sim = a @ b.T
            target = torch.arange(sim.shape[0], device=sim.device)
            acc = ((sim.argmax(1) == target).float().mean() + (sim.argmax(0) == target).float().mean()) / 2
        if cache is not None and cache.collecting:
            cache.add(feats)
            return ObjectiveOutput(a.new_zeros(()), {"batch_acc": acc})
        if cache is not None:
            feats = cache.assemble(feats)
            a, b = (feats[m] for m in self.pair)
        if self.training and self.gather and rank_world()[1] > 1:
            a, b = gather_with_grad(a), gather_with_grad(b)
        loss = self.head.loss(a, b, params_live=cache is None or cache.loss_params_live)
        metrics: dict[str, Any] = {"batch_acc": acc, "pairs": float(a.shape[0])}
        if self.loss_name == "cloob":
            metrics["inv_tau"] = self.head.log_inv_tau.detach().exp()
        else:
            metrics["logit_scale"] = self.head.log_scale.detach().clamp(max=self.head.max_log_scale).exp()
        return ObjectiveOutput(loss, metrics)

    def after_step(self, step: int) -> None:
        self.head.clamp_()


@OBJECTIVES.register("clip")
class CLIP(Contrastive):
    name = "clip"
    loss_name = "clip"


@OBJECTIVES.register("clap")
class CLAP(Contrastive):
    """CLIP's loss between an audio tower and a text tower."""

    name = "clap"
    loss_name = "clip"

    @classmethod
    def supports(cls, modalities: list[str]) -> str | None:
        why = super().supports(modalities)
        if why:
            return why
        if sorted(MODALITIES.get(m).kind for m in modalities) != ["audio", "text"]:
            audio = [m for m in MODALITIES.names() if MODALITIES.get(m).kind == "audio"]
            return f"objective 'clap' pairs audio ({', '.join(audio)}) with text, not {modalities}"
        return None


@OBJECTIVES.register("cloob")
class CLOOB(Contrastive):
    name = "cloob"
    loss_name = "cloob"
