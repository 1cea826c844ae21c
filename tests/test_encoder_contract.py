"""The adapter and Encoder contracts (DESIGN.md), on the speech adapter."""
from __future__ import annotations

import pytest
import torch

from mmssl.factory import build_encoder, build_objective, encoder_config
from mmssl.modalities.speech.features import MFCC, num_frames
from mmssl.objectives.unit_targets import UnitTable

SPEECH = {"backbone": {"norm_first": False},
          "adapter": {"frontend_channels": [16, 32, 32, 32, 32, 32, 32], "frontend_norm": "group_norm",
                      "pos_conv_kernel": 16, "pos_conv_groups": 4}}


def tiny_encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = encoder_config("speech", "micro", SPEECH, {"dim": 64, "depth": 2, "heads": 2, "ffn_dim": 128})
    return build_encoder(cfg).eval()


def speech_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    wav = torch.randn(len(lengths), T, generator=g) * 0.1
    for i, n in enumerate(lengths):
        wav[i, n:] = 0
    return {"speech": wav, "speech_len": torch.tensor(lengths)}


@pytest.mark.parametrize("n", [400, 719, 720, 16000, 16319, 23456])
def test_frames_align_with_mfcc_and_formula(n: int) -> None:
    enc = tiny_encoder()
    tok = enc.adapter.tokenize(speech_batch([n]))
    assert tok.x.shape[1] == num_frames(n) == (n - 400) // 320 + 1
    assert MFCC()(torch.randn(1, n)).shape[1] == num_frames(n)


def test_tokens_shapes_and_position_independent_of_content() -> None:
    enc = tiny_encoder()
    b = speech_batch([16000, 9000])
    t = enc.adapter.tokenize(b)
    B, N, D = t.x.shape
    assert t.pos.shape == (B, N, D) and t.pad.shape == (B, N) and t.index.shape == (B, N, 1)
    assert t.pad[1].sum() == N - num_frames(9000) and not t.pad[0].any()
    t2 = enc.adapter.tokenize({**b, "speech": torch.randn_like(b["speech"])})
    assert torch.equal(t.pos, t2.pos)
    off = enc.adapter.tokenize({**b, "speech_offset": torch.tensor([640, 0])})
    assert off.index[0, 0, 0] == 2 and off.index[1, 0, 0] == 0


def test_padding_does_not_change_real_frames() -> None:
    """A padded utterance gets exactly the features it gets alone (padding-aware front-end norm,
    zeroed padding before the convolutional position, attention mask)."""
    enc = tiny_encoder()
    b = speech_batch([16000, 9000])
    alone = {"speech": b["speech"][1:, :9000], "speech_len": torch.tensor([9000])}
    with torch.no_grad():
        both = enc(b, return_layers=True)
        single = enc(alone, return_layers=True)
    n = num_frames(9000)
    for h_b, h_s in zip(both.layers + [both.last], single.layers + [single.last]):
        torch.testing.assert_close(h_b[1, :n], h_s[0], atol=1e-4, rtol=1e-4)


def test_span_mask_ratio_and_padding() -> None:
    enc = tiny_encoder()
    b = speech_batch([48000, 30000, 8000, 2000])
    t = enc.adapter.tokenize(b)
    g = torch.Generator().manual_seed(0)
    fracs = []
    for _ in range(20):
        m = enc.adapter.make_mask(t, 0.5656, g)
        assert not (m & t.pad).any()
        fracs.append((m[0].sum() / (~t.pad[0]).sum()).item())
        assert m[3].sum() > 0  # even a 5-frame utterance gets a span
    # 8% of frames start a 10-frame span, overlaps allowed: about half the frames hidden
    assert 0.45 < sum(fracs) / len(fracs) < 0.65


def test_drop_and_replace_masking() -> None:
    enc = tiny_encoder()
    b = speech_batch([16000, 12000])
    t = enc.adapter.tokenize(b)
    mask = enc.adapter.make_mask(t, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        rep = enc.encode(t, mask, "replace")
        drop = enc.encode(t, mask, "drop")
    assert rep.last.shape == t.x.shape
    visible = (~mask & ~t.pad).sum(1)
    assert drop.last.shape[1] == int(visible.max())
    assert torch.equal((~drop.pad).sum(1), visible)
    # kept positions are exactly the visible ones, in order
    for i in range(2):
        kept = drop.keep[i][~drop.pad[i]]
        assert torch.equal(kept, torch.nonzero(~mask[i] & ~t.pad[i]).squeeze(1))


def test_masked_content_cannot_leak() -> None:
    """Changing the content of hidden tokens after tokenize changes neither the student's outputs
    nor the HuBERT loss (the convolutional position is applied after masking)."""
    enc = tiny_encoder()
    obj = build_objective("hubert", {"k": 7, "final_dim": 16}, {"speech": enc})
    b = {**speech_batch([16000, 11000]), "sample_id": torch.tensor([0, 1])}
    t = enc.adapter.tokenize(b)
    N = t.x.shape[1]
    obj.use_units(UnitTable(torch.randint(0, 7, (2 * N,), dtype=torch.int16), torch.tensor([0, 1]),
                          torch.tensor([0, N]), torch.tensor([N, N]), {"k": 7}))
    mask = enc.adapter.make_mask(t, 0.5, torch.Generator().manual_seed(3))
    t2 = type(t)(torch.where(mask[..., None], torch.randn_like(t.x) * 100, t.x), t.pos, t.pad, t.index)
    with torch.no_grad():
        out1 = enc.encode(t, mask, "replace", return_layers=True)
        out2 = enc.encode(t2, mask, "replace", return_layers=True)
    torch.testing.assert_close(out1.last, out2.last)
    for a, c in zip(out1.layers, out2.layers):
        torch.testing.assert_close(a, c)
    # and through the objective's own path: patch tokenize and make_mask to return the two variants
    losses = []
    for tok in (t, t2):
        enc.adapter.tokenize = lambda batch, tok=tok: tok  # type: ignore[method-assign]
        enc.adapter.make_mask = lambda tok_, ratio, generator=None: mask  # type: ignore[method-assign]
        with torch.no_grad():
            losses.append(obj(b).loss)
    assert torch.equal(losses[0], losses[1])
    # sanity: without masking, the changed content does change the output
    with torch.no_grad():
        assert not torch.allclose(enc.encode(t).last, enc.encode(t2).last)


def test_embed_and_layers() -> None:
    enc = tiny_encoder()
    b = speech_batch([16000, 8000])
    with torch.no_grad():
        e = enc.embed(b)
        out = enc(b, return_layers=True)
        e0 = enc.embed(b, layer=0)
    assert e.shape == (2, 64) and e0.shape == (2, 64)
    assert len(out.layers) == 2
    assert not torch.allclose(e, e0)


def test_token_pooling_ignores_padding() -> None:
    from mmssl.encoder import masked_max, masked_mean, pool_tokens

    h = torch.tensor([[[1.0, -2.0], [3.0, -1.0], [100.0, 100.0]],
                      [[-5.0, -6.0], [7.0, 7.0], [7.0, 7.0]]])
    pad = torch.tensor([[False, False, True], [False, True, True]])
    torch.testing.assert_close(masked_max(h, pad), torch.tensor([[3.0, -1.0], [-5.0, -6.0]]))
    torch.testing.assert_close(masked_mean(h, pad), torch.tensor([[2.0, -1.5], [-5.0, -6.0]]))
    torch.testing.assert_close(pool_tokens(h, torch.ones_like(pad), "max"), torch.zeros(2, 2))  # no real token
    with pytest.raises(ValueError, match="mean or max"):
        pool_tokens(h, pad, "cls")
    enc = tiny_encoder()
    enc.pool = "max"
    b = speech_batch([16000, 8000])
    with torch.no_grad():
        out = enc(b)
        torch.testing.assert_close(enc.embed(b), masked_max(out.last, out.pad))
