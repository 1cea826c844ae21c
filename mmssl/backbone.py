"""The shared transformer backbone: pre- or post-norm blocks on F.scaled_dot_product_attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BackboneConfig:
    dim: int = 256
    depth: int = 4
    heads: int = 4
    ffn_dim: int = 1024
    norm_first: bool = True  # ViTs are pre-norm; HuBERT Base is post-norm
    dropout: float = 0.0  # after attention and FFN, and on the block input
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0  # inside the FFN, after the activation
    layer_drop: float = 0.0  # probability of skipping a whole block in training (HuBERT: 0.05)
    drop_path: float = 0.0
    eps: float = 1e-5


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection. x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """One transformer block. Returns (output, ffn) where ffn is the FFN output before the block's
    last residual (data2vec's target), both [B, N, D]."""

    def __init__(self, cfg: BackboneConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.attn = Attention(cfg.dim, cfg.heads, cfg.attn_dropout)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.ffn_dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = drop_path

    def _dp(self, y: torch.Tensor) -> torch.Tensor:
        # Stochastic depth per sample (timm's DropPath), identity in eval.
        if not self.training or self.drop_path == 0.0:
            return y
        keep = torch.rand(y.shape[0], 1, 1, device=y.device) >= self.drop_path
        return y * keep.to(y.dtype) / (1.0 - self.drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm_first:
            x = x + self._dp(self.dropout(self.attn(self.norm1(x), attn_mask)))
            f = self.dropout(self.ffn(self.norm2(x)))
            return x + self._dp(f), f
        x = self.norm1(x + self._dp(self.dropout(self.attn(x, attn_mask))))
        f = self.dropout(self.ffn(x))
        return self.norm2(x + self._dp(f)), f


class Backbone(nn.Module):
    """A stack of blocks. Post-norm stacks normalise their input (wav2vec 2.0 / HuBERT); pre-norm
    stacks normalise their output (ViT)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist() if cfg.depth > 1 else [cfg.drop_path] * cfg.depth
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.input_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None, return_layers: bool = False,
                return_ffn: bool = False, attn_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """x: [B, N, D], pad: [B, N] bool or None -> (last [B, N, D], layers, ffn outputs).

        attn_mask: [B, 1, N, N] bool (True = query row may attend key column), for one-way attention
        (Encoder.encode_queries); it replaces the key-padding mask built from ``pad``."""
        if attn_mask is None and pad is not None and bool(pad.any()):
            attn_mask = (~pad)[:, None, None, :]  # [B, 1, 1, N], True = attend
        if not self.cfg.norm_first:
            x = self.norm(x)
        x = self.input_dropout(x)
        layers: list[torch.Tensor] = []
        ffns: list[torch.Tensor] = []
        for blk in self.blocks:
            if self.training and self.cfg.layer_drop > 0 and float(torch.rand(())) < self.cfg.layer_drop:
                if return_layers:
                    layers.append(x)
                if return_ffn:
                    ffns.append(torch.zeros_like(x))
                continue
            x, f = blk(x, attn_mask)
            if return_layers:
                layers.append(x)
            if return_ffn:
                ffns.append(f)
        if self.cfg.norm_first:
            x = self.norm(x)
        return x, layers, ffns
