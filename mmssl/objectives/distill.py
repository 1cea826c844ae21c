"""DINO-style self-distillation (Caron et al., 2021) for any adapter with ``views``.

The adapter cuts each batch into ``n_global`` global and ``n_local`` local stochastic views (multi-crop
where the modality has crops). The student (encoder + head) sees every view; the teacher, an EMA of the
student's encoder *and* head, sees the global views only. Each output goes through the DINO head: a GELU
MLP (2048-2048-256 in the paper), an L2-normalised bottleneck and a weight-normalised last layer with K
outputs whose weight rows are kept at norm 1 (``norm_last_layer=True``) and whose gradients are
cancelled for the first epoch. The loss is the cross-entropy between the centred, sharpened teacher and
the student over every pair of different views (mmssl/objectives/dino_loss.py). The teacher's encoder is
what is exported and evaluated, as in the paper.

Schedules in optimizer steps: the teacher temperature rises from 0.04 to 0.07 over
``teacher_temp_warmup_steps``; the EMA momentum rises from 0.996 to 1 on a half cosine over the run.
Defaults per modality (views, head size, momentum) come from ``objectives.distill`` in the modality
config; head sizes and the number of local views default per encoder size (``sizes`` in
configs/objective/distill.yaml)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.encoder import Encoder
from mmssl.objectives.base import Objective, PrepareContext
from mmssl.objectives.dino_loss import (batch_center, dino_loss, distinct_codes, logit_sum, teacher_temp_at,
                                       update_center)
from mmssl.objectives.ema import EMATeacher, ema_cosine
from mmssl.registry import OBJECTIVES
from mmssl.types import Batch, ObjectiveOutput

# The paper's values (main_dino.py defaults and its ViT-S/16 recipe), used where neither the objective
# config nor the modality sets a key.
PAPER = {"n_global": 2, "n_local": 8, "head_hidden_dim": 2048, "head_bottleneck_dim": 256, "out_dim": 65536,
         "head_layers": 3, "head_batch_norm": False, "student_temp": 0.1, "teacher_temp": 0.07, "warmup_teacher_temp": 0.04,
         "teacher_temp_warmup_fraction": 0.3, "center_momentum": 0.9, "momentum_base": 0.996,
         "momentum_final": 1.0}


class DINOHead(nn.Module):
    """[B, D] features -> [B, K] logits: GELU MLP to a bottleneck, L2-normalised, then a linear layer
    whose weight rows are normalised to norm 1 (DINO's weight-normalised last layer with its norm fixed,
    ``norm_last_layer=True``; normalising the rows in ``forward`` gives the same function and gradients
    as ``weight_norm`` with g = 1 frozen). ``batch_norm``: BatchNorm after each hidden linear layer
    (DINO's ``use_bn_in_head``), normalising over the batch of views; statistics are per process (DINO
    syncs them across GPUs)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"the DINO head needs at least one layer, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                if batch_norm:
                    # DINO's use_bn_in_head. Batch statistics always, in the student and the (eval-mode)
                    # teacher alike, as DINO's teacher runs its head BN in train mode; the head only runs
                    # in training, so running statistics would never be read
                    layers.append(nn.BatchNorm1d(b, track_running_stats=False))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for m in self.modules():  # DINO's init: truncated normal (std 0.02), zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.config = {"in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim,
                       "bottleneck_dim": bottleneck_dim, "nlayers": nlayers, "batch_norm": batch_norm}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return F.linear(z, F.normalize(self.last_layer.weight, dim=1, eps=1e-6))


class _Pair(nn.Module):
    """Encoder + head under one root, so one EMATeacher follows both (names ``encoder.*``, ``head.*``).

    Built on the fly around the student's modules, never registered in the objective: registering it
    would list every student parameter twice in the checkpoint."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head


def _signature(view: Batch) -> tuple | None:
    """What must agree for views to share one forward pass: every tensor's name, shape and dtype.
    None when a tensor has no batch dimension (it could not be concatenated)."""
    sig = []
    for k in sorted(view):
        t = view[k]
        if t.dim() == 0:
            return None
        sig.append((k, tuple(t.shape), t.dtype))
    return tuple(sig)


def grouped_views(views: list[Batch]) -> list[tuple[list[int], Batch]]:
    """Views of identical shapes concatenated along the batch (DINO forwards same-resolution crops
    together: fewer, larger passes). Returns (view indices, batch) groups, in order of first view."""
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(views):
        sig = _signature(v)
        groups.setdefault(sig if sig is not None else ("single", i), []).append(i)
    out = []
    for idx in groups.values():
        if len(idx) == 1:
            out.append((idx, views[idx[0]]))
        else:
            out.append((idx, {k: torch.cat([views[i][k] for i in idx]) for k in views[idx[0]]}))
    return out


def _cfg(cfg: dict[str, Any], key: str, size_entry: dict[str, Any]) -> Any:
    """objective config (or the modality's default) > the encoder size's entry > the paper's value."""
    for source in (cfg, size_entry):
        if source.get(key) is not None:
            return source[key]
    return PAPER[key]


@OBJECTIVES.register("distill")
class Distill(Objective):
    name = "distill"

    needs = ("views", "stochastic views (views(batch, n_global, n_local))")

    #: the centre is a batch statistic: a batch of one length would centre away what that length has in
    #: common, so batches are i.i.d. as DINO's sampler draws them
    bucket_by_length = False

    def __init__(self, tower: tuple[str, Encoder], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.modality, encoder = tower
        self.towers[self.modality] = encoder
        self.cfg = dict(cfg)
        if isinstance(getattr(encoder, "mask_embedding", None), nn.Parameter):
            encoder.mask_embedding.requires_grad_(False)  # views are never masked: no gradient reaches it (DDP)
        size = encoder.config.get("size")
        sized = dict((cfg.get("sizes") or {}).get(size) or {})
        self.n_global = int(_cfg(cfg, "n_global", sized))
        self.n_local = int(_cfg(cfg, "n_local", sized))
        if self.n_global < 1 or self.n_local < 0 or self.n_global + self.n_local < 2:
            raise ValueError(f"objective.n_global >= 1 and n_global + n_local >= 2 are needed "
                             f"(got {self.n_global}, {self.n_local})")
        self.student_temp = float(_cfg(cfg, "student_temp", sized))
        self.teacher_temp = float(_cfg(cfg, "teacher_temp", sized))
        self.warmup_teacher_temp = float(_cfg(cfg, "warmup_teacher_temp", sized))
        self.center_momentum = float(_cfg(cfg, "center_momentum", sized))
        self.momentum_base = float(_cfg(cfg, "momentum_base", sized))
        self.momentum_final = float(_cfg(cfg, "momentum_final", sized))
        for k in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, k) <= 0:
                raise ValueError(f"objective.{k} must be positive, got {getattr(self, k)}")
        for k in ("center_momentum", "momentum_base", "momentum_final"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"objective.{k} must be in [0, 1], got {getattr(self, k)}")
        self.head = DINOHead(encoder.dim, int(_cfg(cfg, "out_dim", sized)), int(_cfg(cfg, "head_hidden_dim", sized)),
                             int(_cfg(cfg, "head_bottleneck_dim", sized)), int(_cfg(cfg, "head_layers", sized)),
                             bool(_cfg(cfg, "head_batch_norm", sized)))
        self.teacher = EMATeacher(_Pair(encoder, self.head))
        # the running mean of the teacher's logits: a buffer, so checkpoints carry it and resume exactly
        self.register_buffer("center", torch.zeros(self.head.config["out_dim"]))
        # optimizer steps done: the schedules' clock, in the checkpoint so a resumed forward is on time
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        # this step's teacher logits, summed over its micro-batches (sum [K], count): the centre takes them
        # in after_step, so a step the trainer skips as non-finite never reaches it (a NaN centre would
        # poison every later step)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.total_steps = 0
        self.steps_per_epoch = 0
        self._set_schedule_lengths()

    # -- schedules -------------------------------------------------------------------------------------
    def _set_schedule_lengths(self) -> None:
        w = self.cfg.get("teacher_temp_warmup_steps")
        frac = float(_cfg(self.cfg, "teacher_temp_warmup_fraction", {}))
        self.temp_warmup_steps = int(w) if w is not None else round(frac * self.total_steps)
        f = self.cfg.get("freeze_last_layer_steps")
        self.freeze_last_layer_steps = int(f) if f is not None else self.steps_per_epoch  # null: one epoch

    def prepare(self, ctx: PrepareContext) -> dict[str, Any]:
        self.total_steps, self.steps_per_epoch = int(ctx.total_steps), int(ctx.steps_per_epoch)
        self._set_schedule_lengths()
        return {"distill_teacher_temp_warmup_steps": self.temp_warmup_steps,
                "distill_freeze_last_layer_steps": self.freeze_last_layer_steps}

    def teacher_temp_at(self, step: int) -> float:
        return teacher_temp_at(step, self.temp_warmup_steps, self.warmup_teacher_temp, self.teacher_temp)

    def momentum_at(self, step: int) -> float:
        """EMA momentum after optimizer step ``step``; the base value when the run's length is unknown."""
        if self.total_steps <= 0:
            return self.momentum_base
        return ema_cosine(step, self.total_steps, self.momentum_base, self.momentum_final)

    # -- hooks -----------------------------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        return self.towers[self.modality]

    def _student(self) -> _Pair:
        return _Pair(self.encoder, self.head)

    def after_init(self) -> None:
        self.teacher.reset(self._student())

    def before_step(self, step: int) -> None:
        # DINO keeps the last layer fixed during the first epoch: the prototypes move only once the
        # backbone's features do, which the paper found stabilises the start
        if step < self.freeze_last_layer_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_step(self, step: int) -> None:
        self.teacher.update(self._student(), self.momentum_at(step))
        if self._pending is not None:
            total, count = self._pending
            self._pending = None
            mean, count = batch_center(total, count)  # all-reduced: every rank holds the same centre
            before = self.center.clone()
            update_center(self.center, mean, self.center_momentum)
            self.center.copy_(torch.where(count > 0, self.center, before))  # nothing finite: keep it
        self.steps_done.fill_(step + 1)

    def exported(self) -> dict[str, nn.Module]:
        return {self.modality: self.teacher.module.encoder}

    def heads(self) -> dict[str, nn.Module]:
        return {"dino_head": self.head, "dino_head_teacher": self.teacher.module.head}

    # -- the loss --------------------------------------------------------------------------------------
    @staticmethod
    def _logits(encoder: nn.Module, head: nn.Module, views: list[Batch]) -> torch.Tensor:
        """[V, B, K] head outputs of each view's pooled features."""
        out: list[torch.Tensor | None] = [None] * len(views)
        for idx, batch in grouped_views(views):
            y = head(encoder.embed(batch))
            for j, chunk in zip(idx, y.chunk(len(idx))):
                out[j] = chunk
        return torch.stack(out)  # type: ignore[arg-type]

    def forward(self, batch: Batch) -> ObjectiveOutput:
        step = int(self.steps_done)
        views = self.encoder.adapter.views(batch, self.n_global, self.n_local)
        student = self._logits(self.encoder, self.head, views)
        with torch.no_grad():
            t = self.teacher.module
            teacher = self._logits(t.encoder, t.head, views[:self.n_global])
        temp = self.teacher_temp_at(step)
        res = dino_loss(student, teacher, self.center, self.student_temp, temp)
        if self.training:  # scored against the previous centre, as DINO; the centre moves in after_step
            total, count = logit_sum(teacher)
            if self._pending is not None:
                total, count = total + self._pending[0], count + self._pending[1]
            self._pending = (total, count)
        metrics: dict[str, Any] = {
            "teacher_entropy": res.teacher_entropy, "kl_teacher_student": res.kl_teacher_student,
            "student_entropy": res.student_entropy, "teacher_codes": distinct_codes(res.teacher_probs),
            "teacher_temp": temp, "ema_momentum": self.momentum_at(step)}
        return ObjectiveOutput(res.loss, metrics)
