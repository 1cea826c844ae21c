"""Cross-view reconstruction (Point-PQAE: Zhang, Zhang and Yan, ICCV 2025) for any adapter with
decoupled cross views.

Where MAE rebuilds hidden tokens of one view from its visible ones, PQAE rebuilds one view from
another: the adapter makes two overlapping crops of each item (``adapter.cross_views``), each placed
in its own frame, so neither view's tokens say where the other lies. The encoder sees each whole view
(no masking). A light pre-norm transformer decoder sees the source view's outputs, each with its
(content-free) position, plus one positional query per target token: an MLP of where that token lies
as seen from the source's frame (``adapter.relative_position``, PQAE's relative positional
encoding), added to a learned query token. The queries' outputs predict the target view's
``targets``, scored by ``adapter.recon_loss`` over the target's real tokens; both directions are
trained and their losses averaged.

Written from the paper's description; the crop fractions (the adapter's ``views.cross_scale``) and the
decoder (MAE's ``decoder_sizes``: 2 blocks of 128 at micro, MAE's 8 x 512 at the ecosystem sizes) are
this project's choices."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmssl.backbone import Backbone, BackboneConfig
from mmssl.encoder import Encoder
from mmssl.objectives.base import Objective
from mmssl.objectives.mae import PAPER_DECODER, mae_init
from mmssl.registry import OBJECTIVES
from mmssl.types import Batch, EncoderOutput, ObjectiveOutput, Tokens


@OBJECTIVES.register("pqae")
class PQAE(Objective):
    name = "pqae"

    needs = ("cross_views", "decoupled cross views with their relative positions")

    @classmethod
    def supports(cls, modalities: list[str]) -> str | None:
        """The ``needs`` check for all three members an adapter must define."""
        from mmssl.modalities.base import ModalityAdapter
        from mmssl.registry import MODALITIES

        why = super().supports(modalities)
        if why is None:
            for m in modalities:
                adapter = MODALITIES.get(m)
                for member in ("relative_position", "relative_dim"):
                    if getattr(adapter, member) is getattr(ModalityAdapter, member):
                        return f"objective {cls.name!r} needs {member} (relative positions between views), which modality {m!r} lacks"
        return why

    def __init__(self, tower: tuple[str, Encoder], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.modality, encoder = tower
        self.towers[self.modality] = encoder
        self.cfg = dict(cfg)
        adapter = encoder.adapter
        dec = dict(PAPER_DECODER)
        dec.update((cfg.get("decoder_sizes") or {}).get(encoder.config.get("size")) or {})
        for k in ("dim", "depth", "heads"):
            if cfg.get(f"decoder_{k}") is not None:
                dec[k] = int(cfg[f"decoder_{k}"])
        E = dec["dim"]
        self.decoder_cfg = BackboneConfig(dim=E, depth=dec["depth"], heads=dec["heads"],
                                          ffn_dim=int(cfg.get("decoder_mlp_ratio") or 4) * E,
                                          norm_first=True, eps=1e-6)
        if isinstance(getattr(encoder, "mask_embedding", None), nn.Parameter):
            encoder.mask_embedding.requires_grad_(False)  # nothing is masked: it never gets a gradient (DDP)
        self.decoder_embed = nn.Linear(encoder.dim, E)
        self.decoder_pos = nn.Linear(encoder.dim, E, bias=False)
        R = adapter.relative_dim
        self.query_pos = nn.Sequential(nn.Linear(R, E), nn.GELU(), nn.Linear(E, E))
        self.query_token = nn.Parameter(torch.zeros(E))
        self.decoder = Backbone(self.decoder_cfg)
        self.decoder_pred = nn.Linear(E, adapter.target_dim)
        nn.init.normal_(self.query_token, std=0.02)
        mae_init([self.decoder_embed, self.decoder_pos, self.decoder_pred, *self.query_pos, *self.decoder.modules()])

    @property
    def encoder(self) -> Encoder:
        return self.towers[self.modality]

    def heads(self) -> dict[str, nn.Module]:
        h = nn.Module()
        h.decoder_embed, h.decoder_pos, h.query_pos = self.decoder_embed, self.decoder_pos, self.query_pos
        h.decoder, h.decoder_pred, h.query_token = self.decoder, self.decoder_pred, self.query_token
        return {"pqae_decoder": h}

    def reconstruct(self, src_tokens: Tokens, src_out: EncoderOutput, relative: torch.Tensor,
                    target_pad: torch.Tensor) -> torch.Tensor:
        """The target view's predictions [B, N_t, P] from the source view's encoding: source outputs
        with their positions [B, N_s, E], prefix outputs first, and one query per target token
        (``relative`` [B, N_t, R]) in one decoder pass; the queries' outputs go to the head."""
        h = self.decoder_embed(src_out.last) + self.decoder_pos(src_tokens.pos.to(src_out.last.dtype))
        q = self.query_pos(relative.to(h.dtype)) + self.query_token.to(h.dtype)
        parts, pads = [h, q], [src_tokens.pad, target_pad]
        if src_out.prefix is not None and src_out.prefix.shape[1]:
            parts.insert(0, self.decoder_embed(src_out.prefix))
            pads.insert(0, target_pad.new_zeros(target_pad.shape[0], src_out.prefix.shape[1]))
        y, _, _ = self.decoder(torch.cat(parts, 1), torch.cat(pads, 1))
        return self.decoder_pred(y[:, -q.shape[1]:])

    def forward(self, batch: Batch) -> ObjectiveOutput:
        enc = self.encoder
        adapter = enc.adapter
        views = adapter.cross_views(batch)
        tokens = [adapter.tokenize(v) for v in views]
        outs = [enc.encode(t) for t in tokens]
        losses = []
        for s, t in ((0, 1), (1, 0)):  # rebuild each view from the other
            rel = adapter.relative_position(views[s], views[t], tokens[t])
            pred = self.reconstruct(tokens[s], outs[s], rel, tokens[t].pad)
            target = adapter.targets(views[t], tokens[t])
            losses.append(adapter.recon_loss(pred, target, ~tokens[t].pad))
        loss = (losses[0] + losses[1]) / 2
        return ObjectiveOutput(loss, {"loss_a_from_b": losses[1].detach(), "loss_b_from_a": losses[0].detach(),
                                      "view_tokens": (~tokens[0].pad).float().sum(1).mean()})
