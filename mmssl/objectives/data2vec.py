"""data2vec (Baevski et al., 2022) and data2vec 2.0 (Baevski et al., 2023) for any adapter.

An EMA teacher (``mmssl.objectives.ema``) encodes the whole, unmasked input; the targets are the
average of its top ``top_k`` blocks' FFN outputs (before each block's last residual), each normalised
first: instance norm over the token axis for signals (speech, EEG, points), a parameter-free layer
norm for images and text (``target_norm`` per modality in ``objectives.data2vec``). The student sees
masked input and regresses the targets at the hidden positions.

version 1 (data2vec): the student's hidden tokens are replaced by the Encoder's mask embedding
(``replace``; text also gets BERT's 80/10/10 corruption from its adapter), and a linear head on its
final output predicts the targets.

version 2 (data2vec 2.0): each sample is encoded with ``num_masks`` different masks that share one
teacher pass; hidden tokens are dropped (``drop``: compute falls with the mask ratio); a small
convolutional decoder (1D over the adapter's token order, with the adapter's positions added)
fills in every position from the visible outputs.

Loss per hidden token: MSE or smooth L1 summed over the D target dimensions and scaled by
1 / sqrt(D) (fairseq), averaged over hidden tokens. The variances of targets and predictions are
logged: collapse shows there first."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.encoder import Encoder
from mmssl.objectives.base import Objective, PrepareContext
from mmssl.objectives.ema import EMATeacher, ema_linear
from mmssl.objectives.mae import scatter_visible
from mmssl.registry import OBJECTIVES
from mmssl.types import Batch, ObjectiveOutput, Tokens

NORMS = ("instance", "layer", "none")
#: data2vec's teacher momentum: 0.999 at step 0, annealed linearly to 0.9999
PAPER_EMA = {"ema_decay": 0.999, "ema_end_decay": 0.9999}


def instance_norm_tokens(x: torch.Tensor, pad: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per sample and channel, over the real tokens: x [B, N, D], pad [B, N] -> [B, N, D]
    (``F.instance_norm`` on [B, D, N], with padding left out of the statistics)."""
    w = (~pad).to(x.dtype)[..., None]
    n = w.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(1, keepdim=True) / n
    var = ((x - mean).square() * w).sum(1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps)


def normalise(x: torch.Tensor, pad: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "instance":
        return instance_norm_tokens(x, pad)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:])
    if kind == "none":
        return x
    raise ValueError(f"data2vec target norm must be one of {', '.join(NORMS)}, not {kind!r}")


def data2vec_targets(ffn: list[torch.Tensor], pad: torch.Tensor, top_k: int, layer_norm: str,
                     final_norm: str = "none") -> torch.Tensor:
    """The average of the last ``top_k`` blocks' FFN outputs (each [B, N, D]), each normalised with
    ``layer_norm`` first, then the average with ``final_norm`` -> [B, N, D] (float32)."""
    k = min(max(int(top_k), 1), len(ffn))
    y = sum(normalise(f.float(), pad, layer_norm) for f in ffn[-k:]) / k
    return normalise(y, pad, final_norm)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """pred, target: [M, D] -> [M]: summed over D and scaled by 1 / sqrt(D), as fairseq's data2vec."""
    if kind == "mse":
        per = F.mse_loss(pred, target, reduction="none")
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    else:
        raise ValueError(f"data2vec loss must be 'mse' or 'smooth_l1', not {kind!r}")
    return per.sum(-1) / math.sqrt(pred.shape[-1])


def spread(x: torch.Tensor) -> torch.Tensor:
    """x: [M, D] -> the per-dimension standard deviation over the M tokens, averaged (fairseq's
    ``compute_var``): near zero when every token gets the same representation."""
    if x.shape[0] < 2:
        return x.new_zeros(())
    return torch.sqrt(x.float().var(0) + 1e-6).mean()


class ConvDecoder(nn.Module):
    """data2vec 2.0's light decoder as a 1D convolution over the token order: ``depth`` blocks of
    (grouped Conv1d, LayerNorm, GELU), residual after the first, then a linear map to the targets.
    x: [B, N, E], pad: [B, N] -> [B, N, out]. Padding is zeroed before every convolution."""

    def __init__(self, dim: int, out_dim: int, depth: int, kernel: int, groups: int) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"decoder_kernel must be odd, got {kernel}")
        groups = math.gcd(dim, groups)
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
                                   for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=False) for _ in range(depth))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        keep = (~pad).to(x.dtype)[..., None]
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            y = conv((x * keep).transpose(1, 2)).transpose(1, 2)
            y = F.gelu(norm(y))
            x = y if i == 0 else x + y
        return self.proj(x)


def repeat_tokens(tokens: Tokens, m: int) -> Tokens:
    """Each sample ``m`` times in a row: [B, ...] -> [B*m, ...] (sample b's copies at b*m .. b*m+m-1)."""
    def r(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(m, 0)

    return Tokens(r(tokens.x), r(tokens.pos), r(tokens.pad), r(tokens.index),
                  None if tokens.coords is None else r(tokens.coords))


@OBJECTIVES.register("data2vec")
class Data2Vec(Objective):
    name = "data2vec"

    def __init__(self, tower: tuple[str, Encoder], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.modality, encoder = tower
        self.towers[self.modality] = encoder
        self.cfg = dict(cfg)
        self.version = int(cfg.get("version") or 1)
        if self.version not in (1, 2):
            raise ValueError(f"objective.version must be 1 (data2vec) or 2 (data2vec 2.0), got {self.version}")
        if cfg.get("mask_ratio") is None:
            raise ValueError(f"objective.mask_ratio is not set and modality {self.modality!r} has no default "
                             f"(objectives.data2vec.mask_ratio in its config)")
        self.mask_ratio = float(cfg["mask_ratio"])
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        self.top_k = int(cfg.get("top_k") or encoder.depth)
        self.target_norm = str(cfg.get("target_norm") or "layer")
        self.final_norm = str(cfg.get("final_norm") or "none")
        for k, v in (("target_norm", self.target_norm), ("final_norm", self.final_norm)):
            if v not in NORMS:
                raise ValueError(f"objective.{k} must be one of {', '.join(NORMS)}, not {v!r}")
        self.loss_kind = str(cfg.get("loss") or "mse")
        self.loss_beta = float(cfg.get("loss_beta") or 0.0)
        regression_loss(torch.zeros(1, 1), torch.zeros(1, 1), self.loss_kind, max(self.loss_beta, 1e-6))
        # the paper's momenta unless the command line or the modality (objectives.data2vec) sets them
        ema = dict(PAPER_EMA)
        ema.update({k: cfg[k] for k in PAPER_EMA if cfg.get(k) is not None})
        self.ema_start, self.ema_end = float(ema["ema_decay"]), float(ema["ema_end_decay"])
        self.ema_anneal = cfg.get("ema_anneal_steps")  # null: the whole run
        self.teacher = EMATeacher(encoder)
        D = encoder.dim
        if self.version == 1:
            self.head = nn.Linear(D, D)
        else:
            self.num_masks = int(cfg.get("num_masks") or 4)
            E = int(cfg.get("decoder_dim") or D)
            self.decoder_embed = nn.Linear(D, E)
            self.decoder_pos = nn.Linear(D, E, bias=False)
            self.mask_token = nn.Parameter(torch.zeros(E))
            nn.init.normal_(self.mask_token, std=0.02)
            self.head = ConvDecoder(E, D, int(cfg.get("decoder_depth") or 4), int(cfg.get("decoder_kernel") or 7),
                                    int(cfg.get("decoder_groups") or 16))
        # null: the whole run, known at prepare()
        self._anneal_steps = int(self.ema_anneal) if self.ema_anneal is not None else 0
        self.register_buffer("momentum", torch.tensor(self.ema_start, dtype=torch.float64))

    @property
    def encoder(self) -> Encoder:
        return self.towers[self.modality]

    def heads(self) -> dict[str, nn.Module]:
        if self.version == 1:
            return {"data2vec_head": self.head}
        h = nn.Module()
        h.decoder_embed, h.decoder_pos, h.decoder = self.decoder_embed, self.decoder_pos, self.head
        h.mask_token = self.mask_token
        return {"data2vec_decoder": h}

    # -- teacher --------------------------------------------------------------------------------------
    def prepare(self, ctx: PrepareContext) -> dict[str, Any]:
        self._anneal_steps = int(self.ema_anneal) if self.ema_anneal is not None else int(ctx.total_steps)
        return {}

    def after_init(self) -> None:
        self.teacher.reset(self.encoder)

    def after_step(self, step: int) -> None:
        m = ema_linear(step, self.ema_start, self.ema_end, self._anneal_steps)
        self.momentum.fill_(m)
        self.teacher.update(self.encoder, m)

    @torch.no_grad()
    def targets(self, tokens: Tokens) -> torch.Tensor:
        """The teacher's targets for unmasked ``tokens`` (from its own adapter): [B, N, D]."""
        out = self.teacher.module.encode(tokens, return_ffn=True)
        return data2vec_targets(out.ffn, tokens.pad, self.top_k, self.target_norm, self.final_norm)

    # -- student --------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> ObjectiveOutput:
        adapter = self.encoder.adapter
        tokens = adapter.tokenize(batch)
        target = self.targets(self.teacher.module.adapter.tokenize(batch))
        if self.version == 1:
            hidden = adapter.make_mask(tokens, self.mask_ratio) & ~tokens.pad
            corrupted, replace = adapter.corrupt(batch, hidden)
            if corrupted is not batch:
                tokens = adapter.tokenize(corrupted)
            out = self.encoder.encode(tokens, replace & hidden, "replace")
            pred = self.head(out.last)
        else:
            M = self.num_masks
            rep = repeat_tokens(tokens, M)
            hidden = adapter.make_mask(rep, self.mask_ratio) & ~rep.pad
            out = self.encoder.encode(rep, hidden, "drop")
            h = scatter_visible(self.decoder_embed(out.last), out, rep.x.shape[1], self.mask_token)
            pos = rep.pos
            h = h + self.decoder_pos(pos.to(h.dtype))
            pred = self.head(h, rep.pad)
            target = target.repeat_interleave(M, 0)
        p, t = pred[hidden].float(), target[hidden]
        per_token = regression_loss(p, t, self.loss_kind, self.loss_beta)
        loss = per_token.mean() if per_token.numel() else pred.sum() * 0.0
        real = (~tokens.pad).float().sum().clamp_min(1.0) * (1 if self.version == 1 else self.num_masks)
        metrics: dict[str, Any] = {"target_var": spread(t), "pred_var": spread(p.detach()),
                                   "mask_fraction": hidden.float().sum() / real, "ema_decay": self.momentum.float()}
        return ObjectiveOutput(loss, metrics)
