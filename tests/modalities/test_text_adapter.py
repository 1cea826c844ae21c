"""The text adapter and codec: MLM loss and masks, BERT corruption, the tokenizer against open_clip,
the leak and padding tests through the Encoder, crops, views and the bag-of-words baseline."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from mmssl.modalities.text.adapter import TextAdapter
from mmssl.modalities.text.data import EOT, SOT, TextCodec, crop, encode_text
from omegaconf import OmegaConf

from mmssl.config import compose
from mmssl.data.shards import BadSample
from mmssl.factory import build_encoder, encoder_config
from mmssl.types import Tokens

SENTENCES = ["A photo of a cat.", "The  quick BROWN fox jumps over the lazy dog!",
             "Don't panic: it's 42 (or so), isn't it?", "Caf\u00e9 cr\u00e8me &amp; na\u00efve r\u00e9sum\u00e9s"]


def text_cfg(**adapter: object) -> dict:
    cfg = OmegaConf.to_container(compose(["modality=text"]).modality.text)
    cfg["adapter"].update(adapter)
    return cfg


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder(encoder_config("text", "micro", text_cfg())).eval()


def batch_of(texts: list[str]) -> dict[str, torch.Tensor]:
    return TextCodec().collate([{"text": encode_text(t)} for t in texts], None, None)


def test_tokenizer_matches_open_clip() -> None:
    ref = open_clip.tokenize(SENTENCES)  # [4, 77], zero-padded, CLIP's own
    b = batch_of(SENTENCES)
    for i in range(len(SENTENCES)):
        n = int(b["text_len"][i])
        assert torch.equal(b["text"][i, :n], ref[i, :n]) and int(ref[i, n:].abs().sum()) == 0
        assert int(b["text"][i, 0]) == SOT == 49406 and int(b["text"][i, n - 1]) == EOT == 49407
    assert b["text"].shape[1] == int(b["text_len"].max())  # padded to the longest only
    # special-token strings inside a text never become special ids in the body
    ids = encode_text("hello <end_of_text> world")
    assert ids.tolist() == [SOT, *open_clip.tokenize(["hello world"])[0, 1:3].tolist(), EOT]


def test_recon_loss_is_cross_entropy_over_hidden_tokens_only() -> None:
    ad = TextAdapter(8, {"vocab_size": 49408})
    V = 3
    pred = torch.zeros(1, 4, V)
    pred[0, 1] = torch.tensor([math.log(2.0), 0.0, 0.0])  # p(target 0) = 2/4
    pred[0, 2] = torch.tensor([0.0, 0.0, 50.0])  # confidently wrong, but visible: must not count
    target = torch.tensor([[[2], [0], [0], [1]]])
    mask = torch.tensor([[True, True, False, True]])
    want = (math.log(3.0) + math.log(2.0) + math.log(3.0)) / 3  # hand-computed
    got = ad.recon_loss(pred, target, mask)
    assert abs(float(got) - want) < 1e-6
    assert torch.allclose(got, F.cross_entropy(pred[mask], target[..., 0][mask]))
    assert float(ad.recon_loss(pred, target, torch.zeros_like(mask))) == 0.0
    assert ad.target_dim == 49408


def test_make_mask_counts_exact_never_special_or_padding() -> None:
    ad = TextAdapter(8, {})
    lens = torch.tensor([2, 3, 5, 12, 30, 77])
    L = int(lens.max())
    pad = torch.arange(L)[None] >= lens[:, None]
    tokens = Tokens(torch.zeros(6, L, 8), torch.zeros(6, L, 8), pad, torch.zeros(6, L, 1, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    for ratio in (0.0, 0.15, 0.3, 0.5, 1.0):
        m = ad.make_mask(tokens, ratio, g)
        n_body = (lens - 2).clamp_min(0)
        want = [min(n, max(1, round(ratio * n))) if ratio > 0 and n >= 1 else 0 for n in n_body.tolist()]
        assert m.sum(1).tolist() == want
        assert not m[:, 0].any() and not (m & pad).any()
        assert not m[torch.arange(6), lens - 1].any()  # eot
    # uniform over the body: every maskable position hidden about equally often
    counts = torch.zeros(L)
    for _ in range(400):
        counts += ad.make_mask(tokens, 0.3, g)[5].float()
    body = counts[1:76]
    assert body.min() > 0.5 * body.mean() and counts[0] == 0 and counts[76] == 0


def test_corrupt_80_10_10_proportions() -> None:
    ad = TextAdapter(8, {"bert_replace": True})
    B, L = 64, 77
    ids = torch.randint(1000, (B, L))
    ids[:, 0], ids[:, -1] = SOT, EOT
    batch = {"text": ids, "text_len": torch.full((B,), L)}
    hidden = torch.rand(B, L) < 0.5
    hidden[:, 0] = hidden[:, -1] = False
    g = torch.Generator().manual_seed(0)
    out, replace = ad.corrupt(batch, hidden, g)
    n = int(hidden.sum())
    changed = out["text"] != ids
    assert not (replace & ~hidden).any() and not (changed & ~hidden).any()
    assert not (replace & changed).any() and torch.equal(batch["text"], ids)  # input untouched
    f_replace, f_random = float(replace.sum()) / n, float(changed.sum()) / n
    # binomial sd with n ~ 2400: 0.008 and 0.006; random ids collide with the original w.p. 1/49406
    assert abs(f_replace - 0.8) < 0.04 and abs(f_random - 0.1) < 0.03
    new = out["text"][changed]
    assert ((new != SOT) & (new != EOT)).all() and int(new.max()) < 49408 and (new >= 1000).float().mean() > 0.9
    # off by default: nothing changes
    plain = TextAdapter(8, {})
    b2, r2 = plain.corrupt(batch, hidden, g)
    assert b2 is batch and r2 is hidden


def test_replaced_tokens_carry_no_content(encoder: torch.nn.Module) -> None:
    """mask_mode=replace: whatever ids the hidden tokens had, every output is identical."""
    b = batch_of(SENTENCES)
    tokens = encoder.adapter.tokenize(b)
    mask = encoder.adapter.make_mask(tokens, 0.3, torch.Generator().manual_seed(1))
    other = dict(b)
    other["text"] = torch.where(mask, torch.randint(49406, b["text"].shape), b["text"])
    assert not torch.equal(other["text"], b["text"])
    with torch.no_grad():
        y1 = encoder(b, token_mask=mask, mask_mode="replace").last
        y2 = encoder(other, token_mask=mask, mask_mode="replace").last
        y3 = encoder(other).last
    real = ~tokens.pad
    assert torch.equal(y1[real], y2[real])
    assert not torch.allclose(y1[real], y3[real])  # unmasked, the changed ids do change the output


def test_padding_invariance(encoder: torch.nn.Module) -> None:
    b = batch_of(SENTENCES)
    with torch.no_grad():
        together = encoder(b).last
        emb = encoder.embed(b)
        for i, s in enumerate(SENTENCES):
            alone_b = batch_of([s])
            alone = encoder(alone_b).last
            n = int(b["text_len"][i])
            assert alone.shape[1] == n
            torch.testing.assert_close(together[i, :n], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(emb[i], encoder.embed(alone_b)[0], atol=1e-5, rtol=1e-5)


def test_tokens_positions_and_context_limit(encoder: torch.nn.Module) -> None:
    ad = encoder.adapter
    b = batch_of(SENTENCES)
    t = ad.tokenize(b)
    B, L = b["text"].shape
    assert t.x.shape == (B, L, 256) and t.pos.shape == (B, L, 256) and t.index.shape == (B, L, 1)
    assert torch.equal(t.pad, torch.arange(L)[None] >= b["text_len"][:, None])
    assert torch.equal(t.index[..., 0], torch.arange(L)[None].expand(B, -1))
    assert torch.equal(t.pos[0], t.pos[1])  # positions do not depend on content
    assert torch.equal(ad.num_tokens(b), b["text_len"])
    assert torch.equal(ad.targets(b), b["text"][..., None]) and ad.targets(b).dtype == torch.long
    long = {"text": torch.full((1, 78), 320), "text_len": torch.tensor([78])}
    with pytest.raises(ValueError, match="exceeds context_length 77"):
        ad.tokenize(long)
    pre = ad.preprocessing()
    assert pre["tokenizer"] == "open_clip SimpleTokenizer bpe_simple_vocab_16e6"
    assert (pre["vocab_size"], pre["context_length"], pre["sot_id"], pre["eot_id"]) == (49408, 77, SOT, EOT)
    assert pre["max_len"] == 77  # evaluation crops texts to what the encoder takes


def test_collate_crops_rewrap_sot_eot() -> None:
    ids = torch.cat([torch.tensor([SOT]), torch.arange(100, 200), torch.tensor([EOT])])  # body of 100
    lead = crop(ids, 10, None)
    assert lead.tolist() == [SOT, *range(100, 108), EOT]
    starts = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        c = crop(ids, 10, g)
        assert c.numel() == 10 and int(c[0]) == SOT and int(c[-1]) == EOT
        body = c[1:-1]
        assert torch.equal(body, torch.arange(int(body[0]), int(body[0]) + 8))  # contiguous
        starts.add(int(body[0]))
    assert len(starts) > 20 and min(starts) >= 100 and max(starts) <= 192
    assert torch.equal(crop(ids, 102, g), ids)
    codec = TextCodec()
    b = codec.collate([{"text": ids}, {"text": encode_text("a cat")}], 10, None)
    assert b["text"].shape == (2, 10) and b["text_len"].tolist() == [10, 4]
    assert b["text"][1].tolist() == [SOT, *encode_text("a cat")[1:-1].tolist(), EOT, 0, 0, 0, 0, 0, 0]


def test_codec_encode_decode_and_bad_samples() -> None:
    codec = TextCodec()
    raw = codec.encode({"text": SENTENCES[2]})
    assert raw == {"txt": SENTENCES[2].encode("utf-8")}
    assert torch.equal(codec.decode({**raw, "__key__": "k"})["text"], encode_text(SENTENCES[2]))
    for bad, reason in [({"txt": b"\xff\xfe bad"}, "undecodable"), ({"txt": b"   \n"}, "empty_text"),
                        ({"json": b"{}"}, "missing_field")]:
        with pytest.raises(BadSample, match=f"^{reason}"):
            codec.decode({**bad, "__key__": "k"})


def test_views_are_wrapped_crops() -> None:
    torch.manual_seed(0)
    ad = TextAdapter(8, {"view_token_dropout": 0.0})
    long = " ".join(f"w{i}" for i in range(20))
    texts = [long, "a b c d e f g h i j"]
    b = batch_of(texts)
    b["label"] = torch.tensor([3, 4])
    views = ad.views(b, 2, 3)
    assert len(views) == 5
    for i, v in enumerate(views):
        lo, hi = (0.6, 1.0) if i < 2 else (0.2, 0.4)
        assert torch.equal(v["label"], b["label"])
        for r in range(2):
            n = int(v["text_len"][r])
            row, src = v["text"][r, :n], b["text"][r, 1:int(b["text_len"][r]) - 1]
            assert int(row[0]) == SOT and int(row[-1]) == EOT and int(v["text"][r, n:].abs().sum()) == 0
            body = row[1:-1]
            m = src.numel()
            assert math.floor(lo * m) <= body.numel() <= math.ceil(hi * m)
            # a contiguous window of the body
            assert any(torch.equal(src[s:s + body.numel()], body) for s in range(m - body.numel() + 1))
    drop = TextAdapter(8, {"view_token_dropout": 0.5}).views(b, 1, 0)[0]
    assert int(drop["text_len"].min()) >= 3


def test_bag_of_words_baseline() -> None:
    ad = TextAdapter(8, {"bow_buckets": 512})
    b = batch_of(["the cat sat on the mat", "mat the on sat cat the", "a dog"])
    f = ad.baseline_features(b)
    assert f.shape == (3, 512)
    torch.testing.assert_close(f.sum(1), torch.ones(3))
    assert torch.equal(f[0], f[1])  # order-free
    ids = encode_text("the cat sat on the mat")[1:-1]
    want = torch.zeros(512)
    want.index_add_(0, ad.bow_bucket(ids), torch.ones(ids.numel()))
    torch.testing.assert_close(f[0], want / ids.numel())
    # the hash spreads neighbouring ids: 512 consecutive ids fill most buckets
    assert ad.bow_bucket(torch.arange(1000, 1512)).unique().numel() > 300
