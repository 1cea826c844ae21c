"""Encoder = modality adapter + shared transformer backbone + pooling; masking happens here, once."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mmssl.backbone import Backbone, BackboneConfig
from mmssl.modalities.base import ModalityAdapter
from mmssl.types import Batch, EncoderOutput, Tokens

MaskMode = Literal["drop", "replace"]
#: poolings of an encoder's tokens into one vector: ``mean`` over real tokens, ``max`` (per channel over
#: real tokens: "is it anywhere", as multiple-instance lesion detection and PointNet read a set) and
#: ``cls`` (the first prefix token, final output only)
POOLS = ("mean", "max", "cls")


def drop_hidden(tokens: Tokens, token_mask: torch.Tensor) -> tuple[Tokens, torch.Tensor]:
    """Keep visible non-padding tokens first, in order (MAE's argsort trick, made stable).

    token_mask: [B, N] True = hidden. Returns (tokens with N' = max visible count, keep [B, N'] int64).
    Samples with fewer visible tokens are padded (pad=True) up to N'."""
    hidden = token_mask | tokens.pad
    order = torch.argsort(hidden.to(torch.int8), dim=1, stable=True)
    n_keep = int((~hidden).sum(1).max())
    keep = order[:, :n_keep]
    kept = tokens.select(keep)
    kept.pad = torch.gather(hidden, 1, keep)
    return kept, keep


class Encoder(nn.Module):
    """forward(batch) -> EncoderOutput(last [B,N,D], layers, pad); embed(batch) -> [B, D].

    ``config`` is the tower's complete description (``mmssl.factory.encoder_config`` plus the adapter's
    ``preprocessing``), written into an export's ``config.json``; ``build_encoder`` fills it, and an
    Encoder built by hand has an empty one."""

    config: dict

    def __init__(self, adapter: ModalityAdapter, backbone: BackboneConfig, pool: str = "mean",
                 num_prefix: int = 0) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
        if adapter.dim != backbone.dim:
            raise ValueError(f"adapter width {adapter.dim} != backbone width {backbone.dim}")
        self.adapter = adapter
        self.backbone = backbone_module = Backbone(backbone)
        self.backbone_cfg = backbone
        self.pool = pool
        num_prefix = max(num_prefix, 1 if pool == "cls" else 0)
        self.prefix = nn.Parameter(torch.zeros(1, num_prefix, backbone.dim)) if num_prefix else None
        if self.prefix is not None:
            nn.init.trunc_normal_(self.prefix, std=0.02)
        # HuBERT initialises its mask embedding uniformly in [0, 1).
        self.mask_embedding = nn.Parameter(torch.rand(backbone.dim))
        self.dim = backbone_module.cfg.dim
        self.config: dict = {}
        #: run the backbone on packed rows (``mmssl.packing``; ``data.pack=true``): the same outputs
        #: with less padding; a training-time setting, never exported
        self.pack_tokens = False

    @property
    def depth(self) -> int:
        return self.backbone_cfg.depth

    def forward(self, batch: Batch, token_mask: torch.Tensor | None = None, mask_mode: str = "drop",
                return_layers: bool = False, return_ffn: bool = False) -> EncoderOutput:
        tokens = self.adapter.tokenize(batch)
        return self.encode(tokens, token_mask, mask_mode, return_layers, return_ffn)

    def encode(self, tokens: Tokens, token_mask: torch.Tensor | None = None, mask_mode: str = "drop",
               return_layers: bool = False, return_ffn: bool = False) -> EncoderOutput:
        """Encode already-tokenised input. token_mask: [B, N] bool, True = hidden."""
        keep = None
        if token_mask is not None:
            token_mask = token_mask & ~tokens.pad
            if mask_mode == "replace":
                x = torch.where(token_mask[..., None], self.mask_embedding.to(tokens.x.dtype), tokens.x)
                tokens = Tokens(x, tokens.pos, tokens.pad, tokens.index, tokens.coords)
            elif mask_mode == "drop":
                tokens, keep = drop_hidden(tokens, token_mask)
            else:
                raise ValueError(f"mask_mode must be 'drop' or 'replace', not {mask_mode!r}")
        # Padding content is zeroed after masking, on the (smaller) kept set: it never shapes real tokens.
        pad = tokens.pad
        x = tokens.x.masked_fill(pad[..., None], 0.0) + tokens.pos
        if self.adapter.content_position is not None:
            x = x + self.adapter.content_position(x, pad)
        x, pad, n_prefix = self._with_prefix(x, pad)
        if self.pack_tokens:
            last, layers, ffn = self._packed_backbone(x, pad, return_layers, return_ffn)
        else:
            last, layers, ffn = self.backbone(x, pad, return_layers, return_ffn)
        out = EncoderOutput(last=last[:, n_prefix:], pad=tokens.pad, index=tokens.index,
                            layers=[h[:, n_prefix:] for h in layers], ffn=[f[:, n_prefix:] for f in ffn],
                            keep=keep, prefix=last[:, :n_prefix])
        return out

    def _packed_backbone(self, x: torch.Tensor, pad: torch.Tensor, return_layers: bool, return_ffn: bool
                         ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The backbone on packed rows, its outputs unpacked to x's [B, N, D] layout (zeros at padding);
        the padded batch as it is where no two items share a row."""
        from mmssl.packing import block_mask, pack, plan, unpack

        p = plan(pad)
        if p.rows == pad.shape[0]:
            return self.backbone(x, pad, return_layers, return_ffn)
        last, layers, ffn = self.backbone(pack(x, p), None, return_layers, return_ffn, attn_mask=block_mask(p))
        return unpack(last, p), [unpack(h, p) for h in layers], [unpack(f, p) for f in ffn]

    def _with_prefix(self, x: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prepend the prefix tokens (never padding): x [B, N, D], pad [B, N] -> ([B, P+N, D], [B, P+N], P)."""
        if self.prefix is None:
            return x, pad, 0
        n = self.prefix.shape[1]
        x = torch.cat([self.prefix.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        return x, torch.cat([pad.new_zeros(x.shape[0], n), pad], 1), n

    def encode_queries(self, tokens: Tokens, token_mask: torch.Tensor,
                       query: torch.Tensor) -> tuple[EncoderOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop-mode encoding of the visible tokens, plus the hidden tokens as content-only queries
        (PCP-MAE's centre-predicting pass, Zhang et al., NeurIPS 2024).

        token_mask: [B, N] bool, True = hidden; query: [D] a learned embedding the hidden tokens carry
        in place of their position. Hidden tokens attend to the visible ones and to each other; visible
        tokens never attend to hidden ones, so the visible outputs are the ``encode(tokens, token_mask,
        "drop")`` outputs and carry nothing of the hidden content. Returns (EncoderOutput of the visible
        tokens, query outputs [B, M, D], query_keep [B, M] int64 positions of the hidden tokens,
        query_pad [B, M] bool)."""
        if self.adapter.content_position is not None:
            raise ValueError(f"encode_queries: modality {self.adapter.name!r} computes positions from "
                             f"content (content_position), which hidden queries cannot carry")
        token_mask = token_mask & ~tokens.pad
        vis, keep = drop_hidden(tokens, token_mask)
        hid, qkeep = drop_hidden(tokens, ~token_mask)  # keeps the hidden real tokens, in order
        # prefix tokens join the visible side
        xv, pad_v, P = self._with_prefix(vis.x.masked_fill(vis.pad[..., None], 0.0) + vis.pos, vis.pad)
        xq = hid.x.masked_fill(hid.pad[..., None], 0.0) + query.to(hid.x.dtype)
        see_v = ~pad_v  # [B, V]: the prefix and real visible tokens every row may attend to
        B, V, M = xv.shape[0], xv.shape[1], xq.shape[1]
        rows_v = torch.cat([see_v, see_v.new_zeros(B, M)], 1)[:, None].expand(B, V, V + M)
        rows_q = torch.cat([see_v, ~hid.pad], 1)[:, None].expand(B, M, V + M)
        attn_mask = torch.cat([rows_v, rows_q], 1)  # [B, V+M, V+M]
        # every row also sees itself: a padded row (or a sample without visible tokens) then has a key,
        # so no row's softmax is empty (NaN); real rows already see themselves
        attn_mask = (attn_mask | torch.eye(V + M, dtype=torch.bool, device=attn_mask.device))[:, None]
        last, _, _ = self.backbone(torch.cat([xv, xq], 1), None, attn_mask=attn_mask)
        out = EncoderOutput(last=last[:, P:V], pad=vis.pad, index=vis.index, keep=keep, prefix=last[:, :P])
        return out, last[:, V:], qkeep, hid.pad

    def embed(self, batch: Batch, layer: int = -1) -> torch.Tensor:
        """Pooled features [B, D]. layer=-1 is the final output (after the final norm when pre-norm);
        layer=i in [0, depth) is block i's output."""
        out = self.forward(batch, return_layers=layer != -1)
        if self.pool == "cls" and layer == -1:
            return out.prefix[:, 0]
        h = out.last if layer == -1 else out.layers[layer]
        return pool_tokens(h, out.pad, self.pool)


def pool_tokens(h: torch.Tensor, pad: torch.Tensor, pool: str) -> torch.Tensor:
    """h: [B, N, D], pad: [B, N] True = padding -> [B, D] by ``pool`` (mean or max over real tokens)."""
    if pool == "mean":
        return masked_mean(h, pad)
    if pool == "max":
        return masked_max(h, pad)
    raise ValueError(f"token pooling must be mean or max, not {pool!r} (cls is the prefix token)")


def masked_max(h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """h: [B, N, D], pad: [B, N] True = padding -> [B, D] channel-wise max over real tokens (0 for a
    sample without any)."""
    m = h.masked_fill(pad[..., None], float("-inf")).amax(1)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def masked_mean(h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """h: [B, N, D], pad: [B, N] True = padding -> [B, D] mean over real tokens."""
    w = (~pad).to(h.dtype)[..., None]
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)
