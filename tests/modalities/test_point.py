"""Point cloud adapter: Chamfer distance against hand values, sampling and grouping, normalisation,
leak-free masking, views, the D2 baseline, readers, codec and packing."""
from __future__ import annotations

import io
import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import mmssl.modalities.point  # noqa: F401  (registers the adapter and preset before the lead adds it)
from mmssl.data.shards import BadSample
from mmssl.factory import build_encoder, encoder_config
from mmssl.modalities.point.adapter import PointAdapter, farthest_point_sample, knn_groups, normalise
from mmssl.modalities.point.chamfer import chamfer_l2, masked_chamfer_l2
from mmssl.modalities.point.data import PointCodec, read_npy, read_off, read_ply
from mmssl.types import Tokens

SMALL = {"num_groups": 8, "group_size": 4, "pointnet": [8, 16, 16], "pos_hidden": 16}


def _point_cfg() -> dict:
    return OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality/point.yaml"))


def _tiny_encoder(**adapter: object) -> torch.nn.Module:
    cfg = _point_cfg()
    cfg["sizes"]["micro"]["adapter"].update(adapter)
    over = {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64}
    return build_encoder(encoder_config("point", "micro", cfg, over)).eval()


# -- Chamfer L2 (Point-MAE: mean_a min_b |a-b|^2 + mean_b min_a |a-b|^2) ----------------------------
def test_chamfer_hand_values() -> None:
    t = torch.tensor
    # A = {0, e1}, B = {0}: A->B (0 + 1) / 2, B->A 0
    assert float(chamfer_l2(t([[0.0, 0, 0], [1, 0, 0]]), t([[0.0, 0, 0]]))) == pytest.approx(0.5)
    # sets of different sizes: A = {0, 2e1}, B = {e2, 2e1, 3e1}
    a, b = t([[0.0, 0, 0], [2, 0, 0]]), t([[0.0, 1, 0], [2, 0, 0], [3, 0, 0]])
    # A->B: (|0-e2|^2 = 1, 0) -> 1/2; B->A: (1, 0, |3e1-2e1|^2 = 1) -> 2/3
    assert float(chamfer_l2(a, b)) == pytest.approx(0.5 + 2 / 3)
    assert float(chamfer_l2(b, a)) == pytest.approx(0.5 + 2 / 3)  # the sum of both directions is symmetric
    # squared distances, not distances: A = {0}, B = {(0, 0, 2)} -> 4 + 4
    assert float(chamfer_l2(t([[0.0, 0, 0]]), t([[0.0, 0, 2]]))) == pytest.approx(8.0)
    # order-free and zero on equal sets
    assert float(chamfer_l2(b, b.flip(0))) == 0.0


def test_chamfer_batched_and_masked_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4 * 3, generator=g), torch.randn(2, 3, 4 * 3, generator=g)
    mask = torch.tensor([[True, False, True], [False, False, True]])

    def ref(p: torch.Tensor, q: torch.Tensor) -> float:  # the formula as written, one point at a time
        P, Q = p.view(-1, 3).tolist(), q.view(-1, 3).tolist()
        d = [[sum((x - y) ** 2 for x, y in zip(u, v, strict=True)) for v in Q] for u in P]
        return sum(min(r) for r in d) / len(P) + sum(min(c) for c in zip(*d, strict=True)) / len(Q)

    want = np.mean([ref(pred[b, n], target[b, n]) for b, n in mask.nonzero().tolist()])
    assert float(masked_chamfer_l2(pred, target, mask)) == pytest.approx(want, rel=1e-5)
    assert torch.allclose(chamfer_l2(pred.view(2, 3, 4, 3), target.view(2, 3, 4, 3))[0, 1],
                          torch.tensor(ref(pred[0, 1], target[0, 1])), rtol=1e-5)
    # hidden groups only: changing an unmasked group's prediction changes nothing
    pred2 = pred.clone()
    pred2[0, 1] += 5.0
    assert float(masked_chamfer_l2(pred2, target, mask)) == float(masked_chamfer_l2(pred, target, mask))
    # nothing counted: zero, and still differentiable
    p = pred.clone().requires_grad_()
    zero = masked_chamfer_l2(p, target, torch.zeros(2, 3, dtype=torch.bool))
    zero.backward()
    assert float(zero.detach()) == 0.0 and p.grad is not None
    # MAE's head_on_hidden layout: the counted groups flattened to [1, M, k*3] with an all-True mask
    sel = masked_chamfer_l2(pred[mask][None], target[mask][None], torch.ones(1, 3, dtype=torch.bool))
    assert float(sel) == pytest.approx(want, rel=1e-5)


# -- sampling and grouping ------------------------------------------------------------------------
def test_farthest_point_sampling_hand_order_and_padding() -> None:
    # points on a line at 0, 1, 2, 10 (centroid 3.25): start at 10 (farthest from the centroid),
    # then 0, then 2 (min distance 2 to {0, 10}) before 1 (min distance 1)
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [10, 0, 0], [100, 0, 0], [-50, 0, 0]]])
    valid = torch.tensor([[True, True, True, True, False, False]])  # two far padding points
    x = normalise(xyz, valid)
    assert farthest_point_sample(x, valid, 4).tolist() == [[3, 0, 2, 1]]
    # fewer real points than centres: every real point once, then the cloud's first point again
    assert farthest_point_sample(x, valid, 6).tolist() == [[3, 0, 2, 1, 0, 0]]
    assert (x[0, 4:] == 0).all() and float(x[0, :4].norm(dim=-1).max()) == pytest.approx(1.0)


def test_knn_groups_never_take_padding() -> None:
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [3, 0, 0], [0.1, 0, 0], [0.2, 0, 0]]])
    valid = torch.tensor([[True, True, True, False, False]])  # the padding sits nearest the centre
    idx = knn_groups(xyz, valid, torch.zeros(1, 1, 3), 2)
    assert idx.tolist() == [[[0, 1]]]
    # more neighbours than real points: the nearest one repeats
    assert knn_groups(xyz, valid, torch.zeros(1, 1, 3), 5).tolist() == [[[0, 1, 2, 0, 0]]]


def _batch(B: int = 3, P: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"point": torch.randn(B, P, 3, generator=g), "point_len": torch.full((B,), P, dtype=torch.long)}


def test_tokens_shapes_padding_and_positions_from_centres() -> None:
    torch.manual_seed(0)
    ad = PointAdapter(32, SMALL)
    b = _batch()
    b["point_len"] = torch.tensor([64, 20, 5])  # the last cloud has fewer points than groups
    t = ad.tokenize(b)
    assert t.x.shape == (3, 8, 32) and t.pos.shape == (3, 8, 32) and t.index.shape == (3, 8, 1)
    assert t.pad.sum(1).tolist() == [0, 0, 3] and ad.num_tokens(b).tolist() == [8, 8, 5]
    assert t.index[0, :, 0].tolist() == list(range(8))
    centres, local, pad = ad.group(b)
    assert torch.equal(pad, t.pad) and local.shape == (3, 8, 4, 3)
    with torch.no_grad():
        assert torch.allclose(t.pos, ad.pos_embed(centres))
    # coords are what pos embeds (the centres MAE's locate head regresses)
    assert ad.coord_dim == 3 and torch.equal(t.coords, centres)
    # the nearest neighbour of each centre is itself: local coordinate 0
    assert (local[:, :, 0] == 0).all()
    # padding content never matters: garbage after point_len gives the same tokens
    b2 = dict(b, point=b["point"].clone())
    b2["point"][1, 20:] = 1e3
    t2 = ad.tokenize(b2)
    assert torch.allclose(t.x, t2.x, atol=1e-6) and torch.allclose(t.pos, t2.pos, atol=1e-6)


def test_normalisation_makes_tokens_invariant_to_position_and_size() -> None:
    torch.manual_seed(0)
    ad = PointAdapter(32, SMALL)
    b = _batch()
    moved = dict(b, point=b["point"] * 7.5 + torch.tensor([3.0, -2.0, 40.0]))
    a, c = ad.tokenize(b), ad.tokenize(moved)
    assert torch.allclose(a.x, c.x, atol=1e-4) and torch.allclose(a.pos, c.pos, atol=1e-4)
    assert torch.allclose(ad.targets(b), ad.targets(moved), atol=1e-5)
    # a batch without point_len reads every point
    assert torch.allclose(ad.tokenize({"point": b["point"]}).x, a.x)


def test_targets_and_recon_loss() -> None:
    ad = PointAdapter(32, SMALL)
    b = _batch()
    tgt = ad.targets(b)
    assert tgt.shape == (3, 8, 12) and ad.target_dim == 12
    mask = torch.ones(3, 8, dtype=torch.bool)
    assert float(ad.recon_loss(tgt, tgt, mask)) == 0.0
    # point order inside a group does not matter to Chamfer
    shuffled = tgt.view(3, 8, 4, 3).flip(2).reshape(3, 8, 12)
    assert float(ad.recon_loss(shuffled, tgt, mask)) == pytest.approx(0.0, abs=1e-12)
    # and it equals the masked mean of per-group Chamfer distances
    pred = tgt + 0.1
    per = chamfer_l2(pred.view(3, 8, 4, 3), tgt.view(3, 8, 4, 3))
    m = torch.rand(3, 8) < 0.5
    m[0, 0] = True
    assert float(ad.recon_loss(pred, tgt, m)) == pytest.approx(float(per[m].mean()), rel=1e-5)


def test_make_mask_ratio_padding_and_generator() -> None:
    ad = PointAdapter(32, SMALL)
    pad = torch.zeros(3, 64, dtype=torch.bool)
    pad[1, 40:] = True
    pad[2, 5:] = True
    t = Tokens(torch.zeros(3, 64, 4), torch.zeros(3, 64, 4), pad, torch.zeros(3, 64, 1, dtype=torch.long))
    m = ad.make_mask(t, 0.6, torch.Generator().manual_seed(0))
    assert not (m & pad).any()
    assert m.sum(1).tolist() == [64 - int(64 * 0.4), 40 - int(40 * 0.4), 5 - int(5 * 0.4)]
    assert torch.equal(m, ad.make_mask(t, 0.6, torch.Generator().manual_seed(0)))
    assert not torch.equal(m, ad.make_mask(t, 0.6, torch.Generator().manual_seed(1)))


# -- leak tests (as tests/modalities/test_image_adapter.py::test_hidden_patches_do_not_leak) ----------
@pytest.mark.parametrize("mode", ["drop", "replace"])
def test_hidden_groups_do_not_leak(mode: str) -> None:
    """Groups fixed (same centres): replacing the points of hidden groups changes no visible output."""
    torch.manual_seed(0)
    enc = _tiny_encoder(num_groups=16, group_size=8)
    ad = enc.adapter
    b = _batch(2, 128)
    centres, local, pad = ad.group(b)
    tokens = ad.embed_groups(centres, local, pad)
    mask = ad.make_mask(tokens, 0.6, torch.Generator().manual_seed(0))
    other = torch.where(mask[..., None, None], torch.randn_like(local) * 0.3, local)
    tokens2 = ad.embed_groups(centres, other, pad)
    vis = ~mask
    assert torch.equal(tokens.pos, tokens2.pos)  # positions are the centres only
    assert torch.allclose(tokens.x[vis], tokens2.x[vis]) and not torch.allclose(tokens.x[mask], tokens2.x[mask])
    with torch.no_grad():
        a, c = enc.encode(tokens, mask, mode), enc.encode(tokens2, mask, mode)
    if mode == "drop":
        assert torch.equal(a.keep, c.keep) and a.last.shape[1] == int(16 * 0.4)
    assert torch.allclose(a.last, c.last, atol=1e-6)
    # while the visible groups' points do reach the output
    visible_changed = torch.where(vis[..., None, None], torch.randn_like(local) * 0.3, local)
    with torch.no_grad():
        d = enc.encode(ad.embed_groups(centres, visible_changed, pad), mask, mode)
    assert not torch.allclose(a.last, d.last, atol=1e-3)


def test_hidden_clusters_do_not_leak_through_the_whole_pipeline() -> None:
    """From raw points: separated clusters, each exactly one group; the points of hidden clusters
    move inside their cluster (its tip, the centre, stays, and so does the cluster's mean: the
    normalisation's centroid is the whole cloud's, as in Point-MAE): visible outputs do not change."""
    torch.manual_seed(0)
    G, k = 8, 6
    enc = _tiny_encoder(num_groups=G, group_size=k)
    ad = enc.adapter
    corners = torch.tensor([[a, b, c] for a in (-1.0, 1.0) for b in (-1.0, 1.0) for c in (-1.0, 1.0)])
    corners = corners + 0.2 * torch.randn(G, 3, generator=torch.Generator().manual_seed(3))  # no ties
    tips = torch.nn.functional.normalize(corners, dim=-1) * 10
    # tips spread over a sphere of radius 10, each cluster's other points about 1 inward of its tip:
    # the tip is the point of its cluster farthest from every other tip, so farthest point sampling
    # picks it, and the cluster is its tip's k nearest points
    def cloud(gen: torch.Generator) -> torch.Tensor:
        inward = torch.rand(G, k - 1, 1, generator=gen) * 0.5 + 0.1
        lateral = torch.randn(G, k - 1, 3, generator=gen) * 0.01
        pts = tips[:, None] * (1 - inward / 10) + lateral
        pts = pts - pts.mean(1, keepdim=True) + tips[:, None] * 0.9  # the same mean in every draw, 1 inward
        return torch.cat([tips[:, None], pts], 1).reshape(1, G * k, 3)

    x1 = cloud(torch.Generator().manual_seed(0))
    b1 = {"point": x1, "point_len": torch.tensor([G * k])}
    tokens = ad.tokenize(b1)
    mask = ad.make_mask(tokens, 0.5, torch.Generator().manual_seed(0))
    # tokens run in farthest-point order: token g is the cluster of its centre's point
    valid = torch.ones(1, G * k, dtype=torch.bool)
    cluster = farthest_point_sample(normalise(x1, valid), valid, G)[0] // k
    assert sorted(cluster.tolist()) == list(range(G))
    hidden_cluster = torch.zeros(G, dtype=torch.bool)
    hidden_cluster[cluster[mask[0]]] = True
    hidden_pts = hidden_cluster.repeat_interleave(k)[None, :, None]
    x2 = torch.where(hidden_pts, cloud(torch.Generator().manual_seed(1)), x1)
    b2 = {"point": x2, "point_len": b1["point_len"]}
    # precondition: the same centres, and groups that are the clusters
    c1, l1, _ = ad.group(b1)
    c2, l2, _ = ad.group(b2)
    assert torch.allclose(c1, c2, atol=1e-6)
    assert torch.allclose(l1[~mask], l2[~mask], atol=1e-6) and not torch.allclose(l1[mask], l2[mask])
    with torch.no_grad():
        a, c = enc(b1, mask, "drop"), enc(b2, mask, "drop")
    assert torch.allclose(a.last, c.last, atol=1e-5)


# -- views and baseline ---------------------------------------------------------------------------
def test_views_counts_lengths_and_rotation() -> None:
    ad = PointAdapter(32, dict(SMALL, views={"local_scale": [0.25, 0.25]}))
    b = _batch(4, 100)
    b["point_len"] = torch.tensor([100, 60, 30, 1])
    b["label"] = torch.arange(4)
    torch.manual_seed(0)
    views = ad.views(b, 2, 3)
    assert len(views) == 5
    for i, v in enumerate(views):
        assert torch.equal(v["label"], b["label"]) and v["point"].shape[0] == 4
        lens = v["point_len"]
        assert (lens >= 1).all() and (lens <= b["point_len"]).all()
        if i >= 2:  # local crops: at most a quarter of the points (rounded up)
            assert (lens <= (b["point_len"] * 0.25).ceil()).all()
        P = v["point"].shape[1]
        assert P == int(lens.max()) and (v["point"][torch.arange(P)[None] >= lens[:, None]] == 0).all()
        ad.tokenize(v)  # views are valid batches
    # rotation alone keeps every point's distance to the centroid; "up" keeps the up coordinate
    for kind in ("so3", "up"):
        rot = PointAdapter(32, dict(SMALL, views={"rotation": kind, "scale": [1, 1], "jitter_sigma": 0.0,
                                                  "dropout_max": 0.0}))
        v = rot.views(b, 1, 0)[0]
        base = normalise(b["point"], rot.valid_points(b))
        assert torch.equal(v["point_len"], b["point_len"])
        assert torch.allclose(v["point"].norm(dim=-1), base.norm(dim=-1), atol=1e-5)
        assert not torch.allclose(v["point"], base, atol=1e-3)
        if kind == "up":
            assert torch.allclose(v["point"][..., 2], base[..., 2], atol=1e-6)
    with pytest.raises(ValueError, match="unknown point views keys"):
        PointAdapter(32, {"views": {"flip": 0.5}})


def test_baseline_d2_histogram_and_extents() -> None:
    ad = PointAdapter(32, SMALL)
    # two points: after normalisation they are 2 apart (the last bin); extents (1, 0, 0)
    two = {"point": torch.tensor([[[1.0, 5, 5], [3, 5, 5]]]), "point_len": torch.tensor([2])}
    f = ad.baseline_features(two)
    assert f.shape == (1, 32 + 3)
    assert float(f[0, 31]) == pytest.approx(1.0) and float(f[0, :31].sum()) == 0.0
    assert torch.allclose(f[0, 32:], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    # invariant to rotation, scale and position; padding ignored
    b = _batch(2, 200)
    b["point_len"] = torch.tensor([200, 150])
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    moved = dict(b, point=(b["point"] @ q.T) * 3 + 1)
    moved["point"][1, 150:] = 77.0
    fa, fb = ad.baseline_features(b), ad.baseline_features(moved)
    assert torch.allclose(fa.sum(1), torch.full((2,), 1.0) + fa[:, 32:].sum(1))
    assert torch.allclose(fa, fb, atol=1e-4)


# -- readers, codec, packing ----------------------------------------------------------------------
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=a.dtype == object)
    return buf.getvalue()


def _ply(xyz: np.ndarray, fmt: str) -> bytes:
    head = (f"ply\nformat {fmt} 1.0\ncomment made by a test\nelement vertex {len(xyz)}\nproperty float x\n"
            f"property float y\nproperty float z\nproperty uchar red\nelement face 1\n"
            f"property list uchar int vertex_indices\nend_header\n").encode()
    if fmt == "ascii":
        body = "".join(f"{x} {y} {z} 200\n" for x, y, z in xyz) + "3 0 1 2\n"
        return head + body.encode()
    e = "<" if fmt == "binary_little_endian" else ">"
    v = np.zeros(len(xyz), dtype=[("x", e + "f4"), ("y", e + "f4"), ("z", e + "f4"), ("r", "u1")])
    v["x"], v["y"], v["z"], v["r"] = xyz[:, 0], xyz[:, 1], xyz[:, 2], 200
    return head + v.tobytes() + np.array([3], "u1").tobytes() + np.array([0, 1, 2], e + "i4").tobytes()


def test_readers() -> None:
    xyz = np.array([[0.5, 1.0, -2.0], [3.0, 4.0, 5.0], [6.0, 7.25, 8.0]], dtype=np.float32)
    extra = np.concatenate([xyz, np.ones((3, 3))], 1)  # normals or colours after xyz: ignored
    assert np.array_equal(read_npy(_npy(extra), "a.npy"), xyz)
    rec = np.zeros(3, dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), ("i", "f4")])
    rec["x"], rec["y"], rec["z"] = xyz.T
    assert np.array_equal(read_npy(_npy(rec), "r.npy"), xyz)
    for fmt in ("ascii", "binary_little_endian", "binary_big_endian"):
        got = read_ply(_ply(xyz, fmt), "a.ply")
        assert got.dtype == np.float32 and np.array_equal(got, xyz), fmt
    # OFF without faces: the vertices; ModelNet's header glued to the counts is accepted
    off = b"OFF\n# a comment\n3 0 0\n0.5 1 -2\n3 4 5\n6 7.25 8\n"
    assert np.array_equal(read_off(off, "a.off"), xyz)
    assert np.array_equal(read_off(b"OFF3 0 0\n0.5 1 -2\n3 4 5\n6 7.25 8\n", "m.off"), xyz)


def test_off_faces_are_sampled_by_area_deterministically() -> None:
    # two triangles in the z = 0 plane, areas 0.5 and 4.5: a quad (fan-triangulated) and a triangle
    off = (b"OFF\n7 2 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n10 0 0\n13 0 0\n10 3 0\n"
           b"4 0 1 2 3\n3 4 5 6\n")
    a, b = read_off(off, "a.off", mesh_points=4000), read_off(off, "a.off", mesh_points=4000)
    assert a.shape == (4000, 3) and np.array_equal(a, b)  # a fixed seed: the same points each time
    assert (a[:, 2] == 0).all()
    in_quad = (a[:, 0] <= 1) & (a[:, 1] <= 1) & (a[:, 0] >= 0) & (a[:, 1] >= 0)
    in_tri = (a[:, 0] >= 10) & (a[:, 1] >= 0) & (a[:, 0] - 10 + a[:, 1] <= 3 + 1e-5)
    assert (in_quad | in_tri).all()
    assert abs(in_quad.mean() - 1.0 / 5.5) < 0.03  # area 1 of 5.5
    # degenerate faces only: the vertices are the cloud
    flat = b"OFF\n3 1 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n"
    assert read_off(flat, "f.off").shape == (3, 3)


@pytest.mark.parametrize("name,data,reason", [
    ("garbage.ply", b"not a ply file", "unreadable"),
    ("trunc.ply", b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\n"
                  b"property float y\nproperty float z\nend_header\n\x00\x00", "unreadable"),
    ("noxyz.ply", b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n1\n", "wrong_shape"),
    ("garbage.npy", b"\x93NUMPY garbage", "unreadable"),
    ("zero.npy", b"", "empty"),
    ("none.npy", _npy(np.zeros((0, 3), np.float32)), "empty"),
    ("flat.npy", _npy(np.zeros((5, 2), np.float32)), "wrong_shape"),
    ("cube.npy", _npy(np.zeros((5, 3, 2), np.float32)), "wrong_shape"),
    ("objects.npy", _npy(np.array([None, 1], dtype=object)), "unreadable"),
    ("nan.npy", _npy(np.array([[0, 0, np.nan], [1, 1, 1]], np.float32)), "non_finite"),
    ("inf.off", b"OFF\n1 0 0\n0 inf 0\n", "non_finite"),
    ("short.off", b"OFF\n3 0 0\n0 0 0\n", "unreadable"),
    ("badface.off", b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "unreadable"),
    ("empty.off", b"OFF\n0 0 0\n", "empty"),
    ("header.off", b"COFFEE\n", "unreadable"),
])
def test_bad_files_get_clear_reasons(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(BadSample, match=rf"^{reason}: {name}: "):
        PointCodec().read_file(str(p))


def test_codec_roundtrip_collate_and_subsets() -> None:
    codec = PointCodec()
    g = np.random.default_rng(0)
    items = [{"point": g.normal(size=(n, 3)).astype(np.float32)} for n in (50, 20, 80)]
    raw = [dict(codec.encode(it), __key__="k") for it in items]
    assert set(raw[0]) == {"point.npy", "__key__"}
    dec = [codec.decode(r) for r in raw]
    assert all(torch.equal(d["point"], torch.from_numpy(it["point"])) for d, it in zip(dec, items, strict=True))
    assert [codec.length(d) for d in dec] == [50, 20, 80]
    with pytest.raises(BadSample, match="^missing_field"):
        codec.decode({"__key__": "k"})
    whole = codec.collate(dec, None, None)
    assert whole["point"].shape == (3, 80, 3) and whole["point_len"].tolist() == [50, 20, 80]
    assert torch.equal(whole["point"][1, :20], dec[1]["point"]) and (whole["point"][1, 20:] == 0).all()
    # max_len: fixed subsets without a generator (the same every call), random ones with it
    ev1, ev2 = codec.collate(dec, 32, None), codec.collate(dec, 32, None)
    assert ev1["point_len"].tolist() == [32, 20, 32] and torch.equal(ev1["point"], ev2["point"])
    tr1 = codec.collate(dec, 32, torch.Generator().manual_seed(0))
    tr2 = codec.collate(dec, 32, torch.Generator().manual_seed(1))
    assert not torch.equal(tr1["point"], tr2["point"])
    for b in (ev1, tr1):  # each subset holds distinct points of its cloud
        sub = b["point"][2, :32]
        assert ((sub[:, None] - dec[2]["point"][None]).abs().sum(-1).min(1).values == 0).all()
        assert len({tuple(p) for p in sub.tolist()}) == 32


def test_pack_a_folder_of_point_files(tmp_path: Path) -> None:
    from mmssl.data.pack import pack

    g = np.random.default_rng(0)
    src = tmp_path / "src"
    for cls in ("chair", "table"):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            (src / cls / f"{i}.npy").write_bytes(_npy(g.normal(size=(30, 3)).astype(np.float32)))
    (src / "chair" / "a.ply").write_bytes(_ply(g.normal(size=(12, 3)).astype(np.float32), "binary_little_endian"))
    (src / "table" / "b.off").write_bytes(b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    (src / "table" / "nan.npy").write_bytes(_npy(np.full((4, 3), np.nan, np.float32)))
    meta = pack("point", src, tmp_path / "out", num_shards=2, val=0.2, test=0.2)
    assert meta["classes"] == ["chair", "table"] and meta["bad_samples"] == {"non_finite": 1}
    assert sum(s["count"] for s in meta["splits"].values()) == 10


def test_modality_config_and_end_to_end_mae_step() -> None:
    from mmssl.config import compose, to_dict
    from mmssl.factory import build_objective

    cfg = compose(["modality=point", "objective=mae"])
    micro = cfg.modality.point.sizes.micro.adapter.num_points
    assert cfg.modality.point.max_len == micro < 1024  # the micro size samples fewer points
    assert compose(["modality=point", "model=base"]).modality.point.max_len == 1024  # Point-MAE's
    assert compose(["modality=point", "modality.point.sizes.micro.adapter.num_points=300"]).modality.point.max_len == 300
    mc = to_dict(cfg.modality.point)
    enc = build_encoder(encoder_config("point", "micro", mc, {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64},
                                       "mae"))
    assert enc.config["preprocessing"]["max_len"] == micro
    obj = build_objective("mae", dict(to_dict(cfg.objective), decoder_dim=16, decoder_depth=1, decoder_heads=2),
                          {"point": enc}, {"point": mc})
    assert obj.mask_ratio == 0.6 and obj.locate_weight == 0.1  # PCP-MAE's centre prediction, on by default
    b = _batch(2, 256)
    b["point_len"] = torch.tensor([256, 100])
    out = obj(b)
    out.loss.backward()
    loss = float(out.loss.detach())
    assert math.isfinite(loss) and loss > 0
    assert enc.adapter.group_embed.first[0].weight.grad.abs().sum() > 0
    assert enc.adapter.pos_embed[0].weight.grad.abs().sum() > 0
    assert float(out.metrics["mask_fraction"]) == pytest.approx(1 - int(32 * 0.4) / 32, abs=0.05)
    assert loss == pytest.approx(float(out.metrics["recon_loss"]) + 0.1 * float(out.metrics["locate_loss"]), rel=1e-5)
    assert obj.locate_head.weight.grad.abs().sum() > 0


def test_ply_with_a_bad_element_count_is_a_bad_sample() -> None:
    with pytest.raises(BadSample, match="^unreadable: b.ply: bad PLY element count"):
        read_ply(b"ply\nformat ascii 1.0\nelement vertex x3\nproperty float x\nend_header\n1\n", "b.ply")
