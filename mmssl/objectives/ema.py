"""The EMA teacher shared by data2vec, DINO-style distillation and any other teacher-student objective.

A ``copy.deepcopy`` of the student with gradients off, never an alias (DESIGN.md): aliasing the student
makes the "teacher" follow every step and the targets chase themselves. It lives inside the objective,
so its weights are in every checkpoint's ``model.safetensors`` and a resumed run restores it exactly.
It stays in eval mode (no dropout, no layer drop), as fairseq's and DINO's teachers do. Under
``trainer.strategy=fsdp`` it is sharded like the student and updated on the local shards."""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mmssl.lora import LoRALinear


def effective_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, value) of every parameter as the plain architecture names it: a LoRA-wrapped linear gives
    ``<path>.weight`` = W + (alpha / r) B A and ``<path>.bias``, so a plain teacher can follow a student
    trained with ``trainer.peft=lora``."""
    lora = {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}
    for n, p in module.named_parameters():
        head, _, leaf = n.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if head.endswith(".base") and head[: -len(".base")] in lora:
            owner = head[: -len(".base")]
            yield f"{owner}.{leaf}", (p + lora[owner].delta_weight().to(p.dtype)) if leaf == "weight" else p
        else:
            yield n, p


def _local_pair(t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors an update works on: under FSDP (``trainer.strategy=fsdp``) teacher and student are
    DTensors sharded alike, and the update runs on this rank's local shards, shard by shard (no
    gathering); otherwise the tensors themselves."""
    if isinstance(t, DTensor) != isinstance(s, DTensor):
        raise TypeError("the EMA teacher and its student must be sharded alike (both or neither)")
    if isinstance(t, DTensor):
        if t.placements != s.placements or t.shape != s.shape:
            raise ValueError(f"teacher shard {t.placements} {tuple(t.shape)} does not line up with the student's "
                             f"{s.placements} {tuple(s.shape)}")
        return t.to_local(), s.to_local()
    return t, s


class EMATeacher(nn.Module):
    """teacher <- momentum * teacher + (1 - momentum) * student, after each optimizer step.

    ``module`` is the teacher (call it like the student: ``teacher(batch)``); buffers (running
    statistics, fixed tables) are copied from the student at each update."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.module.eval()  # a teacher never drops out
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _pairs(self, student: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mine = dict(self.module.named_parameters())
        pairs = []
        for n, s in effective_parameters(student):
            if n not in mine:
                raise KeyError(f"the student's parameter {n!r} has no teacher twin")
            pairs.append((mine.pop(n), s))
        if mine:
            raise KeyError(f"teacher parameters without a student twin: {sorted(mine)[:3]}")
        return pairs

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        if momentum < 1.0:
            for t, s in self._pairs(student):
                local_t, local_s = _local_pair(t, s)
                local_t.lerp_(local_s.detach().to(t.dtype), 1.0 - momentum)
        theirs = dict(student.named_buffers())
        for n, tb in self.module.named_buffers():
            if n in theirs:
                tb.copy_(theirs[n])

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        """Copy the student (e.g. after ``init=`` loaded pretrained weights into it)."""
        self.update(student, 0.0)


def ema_linear(step: int, start: float, end: float, anneal_steps: int) -> float:
    """data2vec: momentum rises linearly from ``start`` to ``end`` over ``anneal_steps``, then stays."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start + (end - start) * step / anneal_steps


def ema_cosine(step: int, total: int, base: float, final: float = 1.0) -> float:
    """DINO: momentum rises from ``base`` to ``final`` on a half cosine over ``total`` steps."""
    t = min(max(step, 0) / max(total, 1), 1.0)
    return final - (final - base) * (math.cos(math.pi * t) + 1) / 2
