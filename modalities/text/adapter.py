"""Text adapter: BPE token ids [B, L] (open_clip's tokenizer, applied in the data pipeline) -> learned
token + learned absolute position embeddings. Masked autoencoding of text is BERT-style masked
language modelling: targets are the ids, the loss is cross-entropy over the hidden positions."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from mmssl.modalities.base import ModalityAdapter
from mmssl.modalities.common import cpu_uniform, noise_ranks
from mmssl.modalities.text.data import CONTEXT_LENGTH, EOT, SOT, TOKENIZER_NAME, VOCAB_SIZE, TextCodec
from torch import nn

from mmssl.registry import MODALITIES
from mmssl.types import Batch, Tokens

# A fixed multiplicative hash for the bag-of-words baseline: ids mod F would put neighbouring BPE ids
# (often related word pieces) into neighbouring buckets and collide by id ranges.
_HASH_MUL, _HASH_ADD, _HASH_PRIME = 2654435761, 40503, 4294967311


@MODALITIES.register("text")
class TextAdapter(ModalityAdapter):
    """Batch keys: ``text`` int64 [B, L] token ids (each row [sot, ..., eot], 0 beyond its length),
    ``text_len`` [B] (absent: every row is L long).

    cfg: ``vocab_size`` (49408, open_clip's BPE), ``context_length`` (77: the most positions),
    ``bert_replace`` (false; true: BERT's 80/10/10 corruption in ``corrupt``), ``bert_mask_prob``
    (0.8), ``bert_random_prob`` (0.1), ``view_global_scale`` ([0.6, 1.0]), ``view_local_scale``
    ([0.2, 0.4]), ``view_token_dropout`` (0.0), ``bow_buckets`` (512)."""

    name = "text"
    kind = "text"

    def __init__(self, dim: int, cfg: dict[str, Any] | None = None) -> None:
        super().__init__(dim, cfg)
        c = self.cfg
        self.vocab_size = int(c.get("vocab_size", VOCAB_SIZE))
        if self.vocab_size <= max(SOT, EOT):
            raise ValueError(f"text vocab_size {self.vocab_size} is smaller than the tokenizer's ({VOCAB_SIZE})")
        self.context_length = int(c.get("context_length", CONTEXT_LENGTH))
        self.token_embedding = nn.Embedding(self.vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.empty(self.context_length, dim))
        # CLIP's text tower initialisation
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        self.bert_replace = bool(c.get("bert_replace", False))
        self.bert_mask_prob = float(c.get("bert_mask_prob", 0.8))
        self.bert_random_prob = float(c.get("bert_random_prob", 0.1))
        if self.bert_mask_prob < 0 or self.bert_random_prob < 0 or self.bert_mask_prob + self.bert_random_prob > 1:
            raise ValueError("bert_mask_prob and bert_random_prob must be >= 0 and sum to at most 1")
        self.global_scale = tuple(float(v) for v in c.get("view_global_scale", (0.6, 1.0)))
        self.local_scale = tuple(float(v) for v in c.get("view_local_scale", (0.2, 0.4)))
        self.token_dropout = float(c.get("view_token_dropout", 0.0))
        self.bow_buckets = int(c.get("bow_buckets", 512))

    # -- tokens ---------------------------------------------------------------------------------------
    def _lengths(self, batch: Batch) -> torch.Tensor:
        ids = batch["text"]
        if "text_len" in batch:
            return batch["text_len"].to(ids.device)
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)

    def _pad(self, batch: Batch) -> torch.Tensor:
        ids = batch["text"]
        return torch.arange(ids.shape[1], device=ids.device)[None] >= self._lengths(batch)[:, None]

    def tokenize(self, batch: Batch) -> Tokens:
        ids = batch["text"]
        B, L = ids.shape
        if L > self.context_length:
            raise ValueError(f"text of {L} tokens exceeds context_length {self.context_length}: "
                             f"crop it in the data pipeline (max_len <= context_length)")
        pad = self._pad(batch)
        x = self.token_embedding(ids.masked_fill(pad, 0))
        pos = self.position_embedding[:L].to(x.dtype)[None].expand(B, -1, -1)
        index = torch.arange(L, device=ids.device)[None, :, None].expand(B, -1, -1)
        return Tokens(x=x, pos=pos, pad=pad, index=index)

    def num_tokens(self, batch: Batch) -> torch.Tensor:
        return self._lengths(batch)

    # -- masked language modelling --------------------------------------------------------------------
    @property
    def target_dim(self) -> int:
        return self.vocab_size

    def targets(self, batch: Batch, tokens: Tokens | None = None) -> torch.Tensor:
        """Token ids [B, L, 1] int64."""
        return batch["text"][..., None].long()

    def recon_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pred: [B, N, V] logits, target: [B, N, 1] ids, mask: [B, N] bool (True = count) -> mean
        cross-entropy over the counted tokens (0 when none are counted)."""
        m = mask.bool()
        if not bool(m.any()):
            return pred.sum() * 0.0
        return F.cross_entropy(pred[m].float(), target[..., 0][m].long())

    def make_mask(self, tokens: Tokens, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniformly random tokens: exactly round(ratio * n) of each sample's n maskable tokens (at
        least one where n >= 1 and ratio > 0). As BERT never masks [CLS]/[SEP], sot/eot are never
        hidden, nor is padding; the ratio is a fraction of the non-padding, non-special tokens.
        sot/eot are found by position (first token, last real token), as the codec wraps every row.
        Random numbers are drawn on the CPU with ``generator``."""
        pad = tokens.pad
        B, N = pad.shape
        dev = pad.device
        n_real = (~pad).sum(1)
        ar = torch.arange(N, device=dev)
        cand = ~pad & (ar[None] > 0) & (ar[None] < (n_real - 1)[:, None])
        n = cand.sum(1)
        k = torch.round(n.double() * ratio).long()
        if ratio > 0:
            k = torch.where(n >= 1, k.clamp_min(1), k)
        k = torch.minimum(k, n)
        noise = cpu_uniform(B, N, generator=generator).to(dev)  # drawn on CPU, ranked on the batch's device
        rank = noise_ranks(noise, ~cand)
        return (rank < k[:, None]) & cand

    def corrupt(self, batch: Batch, token_mask: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[Batch, torch.Tensor]:
        """BERT's 80/10/10 corruption of the hidden tokens, for ``Encoder(..., mask_mode="replace")``.

        batch: with ``text`` [B, L]; token_mask: [B, L] bool (True = hidden, from ``make_mask``).
        Returns (batch', replace_mask [B, L] bool): with ``bert_replace`` each hidden token
        independently goes to the mask embedding (p = bert_mask_prob, replace_mask True), becomes a
        uniformly random non-special id in batch'["text"] (p = bert_random_prob), or stays unchanged
        (the rest). Pass replace_mask as the Encoder's token_mask; the loss still counts every token
        of ``token_mask`` against ``targets`` of the *original* batch. Without ``bert_replace``:
        (batch, token_mask) unchanged. Random numbers are drawn on the CPU with ``generator``."""
        if not self.bert_replace:
            return batch, token_mask
        ids = batch["text"]
        B, L = ids.shape
        u = torch.rand(B, L, generator=generator, device="cpu").to(ids.device)
        # ids uniform over the vocabulary minus sot/eot: draw in [0, V - 2), then step over the specials
        rnd = torch.randint(self.vocab_size - 2, (B, L), generator=generator, device="cpu").to(ids.device)
        for s in sorted((SOT, EOT)):
            rnd = rnd + (rnd >= s).long()
        replace = token_mask & (u < self.bert_mask_prob)
        randomise = token_mask & (u >= self.bert_mask_prob) & (u < self.bert_mask_prob + self.bert_random_prob)
        out = dict(batch)
        out["text"] = torch.where(randomise, rnd, ids)
        return out, replace

    # -- views ----------------------------------------------------------------------------------------
    def views(self, batch: Batch, n_global: int, n_local: int) -> list[Batch]:
        """Random contiguous crops of each text body, re-wrapped with sot/eot (global: ``view_global_scale``
        of the body, default 60-100%; local: ``view_local_scale``, 20-40%; at least one token), then
        each kept body token dropped with probability ``view_token_dropout`` (at least one stays).
        Uses torch's global RNG, as the other adapters' views."""
        out = []
        for i in range(n_global + n_local):
            lo, hi = self.global_scale if i < n_global else self.local_scale
            out.append(self._crop_view(batch, lo, hi))
        return out

    def _crop_view(self, batch: Batch, lo: float, hi: float) -> Batch:
        ids, lengths = batch["text"], self._lengths(batch)
        rows = []
        for b in range(ids.shape[0]):
            body = ids[b, :int(lengths[b])]
            body = body[(body != SOT) & (body != EOT)]
            n = body.numel()
            if n:
                frac = lo + (hi - lo) * float(torch.rand(()))
                w = max(1, min(n, round(frac * n)))
                start = int(torch.randint(n - w + 1, ()))
                body = body[start:start + w]
                if self.token_dropout > 0 and w > 1:
                    keep = torch.rand(w, device=body.device) >= self.token_dropout
                    keep[int(torch.randint(w, ()))] = True
                    body = body[keep]
            rows.append(torch.cat([body.new_tensor([SOT]), body, body.new_tensor([EOT])]))
        new_len = torch.tensor([r.numel() for r in rows], dtype=torch.long, device=ids.device)
        text = ids.new_zeros(len(rows), int(new_len.max()))
        for b, r in enumerate(rows):
            text[b, :r.numel()] = r
        v = {k: t for k, t in batch.items() if not k.startswith("text")}
        v["text"], v["text_len"] = text, new_len
        return v

    # -- features -------------------------------------------------------------------------------------
    #: identifies what unit_features computes, so cached unit targets are rebuilt when it changes
    unit_features_id = "token-id"

    def unit_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's own id, [B, L, 1] int64 (0 at padding), with the padding of ``tokenize``.

        Integer features are units already: a discrete-unit objective labels them by id rather than
        clustering them (one-hot ids are all equally far apart, so k-means could only group them by
        frequency, and an id's value carries no order to cluster)."""
        pad = self._pad(batch)
        return batch["text"].long().masked_fill(pad, 0)[..., None], pad

    def bow_bucket(self, ids: torch.Tensor) -> torch.Tensor:
        """ids -> bucket in [0, bow_buckets): a fixed universal hash ((a * id + c) mod p) mod F."""
        return ((ids.long() * _HASH_MUL + _HASH_ADD) % _HASH_PRIME) % self.bow_buckets

    def baseline_features(self, batch: Batch) -> torch.Tensor:
        """Bag of words: hashed, L1-normalised counts of the non-special ids, [B, bow_buckets]."""
        ids = batch["text"]
        keep = (~self._pad(batch) & (ids != SOT) & (ids != EOT)).float()
        out = torch.zeros(ids.shape[0], self.bow_buckets, device=ids.device)
        out.scatter_add_(1, self.bow_bucket(ids), keep)
        return out / out.sum(1, keepdim=True).clamp_min(1.0)

    def preprocessing(self) -> dict[str, Any]:
        """``max_len`` is the longest input the encoder takes (context_length): evaluation feeds each
        text's leading window of that many ids, re-wrapped with sot/eot (``TextCodec.collate``)."""
        return {"tokenizer": TOKENIZER_NAME, "vocab_size": self.vocab_size, "context_length": self.context_length,
                "max_len": self.context_length, "sot_id": SOT, "eot_id": EOT, "pad_id": 0, "specials_masked": False}


TextAdapter.codec = TextCodec()  # the adapter's data codec
