"""Contrastive losses between two modalities (CLIP/CLAP and CLOOB) as small pure functions.

Every function takes the features of the **whole (global) batch** on both sides: under DDP the
objective gathers them first with ``mmssl.train.gather.gather_with_grad``, and each rank computes the
full loss (open_clip's ``gather_with_grad=True, local_loss=False``), which makes the DDP-averaged
gradients equal the single-process ones. Pair i of ``a`` and ``b`` is the positive; every other pair
is a negative.

Features are expected L2-normalised by the caller (``normalise``), as open_clip and ml-jku/cloob do in
the model, so these functions can be compared with theirs on the same inputs. The B x B logits are
computed in float32 whatever the input dtype: under bf16 autocast a logit of magnitude 100 would
otherwise be rounded to steps of 0.5, and the matrices are small next to the encoders.

References:
- CLIP: open_clip ``src/open_clip/loss.py`` ``ClipLoss`` (symmetric cross-entropy on
  ``logit_scale * a @ b.T``), with ``logit_scale = exp(stored log)`` clamped at 100.
- CLOOB: ml-jku/cloob ``src/training/methods.py`` (``infoLOOB_loss``, ``cloob``,
  ``hopfield_retrieval``) with the ``hflayers.Hopfield`` layer of ``src/training/train.py`` configured
  without projections or normalisation, one update step, ``scaling = beta``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Scalar = torch.Tensor | float

MAX_LOG_SCALE = math.log(100.0)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """x: [B, D] -> [B, D] with unit L2 norm per row."""
    return F.normalize(x, dim=-1)


def clamp_log_scale_(log_scale: torch.nn.Parameter, max_log_scale: float = MAX_LOG_SCALE,
                     min_log_scale: float = 0.0) -> None:
    """Clamp a stored log logit scale in place, as open_clip and ml-jku/cloob do after each optimizer
    step (``logit_scale.clamp_(0, log 100)``). ``clip_loss`` clamps in the forward anyway; doing this
    in the objective's ``after_step`` as well keeps the parameter from drifting above the clamp, where
    its gradient is zero and it could never come back down."""
    with torch.no_grad():
        log_scale.clamp_(min_log_scale, max_log_scale)


def clip_loss(a: torch.Tensor, b: torch.Tensor, log_scale: Scalar,
              max_log_scale: float = MAX_LOG_SCALE) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP). a: [B, D], b: [B, D] L2-normalised, pair i positive;
    log_scale: scalar tensor (the learnable parameter) -> scalar loss.

    scale = exp(min(log_scale, max_log_scale)); logits = scale * a @ b.T [B, B];
    loss = (CE(logits, arange B) + CE(logits.T, arange B)) / 2.

    The scale is stored as a log so that the optimiser works on a scale-free quantity and the scale
    stays positive. open_clip clamps the parameter in place after the optimizer step instead of in
    the forward; both give the same value whenever the stored log is within range (and
    ``clamp_log_scale_`` does the in-place clamp too)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"clip_loss expects two [B, D] tensors of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if not isinstance(log_scale, torch.Tensor):
        log_scale = torch.tensor(float(log_scale), device=a.device)
    scale = log_scale.float().clamp(max=max_log_scale).exp()
    logits = scale * (a.float() @ b.float().T)
    labels = torch.arange(a.shape[0], device=a.device)
    # rows of logits: a_i against every b (a -> b); rows of logits.T: b_i against every a (b -> a)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def info_loob(x: torch.Tensor, y: torch.Tensor, inv_tau: Scalar) -> torch.Tensor:
    """InfoLOOB ("leave one out bound"), one direction. x: [B, D] anchors, y: [B, D] candidates with
    y_i the positive of x_i; inv_tau: inverse temperature -> scalar loss.

    logits = inv_tau * x @ y.T [B, B];
    loss = tau * mean_i( -logits_ii + logsumexp_{j != i} logits_ij ).

    Unlike InfoNCE the positive is left out of the denominator, so the loss does not saturate once
    the positive dominates. Multiplying by tau (as ml-jku/cloob does) keeps the gradient magnitude
    independent of the temperature. Needs B >= 2 (one negative at least)."""
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"info_loob expects two [B, D] tensors of the same shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    n = x.shape[0]
    if n < 2:
        raise ValueError("info_loob needs at least 2 pairs: with one there is no negative")
    logits = inv_tau * (x.float() @ y.float().T)
    positive = logits.diagonal()
    # The positive leaves the denominator: -inf is exp(.) = 0 exactly, and its gradient is 0.
    # (ml-jku/cloob writes -1000 there, which is the same at |logits| <= inv_tau <= 100.)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    negatives = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
    return (negatives - positive).mean() / inv_tau


def hopfield_retrieval(queries: torch.Tensor, memory: torch.Tensor, beta: Scalar) -> torch.Tensor:
    """One update of a modern Hopfield network, no projections. queries: [B, D] state patterns,
    memory: [M, D] stored patterns (also the values) -> [B, D] retrieved patterns, L2-normalised.

    U = normalise(softmax(beta * queries @ memory.T, dim=-1) @ memory): each query becomes a convex
    combination of the stored patterns, weighted by similarity (``hflayers.Hopfield`` with static
    patterns, ``scaling=beta``, ``update_steps_max=0``, then ml-jku/cloob's re-normalisation)."""
    attention = torch.softmax(beta * (queries.float() @ memory.float().T), dim=-1)  # [B, M]
    return normalise(attention @ memory.float())


def cloob_loss(x: torch.Tensor, y: torch.Tensor, inv_tau: Scalar = 30.0, beta: Scalar = 8.0) -> torch.Tensor:
    """CLOOB. x: [B, D] first modality (image), y: [B, D] second modality (text), L2-normalised,
    pair i positive -> scalar loss.

    With hop(q, K) = hopfield_retrieval(q, K, beta), both memories being the batch itself:
      U_xx = hop(x, x)   x queries, x memory       U_yy = hop(y, y)   y queries, y memory
      U_xy = hop(y, x)   y queries, x memory       U_yx = hop(x, y)   x queries, y memory
      loss = InfoLOOB(U_xx, U_xy) + InfoLOOB(U_yy, U_yx)
    so each InfoLOOB compares two patterns retrieved from the same memory (names as in ml-jku/cloob's
    ``hopfield_retrieval``; the sum, not the mean, of the two terms, as their ``cloob`` returns).
    Defaults are the CLOOB paper's: inverse temperature 30, beta 8, fixed; tensors may be passed when
    the caller makes them learnable."""
    u_xx = hopfield_retrieval(x, x, beta)
    u_yy = hopfield_retrieval(y, y, beta)
    u_xy = hopfield_retrieval(y, x, beta)
    u_yx = hopfield_retrieval(x, y, beta)
    return info_loob(u_xx, u_xy, inv_tau) + info_loob(u_yy, u_yx, inv_tau)
