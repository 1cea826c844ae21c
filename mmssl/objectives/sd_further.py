"""Self-distillation for further pretraining (Lee et al., 2023, "Self-Distillation for Further
Pre-training of Transformers") on any adapter with MAE targets.

The recipe has two runs, both starting from an initial encoder theta0 (``init=THETA0``):
  (a) the teacher: theta0 further pretrained on the new domain with MAE
      ``mmssl pretrain objective=mae init=THETA0 data=NEW run_dir=TEACHER``;
  (b) the student: theta0 again, trained with MAE plus a loss that pulls its hidden representations
      of the whole input towards the (frozen) teacher's
      ``mmssl pretrain objective=sd_further init=THETA0 objective.teacher=TEACHER data=NEW run_dir=R``.

Loss = MAE(student) + ``distill_weight`` * mean over real tokens of ||h_s - stopgrad(h_t)||^2 (summed
over the D channels), h the final hidden states of the unmasked input. The teacher never changes; it is
kept in the checkpoints so a resumed run needs nothing outside its run directory."""
from __future__ import annotations

from typing import Any

import torch

from mmssl.encoder import Encoder
from mmssl.export import load_encoder
from mmssl.objectives.ema import EMATeacher
from mmssl.objectives.mae import MAE
from mmssl.registry import OBJECTIVES
from mmssl.types import Batch, ObjectiveOutput


def distill_loss(h_s: torch.Tensor, h_t: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """h_s, h_t: [B, N, D], pad: [B, N] -> squared L2 distance per real token, averaged."""
    d = (h_s.float() - h_t.float()).square().sum(-1)
    real = (~pad).float()
    return (d * real).sum() / real.sum().clamp_min(1.0)


@OBJECTIVES.register("sd_further")
class SDFurther(MAE):
    name = "sd_further"
    #: unset keys (mask ratio, mask mode, decoder, trainer defaults) come from the modality's MAE defaults
    inherits = "mae"

    def __init__(self, tower: tuple[str, Encoder], cfg: dict[str, Any]) -> None:
        super().__init__(tower, cfg)
        if not cfg.get("teacher"):
            raise ValueError("objective=sd_further needs objective.teacher=PATH: the initial encoder further "
                             "pretrained with objective=mae on the new data (step (a) of the recipe)")
        self.distill_weight = float(cfg.get("distill_weight", 1.0))
        teacher = load_encoder(cfg["teacher"], modality=self.modality)
        student = self.encoder
        if teacher.dim != student.dim or teacher.depth != student.depth:
            raise ValueError(f"objective.teacher={cfg['teacher']} is {teacher.dim} wide and {teacher.depth} deep; "
                             f"the student is {student.dim} x {student.depth}: start the student from the "
                             f"teacher's initial encoder (init=THETA0)")
        # frozen, in eval mode, never updated: EMATeacher with momentum 1 forever
        self.teacher = EMATeacher(teacher)

    def forward(self, batch: Batch) -> ObjectiveOutput:
        mae = super().forward(batch)
        tokens = self.encoder.adapter.tokenize(batch)
        h_s = self.encoder.encode(tokens).last
        with torch.no_grad():
            h_t = self.teacher.module.encode(self.teacher.module.adapter.tokenize(batch)).last
        dist = distill_loss(h_s, h_t, tokens.pad)
        metrics = dict(mae.metrics, mae_loss=mae.loss.detach(), distill_loss=dist.detach())
        return ObjectiveOutput(mae.loss + self.distill_weight * dist, metrics)
