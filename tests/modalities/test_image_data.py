"""The image codec (PIL reading of every mode, PNG/JPEG fields, square crops), packing an ImageFolder
tree with bad files, and the digits preset."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmssl.modalities.image.data import DigitsPreset, ImageCodec
from PIL import Image

from mmssl.cli import main
from mmssl.data.loader import iter_split, resolve_source
from mmssl.data.shards import BadSample

codec = ImageCodec()


def _save(path: Path, im: Image.Image, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _rgb(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, H, W] -> [H, W, 3] numpy, for comparing with PIL."""
    return np.asarray(t).transpose(1, 2, 0)


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------
def test_read_file_converts_every_mode_to_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    got = codec.read_file(str(_save(tmp_path / "a.png", Image.fromarray(rgb))))["image"]
    assert got.dtype == np.uint8 and got.shape == (3, 20, 30) and np.array_equal(_rgb(got), rgb)

    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    got = codec.read_file(str(_save(tmp_path / "g.png", Image.fromarray(grey))))["image"]
    assert np.array_equal(got, np.stack([grey] * 3))

    # transparency: composited over white, as PIL's alpha_composite does
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    white = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    ref = Image.alpha_composite(white, Image.fromarray(rgba, "RGBA"))
    got = codec.read_file(str(_save(tmp_path / "t.png", Image.fromarray(rgba, "RGBA"))))["image"]
    assert np.abs(_rgb(got).astype(int) - np.asarray(ref.convert("RGB")).astype(int)).max() <= 1
    assert np.array_equal(_rgb(got)[rgba[..., 3] == 255], rgba[..., :3][rgba[..., 3] == 255])

    # a palette image with a transparent entry: that entry becomes white
    pal = Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), "P")
    pal.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 250] + [0] * 759)
    got = codec.read_file(str(_save(tmp_path / "p.png", pal, transparency=1)))["image"]
    assert _rgb(got)[0, 0].tolist() == [10, 20, 30] and _rgb(got)[0, 1].tolist() == [255, 255, 255]
    assert _rgb(got)[1, 1].tolist() == [0, 0, 250]

    # 16-bit greyscale: 0..65535 scaled to 0..255 (PIL's own convert("RGB") would saturate)
    g16 = np.array([[0, 257, 32896], [65535, 1000, 51400]], dtype=np.uint16)
    got = codec.read_file(str(_save(tmp_path / "16.png", Image.fromarray(g16))))["image"]
    assert got[0].tolist() == np.round(g16 / 257).astype(int).tolist() and np.array_equal(got[0], got[2])

    # EXIF orientation 6 (rotate 90 degrees clockwise to display): height and width swap
    ex = Image.Exif()
    ex[0x0112] = 6
    got = codec.read_file(str(_save(tmp_path / "r.jpg", Image.fromarray(rgb), exif=ex.tobytes())))["image"]
    assert got.shape == (3, 30, 20)


def test_bad_files_are_bad_samples(tmp_path: Path) -> None:
    good = _save(tmp_path / "ok.png", Image.fromarray(np.full((40, 40, 3), 7, np.uint8)))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "junk.gif").write_bytes(b"GIF89a but not really")
    for name, reason in [("cut.png", "unreadable"), ("zero.jpg", "empty"), ("junk.gif", "unreadable")]:
        with pytest.raises(BadSample, match=rf"^{reason}: {name}: "):
            codec.read_file(str(tmp_path / name))
    with pytest.raises(BadSample, match="^missing_field: k7"):
        codec.decode({"__key__": "k7", "cls": b"0"})
    with pytest.raises(BadSample, match="^unreadable: k8"):
        codec.decode({"__key__": "k8", "png": b"\x89PNG\r\n\x1a\n truncated"})


def test_encode_decode_round_trip_keeps_jpeg_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    item = codec.read_file(str(_save(tmp_path / "a.png", Image.fromarray(rgb))))
    raw = codec.encode(item)
    assert list(raw) == ["png"] and np.array_equal(codec.decode(raw)["image"].numpy(), item["image"])

    jpg = _save(tmp_path / "b.jpg", Image.fromarray(rgb), quality=90)
    item = codec.read_file(str(jpg))
    raw = codec.encode(item)
    assert raw == {"jpg": jpg.read_bytes()}  # stored as read, not re-encoded
    dec = codec.decode(raw)["image"]
    assert dec.dtype == torch.uint8 and np.array_equal(dec.numpy(), item["image"])
    assert codec.length(item) == 12


# ----------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------
def test_collate_square_crops() -> None:
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 256, (3, 32, 60), dtype=torch.uint8, generator=g)
    tall = torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8, generator=g)
    square = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    items = [{"image": wide}, {"image": tall}, {"image": square}]

    ev = codec.collate(items, 32, None)["image"]
    assert ev.shape == (3, 3, 32, 32) and ev.dtype == torch.float32
    assert torch.equal(ev, codec.collate(items, 32, None)["image"])  # evaluation is deterministic
    assert torch.equal(ev[0], wide[:, :, 14:46].float() / 255)  # centre crop, no resize needed
    assert torch.equal(ev[2], square.float() / 255)  # already the right size: untouched
    # the tall one: shorter side 48 -> 32 (antialiased bilinear), height 64 -> 42.67 -> 42, centre 5:37
    ref = F.interpolate(tall[None].float(), size=(42, 32), mode="bilinear", antialias=True,
                        align_corners=False)
    ref = ref.round().clamp(0, 255)[0, :, 5:37] / 255
    assert (ev[1] - ref).abs().max() <= 1.5 / 255

    # training crops: windows of the resized image, different for different generators
    offsets = set()
    for seed in range(8):
        tr = codec.collate(items, 32, torch.Generator().manual_seed(seed))["image"]
        assert tr.shape == (3, 3, 32, 32) and 0 <= float(tr.min()) and float(tr.max()) <= 1
        hits = [o for o in range(29) if torch.equal(tr[0], wide[:, :, o:o + 32].float() / 255)]
        assert len(hits) == 1
        offsets.add(hits[0])
        assert torch.equal(tr, codec.collate(items, 32, torch.Generator().manual_seed(seed))["image"])
    assert len(offsets) >= 4

    # no max_len: the smallest side among the items
    assert codec.collate(items[1:], None, None)["image"].shape == (2, 3, 32, 32)
    assert codec.collate([{"image": tall}], None, None)["image"].shape == (1, 3, 48, 48)
    # upsampling a small image
    assert codec.collate([{"image": square}], 64, None)["image"].shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------------------------------
# Packing an ImageFolder tree
# ----------------------------------------------------------------------------------------------------
def _flat(size: tuple[int, int], value: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(value, np.uint8), (size[1], size[0], 3)).copy()


def _tree(root: Path) -> dict[tuple[int, int, int], str]:
    """3 classes x 6 images of one flat colour each (unique per image, so each read-back image names
    its file), in PNG, JPEG, greyscale, RGBA and palette forms and several sizes; plus bad files.
    -> the expected RGB of each good image -> its class."""
    expect: dict[tuple[int, int, int], str] = {}
    sizes = [(40, 40), (33, 50), (64, 36), (36, 36), (48, 40), (120, 90)]
    for c, cls in enumerate(["bird", "cat", "dog"]):
        for k in range(6):
            v = 30 + 36 * k
            col = tuple(v if j == c else 40 for j in range(3))  # type: ignore[misc]
            size = sizes[(k + c) % 6]
            if k == 0:  # greyscale: grey levels distinct from every colour above
                g = 5 + 20 * c
                _save(root / cls / f"i{k}.png", Image.fromarray(_flat(size, (g, g, g))[..., 0]))
                col = (g, g, g)
            elif k == 1:  # RGBA, opaque where it matters (a half-transparent one is checked separately)
                a = np.dstack([_flat(size, col), np.full(size[::-1], 255, np.uint8)])
                _save(root / cls / f"i{k}.png", Image.fromarray(a, "RGBA"))
            elif k == 2:
                _save(root / cls / f"i{k}.jpg", Image.fromarray(_flat(size, col)), quality=95)
            elif k == 3:
                _save(root / cls / f"i{k}.bmp", Image.fromarray(_flat(size, col)))
            elif k == 4:
                pal = Image.fromarray(_flat(size, col)).convert("P", palette=Image.Palette.ADAPTIVE)
                _save(root / cls / f"i{k}.png", pal)
            else:
                _save(root / cls / f"i{k}.webp", Image.fromarray(_flat(size, col)), lossless=True)
            expect[col] = cls
    png = (root / "bird" / "i1.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "dog" / "zero.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    return expect


def test_pack_image_folder(tmp_path: Path, cache_dir: Path) -> None:
    src = tmp_path / "tree"
    expect = _tree(src)
    out = tmp_path / "packed"
    assert main(["data", "pack", "modality=image", f"src={src}", f"out={out}", "shards=2", "val=0.2",
                 "test=0.2"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["bird", "cat", "dog"]
    assert meta["bad_samples"] == {"unreadable": 1, "empty": 1, "unsupported_type": 1}
    # stratified: per class 6 good images -> 4 train, 1 val, 1 test
    assert [meta["splits"][s]["count"] for s in ("train", "val", "test")] == [12, 3, 3]

    src_ = resolve_source({"name": "shards", "path": str(out)}, ["image"], None, cache_dir)
    seen: Counter = Counter()
    bad: Counter = Counter()
    for split in ("train", "val", "test"):
        for b in iter_split(src_, split, batch_size=4, bad=bad, max_len=32):
            assert b["image"].shape[1:] == (3, 32, 32) and b["image"].dtype == torch.float32
            for img, y in zip(b["image"], b["label"].tolist(), strict=True):
                col = tuple(round(float(v) * 255) for v in img.mean((1, 2)))
                assert float((img - img.mean((1, 2), keepdim=True)).abs().max()) < 3 / 255  # still flat

                def dist(e: tuple[int, ...], col: tuple[int, ...] = col) -> int:
                    return sum(abs(a - b) for a, b in zip(e, col, strict=True))

                near = min(expect, key=dist)
                assert dist(near) <= 6  # JPEG may shift a flat colour a little
                assert meta["classes"][y] == expect[near]
                seen[near] += 1
    assert not bad and set(seen) == set(expect) and set(seen.values()) == {1}


# ----------------------------------------------------------------------------------------------------
# The digits preset
# ----------------------------------------------------------------------------------------------------
def test_digits_preset(cache_dir: Path) -> None:
    from sklearn.datasets import load_digits

    from mmssl.config import compose, to_dict

    cfg = compose(["modality=image", "data=digits"])
    assert cfg.data.name == "digits"
    src = resolve_source(to_dict(cfg.data), ["image"], cfg.modality.image.preset, cache_dir)
    meta = src.meta
    assert [meta["splits"][s]["count"] for s in ("train", "val", "test")] == [1000, 197, 600]
    assert meta["classes"] == [str(i) for i in range(10)] and len(meta["splits"]["train"]["shards"]) >= 8

    d = load_digits()
    idx = DigitsPreset().splits(d.target, 0)
    assert sorted(np.concatenate(list(idx.values())).tolist()) == list(range(1797))  # a partition
    whole = np.bincount(d.target) / 1797
    for split, n in DigitsPreset.SPLITS.items():
        assert np.abs(np.bincount(d.target[idx[split]], minlength=10) - whole * n).max() <= 1  # stratified

    # read back through the pipeline: images are sklearn's, 0-16 scaled to 0-255 and upsampled to 32x32
    ref = F.interpolate(torch.from_numpy(d.images[idx["test"]] * (255 / 16)).float()[:, None], size=(32, 32),
                        mode="bilinear", antialias=True, align_corners=False)
    n = 0
    for b in iter_split(src, "test", batch_size=100):
        assert b["image"].shape[1:] == (3, 32, 32)
        assert torch.equal(b["image"][:, 0], b["image"][:, 2])  # grey in RGB
        sid = b["sample_id"]
        assert torch.equal(b["label"], torch.from_numpy(d.target[idx["test"][sid.numpy()]]))
        assert (b["image"][:, 0] * 255 - ref[sid, 0]).abs().max() <= 1.5
        n += len(sid)
    assert n == 600
