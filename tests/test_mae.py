"""The MAE objective against MAE's own formulation (argsort masking, ids_restore unshuffle, per-patch
normalised MSE on hidden patches) and against cross-entropy for discrete targets, on a toy adapter
whose every number is known."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mmssl.modalities.base import ModalityAdapter
from torch import nn

from mmssl.backbone import BackboneConfig
from mmssl.encoder import Encoder
from mmssl.factory import merge_objective_cfg
from mmssl.objectives.mae import MAE
from mmssl.types import Batch, Tokens


class Toy(ModalityAdapter):
    """Batch {"toy": [B, N, P] float, "toy_len": [B]}: each row is a token; targets are the rows
    (or integer ids when cfg discrete)."""

    name = "toy"

    def __init__(self, dim: int, cfg: dict | None = None) -> None:
        super().__init__(dim, cfg)
        self.P = int(self.cfg.get("P", 6))
        self.vocab = int(self.cfg.get("vocab", 0))
        self.embed = nn.Linear(self.P, dim) if not self.vocab else nn.Embedding(self.vocab, dim)
        self.pos_table = nn.Parameter(torch.randn(64, dim))

    def tokenize(self, batch: Batch) -> Tokens:
        x = batch["toy"]
        B, N = x.shape[:2]
        ar = torch.arange(N)
        pad = ar[None] >= batch["toy_len"][:, None]
        emb = self.embed(x[..., 0].long() if self.vocab else x)
        return Tokens(emb, self.pos_table[:N][None].expand(B, -1, -1), pad, ar[None, :, None].expand(B, -1, 1))

    def targets(self, batch: Batch, tokens: Tokens | None = None) -> torch.Tensor:
        return batch["toy"][..., :1].long() if self.vocab else batch["toy"]

    @property
    def target_dim(self) -> int:
        return self.vocab or self.P

    def recon_loss(self, pred, target, mask):
        if self.vocab:
            ce = F.cross_entropy(pred.flatten(0, 1).float(), target.flatten(), reduction="none").view(mask.shape)
            return (ce * mask).sum() / mask.sum()
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()

    def make_mask(self, tokens, ratio, generator=None):
        # MAE's random_masking: keep the int(N * (1 - ratio)) tokens of smallest noise
        B, N = tokens.pad.shape
        noise = torch.rand(B, N, generator=generator)
        keep = int(N * (1 - ratio))
        ids = noise.argsort(1)
        mask = torch.ones(B, N, dtype=torch.bool)
        mask.scatter_(1, ids[:, :keep], False)
        return mask & ~tokens.pad

    def views(self, batch, n_global, n_local):
        return [batch] * (n_global + n_local)

    def baseline_features(self, batch):
        return batch["toy"].mean(1)


def toy_mae(vocab: int = 0, mode: str = "drop", prefix: int = 0) -> MAE:
    torch.manual_seed(0)
    enc = Encoder(Toy(32, {"P": 6, "vocab": vocab}), BackboneConfig(dim=32, depth=2, heads=4, ffn_dim=64),
                  num_prefix=prefix)
    enc.config = {"size": "micro"}
    return MAE(("toy", enc), {"mask_ratio": 0.75, "mask_mode": mode, "decoder_dim": 16, "decoder_depth": 1,
                              "decoder_heads": 2, "head_on_hidden": bool(vocab)})


def reference_mae_loss(m: MAE, batch: Batch, noise: torch.Tensor) -> torch.Tensor:
    """He et al.'s models_mae.py, written out: argsort masking, encoder on the kept tokens, decoder
    input unshuffled with ids_restore, MSE on the removed tokens."""
    enc, ad = m.encoder, m.encoder.adapter
    tok = ad.tokenize(batch)
    x = tok.x + tok.pos
    B, N, D = x.shape
    len_keep = int(N * (1 - m.mask_ratio))
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
    mask = torch.ones(B, N)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    if enc.prefix is not None:
        x = torch.cat([enc.prefix.expand(B, -1, -1), x], 1)
    for blk in enc.backbone.blocks:
        x, _ = blk(x, None)
    x = enc.backbone.norm(x)
    x = m.decoder_embed(x)
    P = 0 if enc.prefix is None else enc.prefix.shape[1]
    mask_tokens = m.mask_token.view(1, 1, -1).expand(B, N - len_keep, -1)
    x_ = torch.cat([x[:, P:], mask_tokens], 1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :P], x_ + m.decoder_pos(tok.pos)], 1)
    for blk in m.decoder.blocks:
        x, _ = blk(x, None)
    pred = m.decoder_pred(m.decoder.norm(x))[:, P:]
    target = batch["toy"]
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("prefix", [0, 1])
def test_drop_mode_equals_mae_reference(prefix: int) -> None:
    m = toy_mae(prefix=prefix).eval()
    batch = {"toy": torch.randn(3, 12, 6), "toy_len": torch.full((3,), 12)}
    torch.manual_seed(5)
    noise = torch.rand(3, 12)
    torch.manual_seed(5)  # the toy adapter draws the same noise from the global generator
    out = m(batch)
    ref = reference_mae_loss(m, batch, noise)
    assert torch.allclose(out.loss, ref, atol=1e-6), (out.loss, ref)
    assert float(out.metrics["mask_fraction"]) == pytest.approx(9 / 12)
    assert float(out.metrics["visible_tokens"]) == 3 * 3  # the encoder saw 3 of 12 tokens per sample


def test_loss_counts_hidden_tokens_only_and_hidden_content_never_leaks() -> None:
    m = toy_mae().eval()
    x = torch.randn(2, 12, 6)
    batch = {"toy": x, "toy_len": torch.tensor([12, 9])}
    torch.manual_seed(1)
    tok = m.encoder.adapter.tokenize(batch)
    hidden = m.encoder.adapter.make_mask(tok, 0.75)
    assert not (hidden & tok.pad).any()

    captured = {}

    def loss_with(xx: torch.Tensor) -> torch.Tensor:
        b = {"toy": xx, "toy_len": batch["toy_len"]}
        torch.manual_seed(1)
        y = m.decode(m.encoder.adapter.tokenize(b), m.encoder(b, hidden, "drop"))
        captured["y"] = y
        torch.manual_seed(1)
        return m(b).loss

    base = loss_with(x)
    y0 = captured["y"]
    # hidden inputs changed (targets unchanged): decoder features are identical -> no leak
    x_in = x.clone()
    x_in[hidden] += 5.0
    tok2 = m.encoder.adapter.tokenize({"toy": x_in, "toy_len": batch["toy_len"]})
    out2 = m.encoder.encode(tok2, hidden, "drop")
    y2 = m.decode(tok2, out2)
    assert torch.allclose(y0, y2, atol=1e-6)
    # a visible token's target is never scored; a hidden one's is
    real_visible = ~hidden & ~tok.pad
    xv = x.clone()
    xv[real_visible] += 3.0
    # visible inputs change the encoder, so compare the loss against the same predictions instead
    pred = m.decoder_pred(y0)
    def mse(t: torch.Tensor) -> torch.Tensor:
        return m.encoder.adapter.recon_loss(pred, t, hidden)
    assert torch.allclose(mse(x), base, atol=1e-6)
    assert torch.allclose(mse(xv), base, atol=1e-6)
    xh = x.clone()
    xh[hidden] += 3.0
    assert not torch.allclose(mse(xh), base)
    # padding is neither visible nor scored: its content changes nothing
    xp = x.clone()
    xp[1, 9:] = 100.0
    assert torch.allclose(loss_with(xp), base, atol=1e-6)


def test_replace_mode_discrete_targets_are_cross_entropy_over_hidden_tokens() -> None:
    m = toy_mae(vocab=50, mode="replace").eval()
    assert m.head_on_hidden  # the head scores hidden tokens only (auto does so for vocabulary-sized heads)
    ids = torch.randint(0, 50, (2, 10, 1)).float()
    batch = {"toy": ids, "toy_len": torch.tensor([10, 7])}
    torch.manual_seed(3)
    out = m(batch)
    torch.manual_seed(3)
    tok = m.encoder.adapter.tokenize(batch)
    hidden = m.encoder.adapter.make_mask(tok, 0.75) & ~tok.pad
    enc_out = m.encoder.encode(tok, hidden, "replace")
    logits = m.decoder_pred(m.decode(tok, enc_out))
    ref = F.cross_entropy(logits[hidden], ids[..., 0].long()[hidden])
    assert torch.allclose(out.loss, ref, atol=1e-6)
    acc = (logits[hidden].argmax(-1) == ids[..., 0].long()[hidden]).float().mean()
    assert float(out.metrics["acc_hidden"]) == pytest.approx(float(acc))
    # the hidden ids themselves never reach the encoder in replace mode
    ids2 = ids.clone()
    ids2[..., 0][hidden] = (ids2[..., 0][hidden] + 7) % 50
    tok2 = m.encoder.adapter.tokenize({"toy": ids2, "toy_len": batch["toy_len"]})
    assert torch.allclose(m.encoder.encode(tok2, hidden, "replace").last, enc_out.last, atol=1e-6)


def test_modality_defaults_fill_only_unset_objective_keys() -> None:
    mod = {"objectives": {"mae": {"mask_ratio": 0.3, "mask_mode": "replace", "adapter": {"x": 1}}}}
    cfg = {"name": "mae", "mask_ratio": None, "mask_mode": "drop", "decoder_dim": None}
    out = merge_objective_cfg("mae", cfg, {"text": mod})
    assert out["mask_ratio"] == 0.3 and out["mask_mode"] == "drop" and out["decoder_dim"] is None
    assert "adapter" not in out
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(("toy", toy_mae().encoder), {"mask_ratio": None})


def test_mae_decoder_sizes_follow_the_encoder_size() -> None:
    m = toy_mae()
    enc = m.encoder
    enc.config = {"size": "base"}
    paper = MAE(("toy", enc), {"mask_ratio": 0.75, "decoder_sizes": {"micro": {"dim": 8, "depth": 1, "heads": 2}}})
    assert (paper.decoder_cfg.dim, paper.decoder_cfg.depth, paper.decoder_cfg.heads) == (512, 8, 16)
    assert not paper.head_on_hidden  # pixel-sized heads run on every token, as MAE's
    enc.config = {"size": "micro"}
    small = MAE(("toy", enc), {"mask_ratio": 0.75, "decoder_sizes": {"micro": {"dim": 8, "depth": 1, "heads": 2}}})
    assert (small.decoder_cfg.dim, small.decoder_cfg.depth) == (8, 1)


def test_modality_trainer_defaults_yield_to_the_command_line() -> None:
    from mmssl.config import apply_modality_defaults as apply_trainer_defaults
    from mmssl.config import compose

    cfg = compose(["modality=text", "objective=mae"])
    apply_trainer_defaults(cfg, ["text"], ["modality=text", "objective=mae"])
    assert cfg.trainer.lr == 1e-3  # text MLM's measured learning rate
    cfg = compose(["modality=text", "objective=mae", "trainer.lr=3e-4"])
    apply_trainer_defaults(cfg, ["text"], ["trainer.lr=3e-4"])
    assert cfg.trainer.lr == 3e-4
    cfg = compose(["modality=image", "objective=mae"])
    apply_trainer_defaults(cfg, ["image"], [])
    assert cfg.trainer.lr == 5e-4
    assert cfg.modality.image.pool == "cls"
    cfg = compose(["modality=image", "objective=data2vec"])
    apply_trainer_defaults(cfg, ["image"], [])
    assert cfg.modality.image.pool == "mean"  # image data2vec's pooling ...
    cfg = compose(["modality=image", "objective=data2vec", "modality.image.pool=cls"])
    apply_trainer_defaults(cfg, ["image"], ["modality.image.pool=cls"])
    assert cfg.modality.image.pool == "cls"  # ... yields to the command line
    cfg = compose(["modality=point", "objective=mae"])
    apply_trainer_defaults(cfg, ["point"], [])
    assert (cfg.trainer.weight_decay, cfg.trainer.eps, cfg.trainer.schedule) == (0.05, 1e-8, "constant")  # Point-MAE's


def test_modality_refines_the_decoder_size_table() -> None:
    from mmssl.config import compose, to_dict
    from mmssl.factory import merge_objective_cfg

    def merged(args: list[str]) -> dict:
        cfg = compose(args)
        return merge_objective_cfg("mae", to_dict(cfg.objective), {k: to_dict(v) for k, v in cfg.modality.items()})

    mri = merged(["modality=mri", "objective=mae"])
    assert mri["decoder_sizes"]["micro"] == {"dim": 128, "depth": 1, "heads": 4}  # MRI's micro entry
    assert mri["decoder_sizes"]["base"] == {"dim": 512, "depth": 8, "heads": 16}  # the other sizes: MAE's
    assert merged(["modality=image", "objective=mae"])["decoder_sizes"]["micro"]["depth"] == 2
    assert merged(["modality=mri", "objective=mae", "objective.decoder_depth=2"])["decoder_depth"] == 2


class ToyWithCoords(Toy):
    """The toy adapter with 2-D token coordinates: row n sits at (n, n^2 / 10)."""

    @property
    def coord_dim(self) -> int:
        return 2

    def tokenize(self, batch: Batch) -> Tokens:
        t = super().tokenize(batch)
        B, N = t.pad.shape
        n = torch.arange(N, dtype=torch.float32)
        t.coords = torch.stack([n, n * n / 10], -1)[None].expand(B, -1, -1)
        return t


def toy_locate_mae(prefix: int = 0, weight: float = 0.5) -> MAE:
    torch.manual_seed(0)
    enc = Encoder(ToyWithCoords(32, {"P": 6}), BackboneConfig(dim=32, depth=2, heads=4, ffn_dim=64),
                  num_prefix=prefix)
    enc.config = {"size": "micro"}
    return MAE(("toy", enc), {"mask_ratio": 0.75, "mask_mode": "drop", "decoder_dim": 16, "decoder_depth": 1,
                              "decoder_heads": 2, "locate_weight": weight})


@pytest.mark.parametrize("prefix", [0, 1])
def test_encode_queries_leaves_the_visible_encoding_as_drop_mode(prefix: int) -> None:
    m = toy_locate_mae(prefix).eval()
    enc = m.encoder
    batch = {"toy": torch.randn(3, 12, 6), "toy_len": torch.tensor([12, 9, 5])}
    tok = enc.adapter.tokenize(batch)
    torch.manual_seed(2)
    hidden = enc.adapter.make_mask(tok, 0.6)
    ref = enc.encode(tok, hidden, "drop")
    out, q, q_keep, q_pad = enc.encode_queries(tok, hidden, m.query_embed)
    real = ~ref.pad
    assert torch.equal(out.keep, ref.keep) and torch.equal(out.pad, ref.pad)
    assert torch.allclose(out.last[real], ref.last[real], atol=1e-5)
    assert torch.allclose(out.prefix, ref.prefix, atol=1e-5)
    # the queries are exactly the hidden real tokens, in order
    h = hidden & ~tok.pad
    assert q.shape[:2] == q_keep.shape == q_pad.shape and q.shape[1] == int(h.sum(1).max())
    for b in range(3):
        assert q_keep[b][~q_pad[b]].tolist() == h[b].nonzero().flatten().tolist()
    # hidden content and hidden positions never reach the visible outputs; the queries read the content
    # but not the positions
    x2, p2 = tok.x.clone(), tok.pos.clone()
    x2[h] += 4.0 * torch.randn_like(x2[h])  # not a constant: LayerNorm would remove a shift
    p2[h] -= 3.0 * torch.randn_like(p2[h])
    out_x, q_x, _, _ = enc.encode_queries(Tokens(x2, tok.pos, tok.pad, tok.index), hidden, m.query_embed)
    out_p, q_p, _, _ = enc.encode_queries(Tokens(tok.x, p2, tok.pad, tok.index), hidden, m.query_embed)
    assert torch.allclose(out_x.last[real], out.last[real], atol=1e-5)
    assert torch.allclose(out_p.last[real], out.last[real], atol=1e-5)
    assert torch.allclose(q_p[~q_pad], q[~q_pad], atol=1e-5)
    assert not torch.allclose(q_x[~q_pad], q[~q_pad], atol=1e-3)


def test_locate_loss_is_the_hand_formula_beside_the_unchanged_reconstruction() -> None:
    m = toy_locate_mae(weight=0.5).eval()
    batch = {"toy": torch.randn(3, 12, 6), "toy_len": torch.full((3,), 12)}
    torch.manual_seed(5)
    noise = torch.rand(3, 12)
    torch.manual_seed(5)
    out = m(batch)
    # the reconstruction term is MAE's, as without the centre prediction
    recon = reference_mae_loss(m, batch, noise)
    assert torch.allclose(out.metrics["recon_loss"], recon, atol=1e-6)
    # the centre term: squared error summed over the 2 coordinates, mean over the 9 hidden tokens a sample
    enc = m.encoder
    tok = enc.adapter.tokenize(batch)
    hidden = torch.zeros(3, 12, dtype=torch.bool)
    hidden.scatter_(1, noise.argsort(1)[:, 3:], True)
    _, q, q_keep, _ = enc.encode_queries(tok, hidden, m.query_embed)
    pred = m.locate_head(q)  # [3, 9, 2]
    n = q_keep.float()
    where = torch.stack([n, n * n / 10], -1)
    locate = ((pred - where) ** 2).sum(-1).mean()
    assert torch.allclose(out.metrics["locate_loss"], locate, atol=1e-5)
    assert torch.allclose(out.loss, recon + 0.5 * locate, atol=1e-5)
    assert set(m.heads()) == {"mae_decoder", "mae_locate"}


def test_locate_needs_coordinates_and_drop_mode() -> None:
    enc = Encoder(Toy(32, {"P": 6}), BackboneConfig(dim=32, depth=1, heads=4, ffn_dim=64))
    with pytest.raises(ValueError, match="no token coordinates"):
        MAE(("toy", enc), {"mask_ratio": 0.5, "locate_weight": 0.1})
    enc = Encoder(ToyWithCoords(32, {"P": 6}), BackboneConfig(dim=32, depth=1, heads=4, ffn_dim=64))
    with pytest.raises(ValueError, match="mask_mode=drop"):
        MAE(("toy", enc), {"mask_ratio": 0.5, "mask_mode": "replace", "locate_weight": 0.1})
    assert MAE(("toy", enc), {"mask_ratio": 0.5}).locate_head is None  # off unless asked
