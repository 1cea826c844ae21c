"""DINO's self-distillation loss, its teacher centring and its schedules, as small pure functions.

Caron et al., 2021 (facebookresearch/dino, ``DINOLoss``): the teacher's outputs of the global views are
centred (a running mean ``c`` over batches) and sharpened (a low temperature), the student's outputs of
every view are softened by a higher temperature, and the loss is the cross-entropy between them over
every pair of *different* views. Centring keeps one code from dominating; sharpening keeps the teacher
from going uniform; the two together are what avoid collapse."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


class DinoLoss(NamedTuple):
    """loss: the mean cross-entropy over pairs; the rest are detached diagnostics (scalars).

    teacher_probs: [G, B, K] the centred, sharpened teacher distributions (detached)."""

    loss: torch.Tensor
    teacher_probs: torch.Tensor
    teacher_entropy: torch.Tensor
    kl_teacher_student: torch.Tensor
    student_entropy: torch.Tensor


def teacher_distribution(teacher: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """softmax((t - c) / temp): centring first, then sharpening. teacher: [..., K], center: [K] or [1, K]."""
    return F.softmax((teacher - center) / temp, dim=-1)


def pair_mask(n_teacher: int, n_student: int, device: torch.device | None = None) -> torch.Tensor:
    """[G, V] bool, True where teacher view i and student view v form a pair: every v != i.

    The teacher's views are the student's first ``n_teacher`` ones (the global views), so a view is
    never its own target."""
    g = torch.arange(n_teacher, device=device)[:, None]
    v = torch.arange(n_student, device=device)[None, :]
    return g != v


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float) -> DinoLoss:
    """The DINO loss over all pairs of different views.

    student: [V, B, K] logits of every view (global views first); teacher: [G, B, K] logits of the G
    global views (G <= V); center: [K]. Returns the mean over pairs (i, v), v != i, of
    mean_b sum_k -q_ik log p_vk with q = softmax((t - c) / teacher_temp), p = softmax(s / student_temp).
    Computed in float32 (a 0.04 temperature in bf16 would lose the teacher's small differences)."""
    V, G = student.shape[0], teacher.shape[0]
    if G > V or student.shape[1:] != teacher.shape[1:]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} views do not pair")
    log_p = F.log_softmax(student.float() / student_temp, dim=-1)  # [V, B, K]
    q = teacher_distribution(teacher.float().detach(), center.float(), teacher_temp)  # [G, B, K]
    B = student.shape[1]
    ce = -torch.einsum("gbk,vbk->gv", q, log_p) / B  # [G, V]: mean over items of each pair's cross-entropy
    pairs = pair_mask(G, V, student.device)
    if not bool(pairs.any()):
        raise ValueError("DINO needs at least two views (one global plus one more)")
    loss = ce[pairs].mean()
    with torch.no_grad():
        h_q = torch.special.entr(q).sum(-1)  # [G, B]; 0 log 0 = 0
        h_p = -(log_p.exp() * log_p).sum(-1)  # [V, B]
        # KL(q || p) = CE(q, p) - H(q), pair by pair
        kl = (ce - h_q.mean(1)[:, None])[pairs].mean()
    return DinoLoss(loss, q.detach(), h_q.mean(), kl, h_p.mean())


def batch_center(total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean teacher logit [K], the count over all processes) from a sum over ``count`` outputs,
    all-reduced when torch.distributed is initialised (DINO all-reduces the sum, then divides by the
    global count).

    total: [K] the sum of the teacher's logits over every global view and item; count: scalar tensor."""
    total, count = total.detach().float().clone(), count.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total / count.clamp_min(1.0), count


def logit_sum(teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher: [..., K] logits -> (their sum over every leading index [K], how many (scalar tensor)).

    Rows with a non-finite value are left out: one broken input must not turn the running centre into
    NaN for the rest of the run (the trainer skips that step, but the centre would keep it)."""
    flat = teacher.detach().float().reshape(-1, teacher.shape[-1])
    finite = torch.isfinite(flat).all(-1)
    return torch.where(finite[:, None], flat, 0.0).sum(0), finite.sum().float()


def update_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """c <- m c + (1 - m) mean(t), in place; returns ``center``."""
    with torch.no_grad():
        center.mul_(momentum).add_(batch_mean.to(center.dtype), alpha=1.0 - momentum)
    return center


def teacher_temp_at(step: int, warmup_steps: int, start: float, end: float) -> float:
    """DINO's teacher temperature: linear from ``start`` to ``end`` over ``warmup_steps``, then ``end``
    (the paper warms 0.04 -> 0.07 over its first 30 epochs; a too-hot teacher early makes training
    unstable)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * max(step, 0) / warmup_steps


def distinct_codes(teacher_probs: torch.Tensor) -> torch.Tensor:
    """Fraction of distinct argmax codes among the teacher's outputs (a collapse indicator: near 1 / n
    when every item maps to one code). teacher_probs: [..., K] -> scalar in (0, 1]."""
    codes = teacher_probs.reshape(-1, teacher_probs.shape[-1]).argmax(-1)
    n = min(codes.numel(), teacher_probs.shape[-1])
    return torch.unique(codes).numel() / torch.tensor(float(n), device=codes.device)
