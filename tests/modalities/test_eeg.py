"""EEG: electrode table and name matching, readers, codec batches, resampling, tokens with 4D
positions, channel + patch masking without leaks, one encoder for any montage, views, band powers."""
from __future__ import annotations

import math
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import mmssl.modalities.eeg  # noqa: F401  (registers the adapter before the lead lists it in _BUILTINS)
from mmssl.data.shards import BadSample
from mmssl.factory import build_encoder, encoder_config
from mmssl.modalities.eeg import montage, synth
from mmssl.modalities.eeg.adapter import EEGAdapter
from mmssl.modalities.eeg.data import CLIP, EEGCodec, normalise
from mmssl.types import Tokens

CODEC = EEGCodec()
SMALL = {"sample_rate": 128, "patch": 64, "window_ms": 2000}


def _eeg_cfg() -> dict:
    return OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality/eeg.yaml"))


def _item(names: list[str], T: int = 256, rate: float = 128.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"eeg": rng.normal(0, 10, (len(names), T)).astype(np.float32), "eeg_pos": montage.positions(names),
            "eeg_rate": rate}


def _batch(*items: dict, max_len: int | None = None) -> dict:
    return CODEC.collate([CODEC.decode(CODEC.encode(it)) for it in items], max_len, None)


# -- electrode table and names -------------------------------------------------------------------------
def test_shipped_table_is_the_10_05_system_on_the_unit_sphere() -> None:
    names, xyz, systems = montage.table()
    assert len(names) == len(set(names)) == 339 and xyz.shape == (339, 3)
    assert np.allclose(np.linalg.norm(xyz, axis=1), 1.0, atol=1e-4)
    assert len(montage.names_of("1020")) == 21 and set(montage.STANDARD_1020_19) <= set(montage.names_of("1020"))
    assert set(montage.names_of("1020")) < set(montage.names_of("1010")) < set(montage.names_of("1005"))
    for m in montage.MONTAGES.values():
        assert set(m) <= set(montage.names_of("1010"))
    p = dict(zip(names, xyz))
    assert p["Cz"][2] > 0.95 and p["Fpz"][1] > 0.9 and p["Oz"][1] < -0.7  # up, front, back
    for left, right in (("C3", "C4"), ("T7", "T8"), ("O1", "O2"), ("F7", "F8")):  # mirror images in x (a real head: nearly)
        assert p[left][0] < -0.2 and abs(p[left][0] + p[right][0]) < 0.05 and abs(p[left][1] - p[right][1]) < 0.05


def test_names_match_case_insensitively_with_aliases_and_reference_suffixes() -> None:
    for raw, want in (("fp1", "Fp1"), ("FP1", "Fp1"), ("cz", "Cz"), ("T3", "T7"), ("t4", "T8"), ("T5", "P7"),
                      ("T6", "P8"), ("EEG FP1-REF", "Fp1"), ("EEG T3-LE", "T7"), ("Fc5.", "FC5"), ("C3-A2", "C3"),
                      ("fcc3H", "FCC3h"), (" O1 ", "O1")):
        assert montage.canonical(raw) == want, raw
    for raw in ("Fp1-F7", "C3-Cz", "ECG", "X1", "", "EEG"):  # bipolar derivations and non-electrodes
        assert montage.canonical(raw) is None, raw
    assert np.array_equal(montage.positions(["t3", "T7"])[0], montage.positions(["T7"])[0])
    with pytest.raises(montage.UnknownChannel) as e:
        montage.positions(["Cz", "Foo", "Fp1-F7", "Pz"])
    assert e.value.names == ["Foo", "Fp1-F7"]


# -- readers -------------------------------------------------------------------------------------------
def test_npz_reader_names_aliases_own_coordinates_and_refusals(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(3, 300)).astype(np.float32)
    np.savez(tmp_path / "ok.npz", data=data, ch_names=np.array(["cz", "T3", "EEG O2-REF"]), sfreq=250.0)
    it = CODEC.read_file(str(tmp_path / "ok.npz"))
    assert it["eeg_rate"] == 250.0 and np.array_equal(it["eeg"], data)
    assert np.array_equal(it["eeg_pos"], montage.positions(["Cz", "T7", "O2"]))

    np.savez(tmp_path / "unknown.npz", data=data, ch_names=np.array(["Cz", "Foo1", "Bar"]), sfreq=250)
    with pytest.raises(BadSample, match=r"^unknown_channel: unknown.npz: .*Foo1, Bar"):
        CODEC.read_file(str(tmp_path / "unknown.npz"))
    # the same names with coordinates of their own: accepted, projected onto the unit sphere
    own = np.array([[0.0, 0.0, 0.09], [-0.08, 0.0, 0.0], [0.0, 0.05, 0.05]])
    np.savez(tmp_path / "own.npz", data=data, ch_names=np.array(["Cz", "Foo1", "Bar"]), sfreq=250, pos=own)
    it = CODEC.read_file(str(tmp_path / "own.npz"))
    assert np.allclose(it["eeg_pos"], [[0, 0, 1], [-1, 0, 0], [0, 2 ** -0.5, 2 ** -0.5]], atol=1e-6)

    np.save(tmp_path / "bare.npy", data)
    with pytest.raises(BadSample, match="^no_channel_names: bare.npy"):
        CODEC.read_file(str(tmp_path / "bare.npy"))
    np.savez(tmp_path / "objects.npz", data=data, ch_names=np.array(["Cz", "Pz", "Oz"], dtype=object), sfreq=250)
    with pytest.raises(BadSample, match="^unreadable: objects.npz"):
        CODEC.read_file(str(tmp_path / "objects.npz"))
    np.savez(tmp_path / "norate.npz", data=data, ch_names=np.array(["Cz", "Pz", "Oz"]))
    with pytest.raises(BadSample, match="^missing_field: norate.npz: no array 'sfreq'"):
        CODEC.read_file(str(tmp_path / "norate.npz"))
    np.savez(tmp_path / "count.npz", data=data, ch_names=np.array(["Cz", "Pz"]), sfreq=250)
    with pytest.raises(BadSample, match="^wrong_shape: count.npz"):
        CODEC.read_file(str(tmp_path / "count.npz"))
    bad = data.copy()
    bad[1, 5] = np.nan
    np.savez(tmp_path / "nan.npz", data=bad, ch_names=np.array(["Cz", "Pz", "Oz"]), sfreq=250)
    with pytest.raises(BadSample, match="^non_finite"):
        CODEC.read_file(str(tmp_path / "nan.npz"))


def test_fif_through_mne_and_the_missing_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mne = pytest.importorskip("mne")
    volts = np.random.default_rng(1).normal(0, 20e-6, (4, 500))
    info = mne.create_info(["Fz", "c3", "T4", "ECG"], 250.0, ["eeg", "eeg", "eeg", "ecg"])
    mne.io.RawArray(volts, info, verbose="error").save(tmp_path / "rec_raw.fif", verbose="error")
    it = CODEC.read_file(str(tmp_path / "rec_raw.fif"))
    assert it["ch_names"] == ["Fz", "c3", "T4"] and it["eeg_rate"] == 250.0  # the ECG channel is not EEG
    assert np.allclose(it["eeg"], volts[:3] * 1e6, rtol=1e-5)  # microvolts
    assert np.array_equal(it["eeg_pos"], montage.positions(["Fz", "C3", "T8"]))
    # digitised positions in the file win over the names
    raw = mne.io.RawArray(volts[:3], mne.create_info(["A", "B", "C"], 250.0, "eeg"), verbose="error")
    raw.set_montage(mne.channels.make_dig_montage(
        {"A": [0, 0, 0.1], "B": [0.08, 0, 0], "C": [0, -0.09, 0]}, coord_frame="head"))
    raw.save(tmp_path / "dig_raw.fif", verbose="error")
    assert np.allclose(CODEC.read_file(str(tmp_path / "dig_raw.fif"))["eeg_pos"], [[0, 0, 1], [1, 0, 0], [0, -1, 0]],
                       atol=1e-6)
    monkeypatch.setitem(sys.modules, "mne", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install mmssl\[eeg\]"):
        CODEC.read_file(str(tmp_path / "rec_raw.fif"))


def test_pack_a_folder_of_recordings(tmp_path: Path) -> None:
    """`mmssl data pack modality=eeg`: class folders of .npz files at several rates and montages; bad
    files are counted by reason, good ones come back as batches."""
    from mmssl.data.loader import DataSource, iter_split
    from mmssl.data.pack import pack

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls in ("rest", "task"):
        (src / cls).mkdir(parents=True)
        for i in range(6):
            names = list(montage.STANDARD_1020_19 if i % 2 else montage.STANDARD_1010_32)
            rate = (128.0, 250.0)[i % 2]
            np.savez(src / cls / f"r{i}.npz", data=rng.normal(0, 20, (len(names), int(3 * rate))),
                     ch_names=np.array(names), sfreq=rate)
    np.savez(src / "rest" / "odd.npz", data=rng.normal(size=(2, 300)), ch_names=np.array(["Cz", "Ref9"]), sfreq=128)
    np.save(src / "task" / "bare.npy", rng.normal(size=(2, 300)))
    meta = pack("eeg", src, tmp_path / "out", num_shards=2, val=0.2, test=0.2)
    assert meta["classes"] == ["rest", "task"]
    assert meta["bad_samples"] == {"unknown_channel": 1, "no_channel_names": 1}
    assert sum(v["count"] for v in meta["splits"].values()) == 12
    src_ds = DataSource(tmp_path / "out", meta, ["eeg"])
    batches = list(iter_split(src_ds, "train", batch_size=4, max_len=2000))
    assert sum(len(b["label"]) for b in batches) == meta["splits"]["train"]["count"]
    for b in batches:
        rate = float(b["eeg_rate"][0])
        assert rate in (128.0, 250.0) and (b["eeg_len"] == round(2 * rate)).all()  # 2 s at the batch's rate


# -- codec batches -------------------------------------------------------------------------------------
def test_codec_round_trip_padding_masks_and_normalisation() -> None:
    a = _item(list(montage.STANDARD_1020_19), T=300)
    b = dict(_item(["Cz", "Pz", "Oz"], T=200, seed=1), ch_names=["Cz", "Pz", "Oz"])
    raw = CODEC.encode(b)
    back = CODEC.decode(dict(raw, __key__="k"))
    assert torch.equal(back["eeg"], torch.from_numpy(b["eeg"])) and back["eeg_rate"] == 128.0
    # names alone are enough in a shard: positions come from the table
    assert torch.allclose(CODEC.decode({k: v for k, v in raw.items() if k != "pos.npy"})["eeg_pos"], back["eeg_pos"],
                          atol=1e-6)
    with pytest.raises(BadSample, match="^missing_field"):
        CODEC.decode({"eeg.npy": raw["eeg.npy"]})

    batch = _batch(a, b)
    assert batch["eeg"].shape == (2, 19, 300) and batch["eeg_pos"].shape == (2, 19, 3)
    assert batch["eeg_chan_mask"].sum(1).tolist() == [19, 3] and batch["eeg_len"].tolist() == [300, 200]
    assert batch["eeg_rate"].tolist() == [128.0, 128.0]
    assert not batch["eeg"][1, 3:].any() and not batch["eeg"][1, :, 200:].any() and not batch["eeg_pos"][1, 3:].any()
    x = batch["eeg"][0]
    assert torch.allclose(x.median(1).values, torch.zeros(19), atol=1e-5)  # channel medians removed
    mad = 1.4826 * x.abs().median(1).values
    assert float(mad.median()) == pytest.approx(1.0, abs=1e-4)  # one robust scale for the recording
    # one scale, not one per channel: a channel 10x louder stays 10x louder
    loud = dict(a, eeg=a["eeg"] * np.r_[np.full(18, 1.0), 10.0][:, None].astype(np.float32))
    y = _batch(loud)["eeg"][0]
    assert float(y[18].std() / y[:18].std()) == pytest.approx(10.0, rel=0.15)
    spike = torch.zeros(2, 100)
    spike[0, 10] = 1e6
    spike[1] = torch.randn(100)
    assert float(normalise(spike).abs().max()) == CLIP


def test_collate_crops_in_milliseconds_and_mixes_rates() -> None:
    a, b = _item(["Cz", "Pz"], T=640), _item(["Cz"], T=320, rate=64.0)
    g = torch.Generator().manual_seed(0)
    items = [CODEC.decode(CODEC.encode(it)) for it in (a, b)]
    batch = CODEC.collate(items, 1000, g)  # 1 s at the batch's rate: the highest, 128 Hz
    assert batch["eeg_rate"].tolist() == [128.0, 128.0] and batch["eeg_len"].tolist() == [128, 128]
    assert CODEC.length(items[0]) == 2 * 5000 and CODEC.length(items[1]) == 5000
    # evaluation (no generator): the centred crop, deterministic
    c1, c2 = CODEC.collate(items, 1000, None), CODEC.collate(items, 1000, None)
    assert torch.equal(c1["eeg"], c2["eeg"])
    want = normalise(torch.from_numpy(a["eeg"][:, 256:384]))
    assert torch.allclose(c1["eeg"][0], want, atol=1e-6)


def test_signals_are_resampled_to_the_model_rate() -> None:
    rate, T = 256.0, 512  # 2 s of a 10 Hz sine on two channels
    t = np.arange(T) / rate
    sig = np.stack([np.sin(2 * np.pi * 10 * t), 0.5 * np.sin(2 * np.pi * 10 * t + 1)]).astype(np.float32)
    batch = _batch({"eeg": sig, "eeg_pos": montage.positions(["C3", "C4"]), "eeg_rate": rate})
    for model_rate, n in ((128, 256), (200, 400), (256, 512)):
        ad = EEGAdapter(32, {"sample_rate": model_rate, "patch": model_rate // 2})
        x, lens = ad.signal(batch)
        assert x.shape[-1] == n and lens.tolist() == [n]
        spec = torch.fft.rfft(x[0, 0]).abs()
        assert float(torch.fft.rfftfreq(n, 1 / model_rate)[spec.argmax()]) == pytest.approx(10.0, abs=0.6)
        tok = ad.tokenize(batch)
        assert tok.x.shape[1] == 2 * 4 and int(ad.num_tokens(batch)[0]) == 8  # 2 channels x 4 half-second patches


# -- tokens, positions, targets --------------------------------------------------------------------------
def test_tokens_index_padding_and_content_free_positions() -> None:
    ad = EEGAdapter(32, SMALL)
    batch = _batch(_item(["Cz", "C3", "C4"], T=256), _item(["Oz"], T=130, seed=2))  # 4 and 2 patches
    t = ad.tokenize(batch)
    assert t.x.shape == (2, 3 * 4, 32) and t.pos.shape == (2, 12, 32) and t.index.shape == (2, 12, 2)
    assert t.index[0, :5].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]  # channel-major
    want_pad = torch.ones(3, 4, dtype=torch.bool)
    want_pad[0, :2] = False  # the second recording: one channel, 130 samples -> 2 patches (tail dropped)
    assert not t.pad[0].any() and torch.equal(t.pad[1], want_pad.flatten())
    assert torch.equal(ad.num_tokens(batch), (~t.pad).sum(1))
    # positions: a function of coordinates and time only
    other = dict(batch, eeg=torch.randn_like(batch["eeg"]))
    t2 = ad.tokenize(other)
    assert torch.equal(t.pos, t2.pos) and not torch.allclose(t.x, t2.x)
    moved = ad.tokenize(dict(batch, eeg_pos=batch["eeg_pos"].roll(1, dims=1)))
    assert not torch.allclose(moved.pos[0], t.pos[0])
    assert not torch.allclose(t.pos[0, 0], t.pos[0, 1])  # time matters, the same electrode
    # reordering channels reorders tokens and nothing else
    perm = torch.tensor([2, 0, 1])
    re = ad.tokenize({**batch, "eeg": batch["eeg"][:, perm], "eeg_pos": batch["eeg_pos"][:, perm],
                      "eeg_chan_mask": batch["eeg_chan_mask"][:, perm]})
    tok_perm = (perm[:, None] * 4 + torch.arange(4)).flatten()
    assert torch.allclose(re.x[0], t.x[0, tok_perm], atol=1e-6) and torch.allclose(re.pos[0], t.pos[0, tok_perm], atol=1e-6)


def test_targets_are_patches_and_the_loss_is_masked_mse() -> None:
    ad = EEGAdapter(16, SMALL)
    batch = _batch(_item(["Cz", "Pz"], T=256))
    tg = ad.targets(batch)
    assert tg.shape == (1, 8, 64) and ad.target_dim == 64
    assert torch.equal(tg[0, 5], batch["eeg"][0, 1, 64:128])  # channel 1, patch 1
    normed = EEGAdapter(16, dict(SMALL, norm_target=True)).targets(batch)
    assert torch.allclose(normed.mean(-1), torch.zeros(1, 8), atol=1e-5)
    pred, target = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [3.0, 3.0]]]), torch.zeros(1, 3, 2)
    assert float(ad.recon_loss(pred, target, torch.tensor([[True, False, True]]))) == pytest.approx(5.0)


def test_spectrum_targets_are_log_band_powers_weighted_in_the_loss() -> None:
    t = np.arange(256) / 128
    sine = np.stack([np.sin(2 * np.pi * 10 * t), np.sin(2 * np.pi * 30 * t)]).astype(np.float32)
    batch = _batch({"eeg": sine, "eeg_pos": montage.positions(["C3", "C4"]), "eeg_rate": 128.0})
    spec = EEGAdapter(16, dict(SMALL, patch=128, target="spectrum", spectrum_bands=16))
    tg = spec.targets(batch)
    assert tg.shape == (1, 4, 16) and spec.target_dim == 16
    # 16 bands of 4 Hz from 0 to 64 Hz: 10 Hz in band 2, 30 Hz in band 7
    assert tg[0, :2].argmax(-1).tolist() == [2, 2] and tg[0, 2:].argmax(-1).tolist() == [7, 7]
    both = EEGAdapter(16, dict(SMALL, patch=128, target="both", spectrum_bands=16, spectrum_weight=0.5))
    tb = both.targets(batch)
    assert both.target_dim == 144 and torch.equal(tb[..., 128:], tg)
    assert torch.allclose(tb[0, 1, :128], batch["eeg"][0, 0, 128:256])
    # loss: MSE over the samples + weight * MSE over the bands, each a mean over its own width
    pred = torch.zeros(1, 1, 144)
    target = torch.cat([torch.full((1, 1, 128), 1.0), torch.full((1, 1, 16), 2.0)], -1)
    assert float(both.recon_loss(pred, target, torch.ones(1, 1, dtype=torch.bool))) == pytest.approx(1.0 + 0.5 * 4.0)
    with pytest.raises(ValueError, match="target must be"):
        EEGAdapter(16, {"target": "phase"})


# -- masking ---------------------------------------------------------------------------------------------
def _grid_tokens(C: list[int], Tp: int) -> Tokens:
    B, Cm = len(C), max(C)
    ch = torch.arange(Cm).repeat_interleave(Tp)
    pad = torch.stack([(ch >= c) for c in C])
    index = torch.stack([ch, torch.arange(Tp).repeat(Cm)], -1)[None].expand(B, -1, -1)
    N = Cm * Tp
    return Tokens(torch.zeros(B, N, 4), torch.zeros(B, N, 4), pad, index)


def test_mask_hides_whole_channels_and_patches_at_the_ratio() -> None:
    ad = EEGAdapter(16, SMALL)
    tok = _grid_tokens([64, 19, 32, 5], 4)
    g = torch.Generator().manual_seed(0)
    for ratio in (0.5, 0.6, 0.75):
        m = ad.make_mask(tok, ratio, g)
        L = (~tok.pad).sum(1)
        assert torch.equal(m.sum(1), L - (L.double() * (1 - ratio)).floor().long())  # MAE's count
        assert not (m & tok.pad).any()
        per = m.view(4, 64, 4)
        whole = per.all(-1)
        for b, c in enumerate([64, 19, 32, 5]):
            budget = math.floor(int(m[b].sum()) * 0.5)  # hidden tokens meant for whole channels
            assert int(whole[b, :c].sum()) >= max(1, budget // 4)  # at least that many whole channels
            partly = per[b, :c].any(-1) & ~whole[b, :c]
            assert partly.any()  # and single patches elsewhere
    a = ad.make_mask(tok, 0.6, torch.Generator().manual_seed(3))
    assert torch.equal(a, ad.make_mask(tok, 0.6, torch.Generator().manual_seed(3)))
    # without the channel share, whole channels are as rare as chance makes them
    big = _grid_tokens([64] * 8, 4)
    for frac, lo, hi in ((0.0, 0, 60), (0.5, 100, 512)):
        m = EEGAdapter(16, dict(SMALL, mask_channel_fraction=frac)).make_mask(big, 0.5, g)
        assert lo <= int(m.view(8, 64, 4).all(-1).sum()) <= hi


def _micro():
    torch.manual_seed(0)
    return build_encoder(encoder_config("eeg", "micro", _eeg_cfg(), objective="mae")).eval()


@pytest.mark.parametrize(("mode", "rate"), [("drop", 128.0), ("replace", 128.0), ("drop", 200.0)])
def test_hidden_patches_do_not_leak(mode: str, rate: float) -> None:
    """At the model's rate (128 Hz for micro) and at another one, which the adapter resamples patch by
    patch: a filter over the whole recording would carry hidden samples into visible patches."""
    enc = _micro()
    ad = enc.adapter
    T = int(2 * rate)  # two 1 s patches
    batch = _batch(_item(list(montage.STANDARD_1020_19), T=T, rate=rate),
                   _item(list(montage.STANDARD_1010_32), T=T, rate=rate, seed=3))
    tokens = ad.tokenize(batch)
    mask = ad.make_mask(tokens, 0.6, torch.Generator().manual_seed(0))
    P, Tp = T // 2, 2  # samples per patch at the batch's rate
    hidden = mask.view(2, 32, Tp, 1).expand(2, 32, Tp, P).reshape(2, 32, Tp * P)  # sample-level mask
    changed = dict(batch, eeg=torch.where(hidden, torch.randn_like(batch["eeg"]) * 5, batch["eeg"]))
    assert not torch.equal(changed["eeg"], batch["eeg"])
    with torch.no_grad():
        a, b = enc(batch, mask, mode), enc(changed, mask, mode)
    if mode == "drop":
        assert torch.equal(a.keep, b.keep)
    assert torch.allclose(a.last, b.last, atol=1e-5)
    visible = dict(batch, eeg=torch.where(hidden, batch["eeg"], torch.randn_like(batch["eeg"])))
    with torch.no_grad():  # and visible content does reach the output
        c = enc(visible, mask, mode)
    assert not torch.allclose(a.last, c.last, atol=1e-3)


# -- one encoder, any montage ----------------------------------------------------------------------------
def _mae_trained_on_training_montages(steps: int = 3):
    """A micro encoder after a few MAE steps on the embedded set's training montages (10-20 and 10-10
    positions only): what it embeds afterwards on 10-05 positions, it has never been trained on."""
    from mmssl.config import compose, to_dict
    from mmssl.factory import build_objective

    torch.manual_seed(0)
    cfg = compose(["modality=eeg", "objective=mae"])
    mc = to_dict(cfg.modality.eeg)
    enc = build_encoder(encoder_config("eeg", "micro", mc, objective="mae"))
    obj = build_objective("mae", to_dict(cfg.objective), {"eeg": enc}, {"eeg": mc})
    recs = list(synth.generate("train", n=8))
    assert not {n.lower() for r in recs for n in r.ch_names} & {n.lower() for n in synth.UNSEEN}
    batch = _batch(*({"eeg": r.data, "eeg_pos": montage.positions(r.ch_names), "eeg_rate": r.rate} for r in recs),
                   max_len=2000)
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    for _ in range(steps):
        loss = obj(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(before[k], v) for k, v in enc.state_dict().items())  # it did train
    return enc.eval()


def test_one_micro_encoder_embeds_19_32_64_channels_and_an_unseen_montage() -> None:
    enc = _mae_trained_on_training_montages()
    montages = {"1020-19": list(montage.STANDARD_1020_19), "1010-32": list(montage.STANDARD_1010_32),
                "1010-64": list(montage.STANDARD_1010_64), "unseen 10-05": list(synth.UNSEEN)}
    unseen = montage.positions(synth.UNSEEN)
    train = montage.positions(montage.names_of("1010"))
    assert np.degrees(np.arccos(np.clip(unseen @ train.T, -1, 1))).min() > 5  # none near a training position
    alone = {}
    with torch.no_grad():
        for i, (name, names) in enumerate(montages.items()):
            rng = np.random.default_rng(i)
            rec = {"eeg": synth.simulate(int(rng.integers(4)), names, rng), "eeg_pos": montage.positions(names),
                   "eeg_rate": 128.0}
            b = _batch(rec, max_len=2000)
            assert b["eeg"].shape == (1, len(names), 256)
            e = enc.embed(b)
            assert e.shape == (1, 256) and torch.isfinite(e).all()
            alone[name] = (rec, e)
        # batched together (channels padded to 64): every recording keeps the embedding it has alone
        together = enc.embed(_batch(*(r for r, _ in alone.values()), max_len=2000))
    for k, (_, e) in enumerate(alone.values()):
        assert torch.allclose(together[k], e[0], atol=1e-4)
    assert not torch.allclose(together[0], together[1], atol=1e-3)


# -- views and classical features ------------------------------------------------------------------------
def test_views_crop_drop_channels_scale_and_keep_labels() -> None:
    ad = EEGAdapter(16, SMALL)
    batch = _batch(*[_item(list(montage.STANDARD_1010_32), T=256, seed=s) for s in range(4)])
    batch["label"] = torch.arange(4)
    torch.manual_seed(0)
    views = ad.views(batch, 2, 3)
    assert len(views) == 5
    for i, v in enumerate(views):
        assert torch.equal(v["label"], batch["label"]) and v["eeg"].shape[:2] == (4, 32)
        lens = v["eeg_len"]
        lo, hi = (0.6, 1.0) if i < 2 else (0.25, 0.5)
        assert ((lens >= min(64, int(256 * lo))) & (lens <= int(256 * hi))).all()
        chans = v["eeg_chan_mask"].sum(1)
        assert (chans >= 1).all() and (chans < 32).any()  # channel dropout, never every channel
        assert not v["eeg"][~v["eeg_chan_mask"]].any() and not v["eeg_pos"][~v["eeg_chan_mask"]].any()
        assert torch.allclose(v["eeg_pos"][v["eeg_chan_mask"]].norm(dim=-1), torch.ones(int(chans.sum())), atol=1e-5)
        ad.tokenize(v)
    assert not torch.equal(views[0]["eeg"][0], views[1]["eeg"][0])
    with pytest.raises(ValueError, match="unknown eeg views keys"):
        EEGAdapter(16, {"views": {"crop": 0.5}})


def test_baseline_band_powers_are_montage_independent_and_lateralised() -> None:
    ad = EEGAdapter(16, {"sample_rate": 128, "patch": 64})
    t = np.arange(512) / 128
    rng = np.random.default_rng(0)

    def rec(names: list[str]) -> dict:
        pos = montage.positions(names)
        alpha = np.sin(2 * np.pi * 10 * t)[None] * np.where(pos[:, :1] < -0.1, 3.0, 1.0)  # stronger on the left
        return {"eeg": (alpha + 0.1 * rng.normal(size=(len(names), 512))).astype(np.float32), "eeg_pos": pos,
                "eeg_rate": 128.0}

    f = ad.baseline_features(_batch(rec(list(montage.STANDARD_1020_19)), rec(list(montage.STANDARD_1010_64))))
    assert f.shape == (2, 15) and torch.isfinite(f).all()
    for row in f:
        assert int(row[:5].argmax()) == 2  # alpha dominates the channel mean
        assert float(row[5 + 2]) > math.log(4.0)  # left minus right alpha log power: 9x stronger
        assert abs(float(row[5 + 0])) < 1.0  # no asymmetry to speak of in delta


def test_modality_config() -> None:
    from mmssl.config import compose

    cfg = compose(["modality=eeg"])
    assert cfg.modality.eeg.max_len == 2000 and compose(["modality=eeg", "model=base"]).modality.eeg.max_len == 4000
    micro = encoder_config("eeg", "micro", _eeg_cfg())
    assert (micro["adapter"]["sample_rate"], micro["adapter"]["patch"]) == (128, 128)
    base = EEGAdapter(768, encoder_config("eeg", "base", _eeg_cfg())["adapter"])
    assert (base.sample_rate, base.patch, base.window_ms) == (200.0, 200, 4000)
    pre = build_encoder(micro).adapter.preprocessing()
    assert pre["max_len"] == 2000 and pre["sample_rate"] == 128.0


def test_npz_with_odd_types_is_read_or_refused_clearly(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(0, 10, (3, 300)).astype(np.float32)
    # channel names stored as a bytes (S) array are names, not "b'Cz'"
    np.savez(tmp_path / "bytes.npz", data=data, ch_names=np.array([b"Cz", b"Pz", b"Oz"]), sfreq=250)
    assert CODEC.read_file(str(tmp_path / "bytes.npz"))["ch_names"] == ["Cz", "Pz", "Oz"]
    np.savez(tmp_path / "text.npz", data=data.astype(str), ch_names=np.array(["Cz", "Pz", "Oz"]), sfreq=250)
    with pytest.raises(BadSample, match="^wrong_dtype: text.npz"):
        CODEC.read_file(str(tmp_path / "text.npz"))
    np.savez(tmp_path / "cplx.npz", data=data + 1j, ch_names=np.array(["Cz", "Pz", "Oz"]), sfreq=250)
    with pytest.raises(BadSample, match="^wrong_dtype: cplx.npz"):
        CODEC.read_file(str(tmp_path / "cplx.npz"))
    np.savez(tmp_path / "rate.npz", data=data, ch_names=np.array(["Cz", "Pz", "Oz"]), sfreq="fast")
    with pytest.raises(BadSample, match="^bad_rate: rate.npz"):
        CODEC.read_file(str(tmp_path / "rate.npz"))
