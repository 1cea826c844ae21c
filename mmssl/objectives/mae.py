"""Masked autoencoding (He et al., 2022) for any adapter with per-token reconstruction targets.

One method for every modality: the adapter hides about ``mask_ratio`` of the real tokens in its own
mask shape (random patches, speech spans, ...); the Encoder either drops them (``mask_mode=drop``,
MAE: compute falls with the ratio) or swaps them for its mask embedding (``replace``: BERT-style
masked language modelling for text, where the adapter may also corrupt inputs 80/10/10). A light
pre-norm transformer decoder sees the visible outputs plus one shared mask token per hidden position,
each with the adapter's (content-free) position projected to the decoder width, and predicts the
adapter's ``targets``; ``adapter.recon_loss`` scores the hidden tokens only.

``locate_weight`` > 0 adds PCP-MAE's centre prediction (Zhang et al., NeurIPS 2024): the hidden tokens
also enter the encoder as content without position (``Encoder.encode_queries``: they attend to the
visible tokens, which never attend to them), and a linear head on their outputs regresses where they
sit (``Tokens.coords``, mean squared error summed over the coordinates). Given the hidden
positions, a decoder can rebuild a point group from its neighbours' centres with little help from the
encoder; placing a group within the visible shape needs the shape. The decoder keeps the true
positions (PCP-MAE's "predicted centres not to the decoder" variant), so no hidden content reaches it.

Defaults per modality (mask ratio, mask mode, decoder, locate weight) come from ``objectives.mae`` in
the modality config; decoder sizes default per encoder size (``decoder_sizes`` in
configs/objective/mae.yaml)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmssl.backbone import Backbone, BackboneConfig
from mmssl.encoder import Encoder
from mmssl.objectives.base import Objective
from mmssl.registry import OBJECTIVES
from mmssl.types import Batch, EncoderOutput, ObjectiveOutput, Tokens

# MAE's decoder for ViT-B/L/H: 8 blocks of width 512 (16 heads).
PAPER_DECODER = {"dim": 512, "depth": 8, "heads": 16}


def scatter_visible(h: torch.Tensor, out: EncoderOutput, n: int, mask_token: torch.Tensor) -> torch.Tensor:
    """Put the encoder outputs of visible tokens back at their positions, a mask token elsewhere.

    h: [B, M, E] decoder-width outputs of the kept tokens (``out.keep`` [B, M] their positions;
    ``out.pad`` [B, M] marks slots of samples with fewer visible tokens) -> [B, n, E]."""
    B, _, E = h.shape
    mt = mask_token.to(h.dtype).view(1, 1, E)
    # Padded slots point at hidden positions (drop_hidden sorts them after the visible ones): writing a
    # mask token there leaves them what they would be anyway.
    h = torch.where(out.pad[..., None], mt, h)
    return mt.expand(B, n, E).clone().scatter_(1, out.keep[..., None].expand(-1, -1, E), h)


def mae_init(modules: list[nn.Module]) -> None:
    """MAE's initialisation of a decoder: xavier-uniform linears, zero biases."""
    for m in modules:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@OBJECTIVES.register("mae")
class MAE(Objective):
    name = "mae"

    needs = ("target_dim", "per-token reconstruction targets")

    def __init__(self, tower: tuple[str, Encoder], cfg: dict[str, Any]) -> None:
        super().__init__()
        self.modality, encoder = tower
        self.towers[self.modality] = encoder
        self.cfg = dict(cfg)
        if cfg.get("mask_ratio") is None:
            raise ValueError(f"objective.mask_ratio is not set and modality {self.modality!r} has no default "
                             f"(objectives.mae.mask_ratio in its config)")
        self.mask_ratio = float(cfg["mask_ratio"])
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        self.mask_mode = cfg.get("mask_mode") or "drop"
        if self.mask_mode not in ("drop", "replace"):
            raise ValueError(f"objective.mask_mode must be 'drop' or 'replace', not {self.mask_mode!r}")
        if self.mask_mode == "drop" and isinstance(getattr(encoder, "mask_embedding", None), nn.Parameter):
            encoder.mask_embedding.requires_grad_(False)  # hidden tokens are dropped: it never gets a gradient (DDP)
        size = encoder.config.get("size")
        dec = dict(PAPER_DECODER)
        dec.update((cfg.get("decoder_sizes") or {}).get(size) or {})
        for k in ("dim", "depth", "heads"):
            if cfg.get(f"decoder_{k}") is not None:
                dec[k] = int(cfg[f"decoder_{k}"])
        self.decoder_cfg = BackboneConfig(dim=dec["dim"], depth=dec["depth"], heads=dec["heads"],
                                          ffn_dim=int(cfg.get("decoder_mlp_ratio") or 4) * dec["dim"],
                                          norm_first=True, eps=1e-6)
        E = self.decoder_cfg.dim
        adapter = encoder.adapter
        self.decoder_embed = nn.Linear(encoder.dim, E)
        # The adapter's positions, carried to the decoder width (never content: see DESIGN.md).
        self.decoder_pos = nn.Linear(encoder.dim, E, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(E))
        self.decoder = Backbone(self.decoder_cfg)
        self.decoder_pred = nn.Linear(E, adapter.target_dim)
        # A vocabulary-wide head on every token would cost B*N*V: there, score hidden tokens only (a
        # boolean selection, one host sync). Pixel-sized heads run on every token, as MAE's does,
        # keeping shapes static for torch.compile.
        choice = cfg.get("head_on_hidden", "auto")
        self.head_on_hidden = adapter.target_dim >= 4096 if choice in (None, "auto") else bool(choice)
        nn.init.normal_(self.mask_token, std=0.02)
        self.locate_weight = float(cfg.get("locate_weight") or 0.0)
        self.query_embed: nn.Parameter | None = None
        self.locate_head: nn.Linear | None = None
        if self.locate_weight < 0:
            raise ValueError(f"objective.locate_weight must be >= 0, got {self.locate_weight}")
        if self.locate_weight > 0:
            if self.mask_mode != "drop":
                raise ValueError("objective.locate_weight needs mask_mode=drop: hidden tokens enter the "
                                 "encoder as queries beside the visible ones")
            try:
                coord_dim = adapter.coord_dim
            except TypeError as e:
                raise ValueError(f"objective.locate_weight > 0: {e}") from None
            # the hidden tokens' stand-in for their position; a small head (std 0.02, as PCP-MAE's
            # trunc-normal init) so the first predictions sit near the centre of the frame
            self.query_embed = nn.Parameter(torch.zeros(encoder.dim))
            nn.init.trunc_normal_(self.query_embed, std=0.02)
            self.locate_head = nn.Linear(encoder.dim, coord_dim)
            nn.init.trunc_normal_(self.locate_head.weight, std=0.02)
            nn.init.zeros_(self.locate_head.bias)
        mae_init([self.decoder_embed, self.decoder_pos, self.decoder_pred, *self.decoder.modules()])

    @property
    def encoder(self) -> Encoder:
        return self.towers[self.modality]

    def heads(self) -> dict[str, nn.Module]:
        h = nn.Module()
        h.decoder_embed, h.decoder_pos, h.decoder, h.decoder_pred = (self.decoder_embed, self.decoder_pos,
                                                                    self.decoder, self.decoder_pred)
        h.mask_token = self.mask_token
        out = {"mae_decoder": h}
        if self.locate_head is not None:
            loc = nn.Module()
            loc.query_embed, loc.head = self.query_embed, self.locate_head
            out["mae_locate"] = loc
        return out

    def decode(self, tokens: Tokens, out: EncoderOutput) -> torch.Tensor:
        """Encoder output -> decoder features at every token position [B, N, E] (prefix tokens join the
        decoder's attention, as MAE's CLS token does, and are then removed)."""
        h = self.decoder_embed(out.last)
        n = tokens.x.shape[1]
        if out.keep is not None:
            h = scatter_visible(h, out, n, self.mask_token)
        pos = tokens.pos
        if pos.shape[0] > 1 and pos.stride(0) == 0:  # one table broadcast over the batch: project it once
            pos = pos[:1]
        x = h + self.decoder_pos(pos.to(h.dtype))
        pad = tokens.pad
        P = 0 if out.prefix is None else out.prefix.shape[1]
        if P:
            x = torch.cat([self.decoder_embed(out.prefix), x], 1)
            pad = torch.cat([pad.new_zeros(pad.shape[0], P), pad], 1)
        y, _, _ = self.decoder(x, pad)
        return y[:, P:]

    def forward(self, batch: Batch) -> ObjectiveOutput:
        enc = self.encoder
        adapter = enc.adapter
        tokens = clean = adapter.tokenize(batch)
        hidden = adapter.make_mask(tokens, self.mask_ratio) & ~tokens.pad
        if self.mask_mode == "replace":
            corrupted, replace = adapter.corrupt(batch, hidden)
            if corrupted is not batch:
                tokens = adapter.tokenize(corrupted)
            out = enc.encode(tokens, replace & hidden, "replace")
        elif self.locate_head is not None:
            out, q, q_keep, q_pad = enc.encode_queries(tokens, hidden, self.query_embed)
            coords = tokens.coords
            if coords is None:
                raise ValueError(f"objective.locate_weight > 0: modality {self.modality!r} tokens carry no coords")
            where = torch.gather(coords, 1, q_keep[..., None].expand(-1, -1, coords.shape[-1]))
            err = (self.locate_head(q).float() - where.float()).pow(2).sum(-1)  # [B, M]
            real = (~q_pad).float()
            locate = (err * real).sum() / real.sum().clamp_min(1.0)
        else:
            out = enc.encode(tokens, hidden, "drop")
        y = self.decode(tokens, out)
        target = adapter.targets(batch, clean)
        if self.head_on_hidden:
            # boolean selection flattens to [1, M, .]: the same per-token mean over hidden tokens
            pred = self.decoder_pred(y[hidden])[None]
            tgt = target[hidden][None]
            count = torch.ones(tgt.shape[:2], dtype=torch.bool, device=tgt.device)
        else:
            pred, tgt, count = self.decoder_pred(y), target, hidden
        loss = adapter.recon_loss(pred, tgt, count)
        real = (~tokens.pad).float().sum().clamp_min(1.0)
        metrics: dict[str, Any] = {"mask_fraction": hidden.float().sum() / real,
                                   "visible_tokens": real - hidden.float().sum()}
        if self.locate_head is not None:
            metrics["recon_loss"], metrics["locate_loss"] = loss.detach(), locate.detach()
            loss = loss + self.locate_weight * locate
        if not tgt.is_floating_point():  # discrete ids: how many hidden tokens the head gets right
            right = (pred.argmax(-1) == tgt[..., 0]) & count
            metrics["acc_hidden"] = right.float().sum() / count.float().sum().clamp_min(1.0)
        return ObjectiveOutput(loss, metrics)
