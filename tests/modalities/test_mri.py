"""MRI adapter: any subset of contrasts, masking of whole contrasts, a loss blind to absent contrasts,
leak-free hidden tokens, NIfTI cases in and out, and synthesising a missing contrast end to end."""
from __future__ import annotations

import itertools
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mmssl.data.shards import BadSample
from mmssl.factory import build_encoder, build_objective, encoder_config
from mmssl.modalities.mri import synth
from mmssl.modalities.mri.adapter import MRIAdapter, patchify3d, sincos_3d, unpatchify3d
from mmssl.modalities.mri.data import (
    MRICodec,
    MRISynthPreset,
    from_grid,
    match_contrast,
    read_case,
    write_nifti,
)

CONTRASTS = ("t1", "t1ce", "t2", "flair")
TINY = {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64}


def _cfg() -> dict:
    return OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality/mri.yaml"))


def _encoder(**adapter: object) -> torch.nn.Module:
    cfg = _cfg()
    cfg["adapter"].update(adapter)
    return build_encoder(encoder_config("mri", "micro", cfg, model_overrides=TINY)).eval()


def _cases(n: int, split: str = "val") -> dict[str, torch.Tensor]:
    cs = list(synth.generate(split, n=n))
    return {"mri": torch.stack([torch.from_numpy(c.volumes) for c in cs]),
            "mri_present": torch.stack([torch.from_numpy(c.present) for c in cs]),
            "label": torch.tensor([c.label for c in cs])}


def _full_case() -> torch.Tensor:
    """One case's four contrasts (rendered whole, nothing missing): [4, 24, 24, 24]."""
    vol, _ = synth.render(2, np.random.default_rng(7))
    return torch.from_numpy(vol)


def test_every_subset_of_contrasts_embeds_with_tokens_only_for_present_ones() -> None:
    torch.manual_seed(0)
    enc = _encoder()
    G = 27  # micro: 24^3 volumes, 8^3 patches
    vol = _full_case()
    subsets = [s for r in range(1, 5) for s in itertools.combinations(range(4), r)]
    assert len(subsets) == 15
    present = torch.zeros(15, 4, dtype=torch.bool)
    for i, s in enumerate(subsets):
        present[i, list(s)] = True
    clean = vol[None].repeat(15, 1, 1, 1, 1) * present[:, :, None, None, None]
    junk = torch.where(present[:, :, None, None, None], clean, torch.randn_like(clean) * 5)  # absent slots: noise
    with torch.no_grad():
        t = enc.adapter.tokenize({"mri": junk, "mri_present": present})
        a = enc.embed({"mri": clean, "mri_present": present})
        b = enc.embed({"mri": junk, "mri_present": present})
    assert t.x.shape[1] == 4 * G  # the complete case sets the batch's length; the others pad
    for i, s in enumerate(subsets):
        real = ~t.pad[i]
        assert int(real.sum()) == len(s) * G
        assert set(t.index[i, real, 0].tolist()) == set(s)  # tokens only of present contrasts
        assert bool(real[: len(s) * G].all())  # real tokens first, padding after
    assert torch.isfinite(a).all() and a.shape == (15, 32)
    assert torch.allclose(a, b, atol=1e-5)  # what an absent slot holds never matters
    assert len({tuple(r.round(decimals=4).tolist()) for r in a}) == 15  # every subset reads differently
    with torch.no_grad():  # a case alone embeds as it does inside a padded batch
        for i in (0, 7, 14):
            alone = enc.embed({"mri": clean[i:i + 1], "mri_present": present[i:i + 1]})
            assert torch.allclose(alone, a[i:i + 1], atol=1e-5)
    assert enc.adapter.num_tokens({"mri": clean, "mri_present": present}).tolist() == [len(s) * G for s in subsets]
    with pytest.raises(ValueError, match="at least one present contrast"):
        enc.adapter.tokenize({"mri": clean[:1], "mri_present": torch.zeros(1, 4, dtype=torch.bool)})


def test_patch_order_targets_and_positions() -> None:
    ad = MRIAdapter(12, {"patch_size": 2, "volume_size": 4, "contrasts": list(CONTRASTS), "position": "sincos"})
    vol = torch.arange(4 * 64, dtype=torch.float32).view(1, 4, 4, 4, 4)  # value = m*64 + d*16 + h*4 + w
    t = ad.targets({"mri": vol})
    assert t.shape == (1, 4 * 8, 8) and ad.target_dim == 8
    # token 5 = contrast 0, grid (d, h, w) = (1, 0, 1): voxels d in {2,3}, h in {0,1}, w in {2,3}
    want = [d * 16 + h * 4 + w for d in (2, 3) for h in (0, 1) for w in (2, 3)]
    assert t[0, 5].tolist() == want
    assert t[0, 8 + 5].tolist() == [v + 64 for v in want]  # the same patch of contrast 1
    assert torch.equal(unpatchify3d(patchify3d(vol, 2)[0, 2], (2, 2, 2), 2), vol[0, 2])
    tok = ad.tokenize({"mri": vol})
    assert tok.index[0, 8 + 5].tolist() == [1, 1, 0, 1]
    # positions: content-free, spatial sin-cos plus the contrast's embedding
    tok2 = ad.tokenize({"mri": torch.randn(1, 4, 4, 4, 4)})
    assert torch.equal(tok.pos, tok2.pos) and not torch.equal(tok.x, tok2.x)
    spatial = sincos_3d(2, 2, 2, 12)
    assert torch.allclose(tok.pos[0, 8 + 5], spatial[5] + ad.contrast_embed[1].detach())
    # sincos_3d: 2 frequencies per axis (12 // 6), order w, h, d; hand value for grid point (d, h, w) = (1, 0, 1)
    om = [1.0, 1.0 / 100.0]
    hand = [np.sin(1 * o) for o in om] + [np.cos(1 * o) for o in om] + [0.0, 0.0, 1.0, 1.0] \
        + [np.sin(1 * o) for o in om] + [np.cos(1 * o) for o in om]
    assert torch.allclose(spatial[5], torch.tensor(hand, dtype=torch.float32), atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ad.tokenize({"mri": torch.zeros(1, 4, 4, 4, 5)})
    # learned positions: the stored grid as is, another grid resized trilinearly; still content-free
    lp = MRIAdapter(12, {"patch_size": 2, "volume_size": 4, "position": "learned"})
    same = lp.tokenize({"mri": torch.randn(1, 4, 4, 4, 4)})
    assert torch.allclose(same.pos[0, :8], lp.pos_embed[0].detach() + lp.contrast_embed[0].detach())
    big = lp.tokenize({"mri": torch.randn(1, 4, 8, 8, 8)})
    assert big.pos.shape == (1, 4 * 64, 12) and torch.equal(big.pos, lp.tokenize({"mri": torch.zeros(1, 4, 8, 8, 8)}).pos)


def test_make_mask_hides_whole_contrasts_and_counts_like_mae() -> None:
    ad = MRIAdapter(8, {"patch_size": 2, "volume_size": 8, "whole_contrast_p": 1.0})
    G = 64
    present = torch.rand(400, 4, generator=torch.Generator().manual_seed(0)) < 0.7
    present[:, 0] |= ~present.any(1)
    t = ad.tokenize({"mri": torch.zeros(400, 4, 8, 8, 8), "mri_present": present})
    for ratio in (0.75, 0.5):
        m = ad.make_mask(t, ratio, torch.Generator().manual_seed(1))
        L = (~t.pad).sum(1)
        assert torch.equal(m.sum(1), L - (L.double() * (1 - ratio)).floor().long())  # MAE's count
        assert not (m & t.pad).any()
        seen_whole = 0
        for i in range(400):
            c = t.index[i, :, 0]
            hidden_per = [int((m[i] & (c == k)).sum()) for k in range(4)]
            visible_per = [int((~m[i] & ~t.pad[i] & (c == k)).sum()) for k in range(4)]
            assert any(v > 0 for v in visible_per)  # something of the case stays visible
            whole = sum(1 for k in range(4) if present[i, k] and hidden_per[k] == G)
            seen_whole += whole > 0
            if int(present[i].sum()) >= 2 and ratio == 0.75:
                assert whole >= 1  # whole_contrast_p=1: a present contrast hidden whole when one can be
            assert whole < int(present[i].sum())  # never every present contrast
        assert seen_whole > 100
    a = ad.make_mask(t, 0.75, torch.Generator().manual_seed(2))
    assert torch.equal(a, ad.make_mask(t, 0.75, torch.Generator().manual_seed(2)))
    # whole_contrast_p=0: patches only, spread over every present contrast
    ad0 = MRIAdapter(8, {"patch_size": 2, "volume_size": 8, "whole_contrast_p": 0.0})
    full = ad0.tokenize({"mri": torch.zeros(50, 4, 8, 8, 8)})
    m0 = ad0.make_mask(full, 0.75, torch.Generator().manual_seed(3))
    per = torch.stack([(m0 & (full.index[..., 0] == k)).sum(1) for k in range(4)], 1)
    assert (per < G).all() and (per > 0).all()


def _objective(**adapter: object):
    torch.manual_seed(0)
    cfg = _cfg()
    cfg["adapter"].update(adapter)
    enc = build_encoder(encoder_config("mri", "micro", cfg, model_overrides=TINY, objective="mae"))
    ocfg = {"name": "mae", "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "decoder_mlp_ratio": 2}
    return build_objective("mae", ocfg, {"mri": enc}, {"mri": cfg})


def test_loss_never_counts_an_absent_contrast() -> None:
    obj = _objective()
    b = _cases(6)
    b["mri_present"][:, 2] = False  # t2 absent everywhere, and flair too in half the cases
    b["mri_present"][::2, 3] = False
    b["mri_present"][:, 0] = True
    absent = ~b["mri_present"][:, :, None, None, None]

    def loss_and_grad(fill: torch.Tensor) -> tuple[float, torch.Tensor]:
        vol = torch.where(absent, fill, b["mri"]).requires_grad_(True)
        torch.manual_seed(5)  # the same mask draw for both
        out = obj({"mri": vol, "mri_present": b["mri_present"]})
        out.loss.backward()
        return float(out.loss.detach()), vol.grad

    l0, g0 = loss_and_grad(torch.zeros_like(b["mri"]))
    l1, g1 = loss_and_grad(torch.randn_like(b["mri"]) * 10)
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert float(g0[absent.expand_as(g0)].abs().max()) == 0.0 and float(g1[absent.expand_as(g1)].abs().max()) == 0.0
    assert float(g0[~absent.expand_as(g0)].abs().max()) > 0  # present contrasts do train
    # and the targets of the adapter hold no token of an absent contrast
    t = obj.encoder.adapter.tokenize(b)
    assert not (b["mri_present"].gather(1, t.index[..., 0]) == False)[~t.pad].any()


@pytest.mark.parametrize("mode", ["drop", "replace"])
def test_hidden_tokens_do_not_leak(mode: str) -> None:
    torch.manual_seed(0)
    enc = _encoder()
    ad = enc.adapter
    b = _cases(4)
    b["mri_present"][1] = True  # one complete case
    b["mri"][1] = _full_case()
    tokens = ad.tokenize(b)
    mask = ad.make_mask(tokens, 0.75, torch.Generator().manual_seed(0))
    # change the content of every hidden 8^3 patch only (whole hidden contrasts included)
    B, M = b["mri"].shape[:2]
    grid_hidden = torch.zeros(B, M, 3, 3, 3, dtype=torch.bool)
    real = ~tokens.pad
    for i in range(B):
        for j in torch.nonzero(mask[i] & real[i]).flatten().tolist():
            c, d, h, w = tokens.index[i, j].tolist()
            grid_hidden[i, c, d, h, w] = True
    vox = grid_hidden.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
    other = torch.where(vox, torch.randn_like(b["mri"]), b["mri"])
    assert not torch.equal(other, b["mri"])
    with torch.no_grad():
        a = enc(b, mask, mode)
        c = enc(dict(b, mri=other), mask, mode)
    assert torch.allclose(a.last, c.last, atol=1e-6)
    with torch.no_grad():  # the visible content does reach the output
        d = enc(dict(b, mri=torch.where(vox, b["mri"], torch.randn_like(b["mri"]))), mask, mode)
    assert not torch.allclose(a.last, d.last, atol=1e-3)


def test_views_baseline_and_probe_variants() -> None:
    ad = MRIAdapter(8, {"patch_size": 4, "volume_size": 24})
    b = _cases(6)
    torch.manual_seed(0)
    vs = ad.views(b, 2, 1)
    assert [tuple(v["mri"].shape) for v in vs] == [(6, 4, 24, 24, 24)] * 2 + [(6, 4, 12, 12, 12)]
    for v in vs:
        assert torch.equal(v["mri_present"], b["mri_present"]) and torch.equal(v["label"], b["label"])
        assert (v["mri"][~b["mri_present"]] == 0).all()  # absent stays absent
        ad.tokenize(v)
    assert not torch.allclose(vs[0]["mri"], vs[1]["mri"])
    f = ad.baseline_features(b)
    assert f.shape == (6, 4 * 16 + 4)
    assert torch.equal(f[:, -4:], b["mri_present"].float())
    hist = f[:, :64].view(6, 4, 16)
    assert torch.allclose(hist.sum(-1), b["mri_present"].float(), atol=1e-5)  # fractions; absent: all 0
    variants = ad.probe_variants()
    assert list(variants) == ["all", *CONTRASTS]
    same, keep = variants["all"](b)
    assert same is b and keep.all()
    alone, keep = variants["flair"](b)
    assert torch.equal(keep, b["mri_present"][:, 3])
    kept = alone["mri_present"][keep]
    assert kept[:, 3].all() and not kept[:, :3].any()
    assert (alone["mri"][keep][:, :3] == 0).all() and torch.equal(alone["mri"][keep][:, 3], b["mri"][keep][:, 3])


def test_codec_round_trip_and_collate() -> None:
    codec = MRICodec()
    case = next(synth.generate("test", n=1))
    raw = codec.encode({"mri": case.volumes, "mri_present": case.present})
    assert sorted(raw) == sorted(f"{c}.npy" for c, p in zip(CONTRASTS, case.present) if p)
    item = codec.decode({"__key__": "k", **raw})
    assert torch.equal(item["mri_present"], torch.from_numpy(case.present))
    assert torch.allclose(item["mri"], torch.from_numpy(case.volumes), atol=2e-3)  # float16 storage
    assert codec.length(item) == int(case.present.sum())
    with pytest.raises(BadSample, match="unknown_contrast"):
        codec.decode({"__key__": "k", **raw, "pd.npy": raw[next(iter(raw))]})
    with pytest.raises(BadSample, match="missing_field"):
        codec.decode({"__key__": "k", "cls": b"1"})
    b = codec.collate([item, item], 24, None)
    assert b["mri"].shape == (2, 4, 24, 24, 24) and b["mri_present"].dtype == torch.bool
    small = codec.collate([item], 12, None)["mri"]  # another grid: resized to fit, no crop of the head
    assert small.shape == (1, 4, 12, 12, 12) and small.abs().sum() > 0
    odd = {"mri": torch.ones(4, 10, 20, 16), "mri_present": torch.ones(4, dtype=torch.bool)}
    cube = codec.collate([odd], 24, None)["mri"][0]
    assert cube.shape == (4, 24, 24, 24) and int((cube[0] != 0).sum()) == 12 * 24 * 19  # longest side fits


def test_nifti_names_read_case_and_round_trip(tmp_path: Path) -> None:
    assert match_contrast("BraTS2021_00012_t1ce.nii.gz", CONTRASTS) == "t1ce"
    assert match_contrast("BraTS-GLI-00000-000-t2f.nii.gz", CONTRASTS) == "flair"
    assert match_contrast("T1Gd.nii", CONTRASTS) == "t1ce" and match_contrast("FLAIR.NII.GZ", CONTRASTS) == "flair"
    assert match_contrast("case_seg.nii.gz", CONTRASTS) is None and match_contrast("t1.txt", CONTRASTS) is None
    # write_nifti -> nibabel: the same voxels and affine
    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    affine[:3, 3] = [-40, 10, 5]
    vol = np.random.default_rng(0).normal(size=(6, 7, 5)).astype(np.float32)
    img = nib.load(str(write_nifti(vol, tmp_path / "x.nii.gz", affine)))
    assert np.array_equal(np.asarray(img.dataobj), vol) and np.allclose(img.affine, affine)
    assert np.array_equal(np.asarray(nib.load(str(write_nifti(vol, tmp_path / "y.nii"))).dataobj), vol)
    # a case folder: BraTS-like names, one contrast missing, a segmentation ignored
    head = np.zeros((30, 26, 20), dtype=np.float32)
    zz, yy, xx = np.mgrid[:30, :26, :20]
    inside = ((zz - 15) / 12) ** 2 + ((yy - 13) / 10) ** 2 + ((xx - 10) / 8) ** 2 < 1
    case = tmp_path / "case1"
    rng = np.random.default_rng(1)
    truth = {}
    for name, scale in (("BraTS_01_t1", 300.0), ("BraTS_01_T1c", 500.0), ("BraTS_01_flair", 90.0)):
        v = np.where(inside, scale * (1 + 0.2 * rng.normal(size=head.shape)), 0).astype(np.float32)
        write_nifti(v, case / f"{name}.nii.gz", affine)
        truth[name] = v
    write_nifti(inside.astype(np.float32), case / "BraTS_01_seg.nii.gz", affine)
    item, geo = read_case(case, CONTRASTS, side=16, return_geometry=True)
    assert item["mri"].shape == (4, 16, 16, 16) and item["mri_present"].tolist() == [True, True, False, True]
    assert geo.ignored == ["BraTS_01_seg.nii.gz"]
    m = item["mri"][0] != 0
    for k in (0, 1, 3):
        vals = item["mri"][k][m]
        assert abs(vals.mean()) < 1e-4 and abs(vals.std() - 1) < 1e-3  # z-scored in the head
    assert (item["mri"][2] == 0).all()
    # physical aspect kept: the head is 30 x 0.9*26... the longest physical extent fills the grid
    assert max(geo.inner) == 16
    # back to native voxels: the head comes back where it was (z-scored values)
    back = from_grid(item["mri"][0], geo)
    assert back.shape == head.shape and ((back != 0) == inside).mean() > 0.97
    z = (truth["BraTS_01_t1"][inside] - truth["BraTS_01_t1"][inside].mean()) / truth["BraTS_01_t1"][inside].std()
    assert np.corrcoef(back[inside], z)[0, 1] > 0.2  # smoothed by two resizes, still the same volume
    native, g2 = read_case(case, CONTRASTS, side=None, return_geometry=True)
    assert native["mri"].shape[1:] == tuple(b - a for a, b in g2.bbox)
    # errors are bad samples with a reason
    bad = tmp_path / "bad"
    write_nifti(vol, bad / "t1.nii.gz", affine)
    write_nifti(vol[:5], bad / "t2.nii.gz", affine)
    with pytest.raises(BadSample, match="shape_mismatch"):
        read_case(bad)
    write_nifti(vol, tmp_path / "dup" / "t1c.nii.gz")
    write_nifti(vol, tmp_path / "dup" / "T1ce.nii")
    with pytest.raises(BadSample, match="ambiguous_contrast"):
        read_case(tmp_path / "dup")
    write_nifti(vol, tmp_path / "none" / "mask.nii.gz")
    with pytest.raises(BadSample, match="no_contrast"):
        read_case(tmp_path / "none")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "t1.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(BadSample, match="unreadable"):
        read_case(tmp_path / "broken")
    assert MRICodec.case_folders(tmp_path) == sorted([case, bad, tmp_path / "dup", tmp_path / "none",
                                                      tmp_path / "broken", tmp_path])


def test_reconstruct_a_missing_contrast_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    from mmssl.cli import main
    from mmssl.modalities.mri.reconstruct import reconstruct, reconstruct_command

    data = tmp_path / "data"
    MRISynthPreset().build(data, sizes={"train": 16, "val": 4, "test": 4})
    run = tmp_path / "run"
    assert main(["pretrain", "modality=mri", "objective=mae", "data=shards", f"data.path={data}", f"run_dir={run}",
                 "trainer.max_steps=2", "trainer.batch_size=2", "trainer.warmup_steps=1", "trainer.num_workers=0",
                 "trainer.progress=false", "trainer.tensorboard=false", "model.dim=32", "model.depth=1",
                 "model.heads=2", "model.ffn_dim=64", "objective.decoder_dim=16", "objective.decoder_depth=1",
                 "objective.decoder_heads=2"]) == 0
    # a case folder with t1, t2 and flair; t1ce is missing
    vol = _full_case().numpy()
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    case = tmp_path / "case"
    for k in (0, 2, 3):
        write_nifti(np.where(vol[k] != 0, vol[k] * 100 + 400, 0), case / f"{CONTRASTS[k].upper()}.nii.gz", affine)
    out = tmp_path / "out"
    r = reconstruct(run, case, out)
    assert r["synthesised"] == ["t1ce"] and r["present"] == ["t1", "t2", "flair"] and r["mse"] == {}
    img = nib.load(r["written"]["t1ce"])
    got = np.asarray(img.dataobj)
    assert got.shape == vol.shape[1:] and np.allclose(img.affine, affine) and np.isfinite(got).all()
    assert (got[vol[0] == 0] == 0).all() and np.abs(got[vol[0] != 0]).sum() > 0  # inside the head only
    # the synthesis reads the present contrasts: change one and the prediction changes
    write_nifti(np.where(vol[3] != 0, np.random.default_rng(0).normal(size=vol[3].shape) * 50 + 400, 0),
                case / "FLAIR.nii.gz", affine)
    r2 = reconstruct(run, case, tmp_path / "out2")
    assert not np.allclose(np.asarray(nib.load(r2["written"]["t1ce"]).dataobj), got)
    # a present contrast re-synthesised on request reports its error; the command-line form runs too
    assert reconstruct_command(["modality=mri", f"encoder={run}", f"src={case}", f"out={tmp_path / 'out3'}",
                                "contrasts=t2"]) == 0
    r3 = reconstruct(run, case, tmp_path / "out4", contrasts=["t2"])
    assert set(r3["mse"]) == {"t2"} and np.isfinite(r3["mse"]["t2"]) and (tmp_path / "out3" / "t2.nii.gz").exists()

    # the linear probe of an MRI encoder reads the modality's probe_pools unless eval.pools is given
    import mmssl.eval.linear_probe as lp

    seen: list[dict] = []
    real = lp.run_linear_probe
    try:
        lp.run_linear_probe = lambda enc, out, source, ecfg, *a: seen.append(ecfg)  # type: ignore[assignment]
        for extra in ([], ["eval.pools=[mean]"]):
            assert main(["eval", "linear-probe", f"encoder={run}", "data=shards", f"data.path={data}",
                         f"out={tmp_path / 'probe'}", *extra]) == 0
    finally:
        lp.run_linear_probe = real
    assert [e["pools"] for e in seen] == [["meanmax"], ["mean"]]


def test_infinite_voxels_are_a_bad_sample_and_nan_is_background(tmp_path: Path) -> None:
    vol = np.zeros((6, 6, 6), dtype=np.float32)
    vol[1:5, 1:5, 1:5] = np.arange(64, dtype=np.float32).reshape(4, 4, 4) + 1
    case = tmp_path / "case"
    nan = vol.copy()
    nan[0, 0, 0] = np.nan
    write_nifti(nan, case / "t1.nii.gz", np.eye(4))
    item = read_case(case, ("t1", "t1ce", "t2", "flair"), side=8)
    assert np.isfinite(item["mri"]).all() and item["mri_present"].tolist() == [True, False, False, False]
    bad = vol.copy()
    bad[2, 2, 2] = np.inf
    write_nifti(bad, case / "t1.nii.gz", np.eye(4))
    with pytest.raises(BadSample, match="^non_finite: t1.nii.gz"):
        read_case(case, ("t1", "t1ce", "t2", "flair"), side=8)
