"""`mmssl data pack modality=[a,text]`: (file, caption) pairs from a sidecar folder, a CSV or a JSONL
become shards; bad rows/files are skipped, counted and listed; all captions of a file stay in one split;
read back through the loader, both modalities decode and the captions round-trip."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmssl.data.loader import DataSource
from mmssl.data.pack_pairs import pack_pairs
from mmssl.data.shards import read_samples, split_paths
from mmssl.modalities.text.data import encode_text


def png(path: Path, seed: int, size: tuple[int, int] = (5, 4)) -> np.ndarray:
    """A tiny random RGB PNG; -> its pixels as uint8 [3, H, W]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hwc = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(hwc).save(path)
    return hwc.transpose(2, 0, 1)


def wav(path: Path, seed: int, n: int = 1600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype(np.float32), 16000)


def read_back(out: Path, meta: dict, modalities: list[str]) -> dict[str, list[tuple[str, dict]]]:
    """-> {split: [(path field, decoded item), ...]} through DataSource.decode, failing on any bad sample."""
    src = DataSource(out, meta, modalities)
    got: dict[str, list[tuple[str, dict]]] = {}
    for split in meta["splits"]:
        bad: Counter = Counter()
        got[split] = list(read_samples(split_paths(out, split), lambda raw: (raw["path"].decode(), src.decode(raw)),
                                       bad, on_error="raise"))
        assert not bad
        assert sorted(it["sample_id"] for _, it in got[split]) == list(range(meta["splits"][split]["count"]))
    return got


def test_folder_with_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    pixels, captions = {}, {}
    for i in range(10):
        pixels[f"im{i}.png"] = png(root / f"im{i}.png", i, (4 + i, 5))
        captions[f"im{i}.png"] = f"a picture number {i} of something red\n"
        (root / f"im{i}.txt").write_text(captions[f"im{i}.png"], encoding="utf-8")
    png(root / "nocap.png", 99)  # no caption -> missing_caption
    (root / "orphan.txt").write_text("a caption without an image", encoding="utf-8")  # -> missing_file
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # -> unreadable
    (root / "corrupt.txt").write_text("the caption of a broken image", encoding="utf-8")
    png(root / "blank.png", 98)
    (root / "blank.txt").write_text("  \n", encoding="utf-8")  # -> empty_text
    (root / "README.md").write_text("notes", encoding="utf-8")  # -> unsupported_type
    out = tmp_path / "packed"
    meta = pack_pairs(["image", "text"], root, out, num_shards=2, val=0.2, test=0.2)
    assert "modality" not in meta and meta["modalities"] == ["image", "text"]
    assert meta["name"] == "packed:pairs" and meta["classes"] == [] and "prompts" not in meta
    assert meta["bad_samples"] == {"missing_caption": 1, "missing_file": 1, "unreadable": 1, "empty_text": 1,
                                   "unsupported_type": 1}
    listed = " | ".join(meta["bad_files"])
    for name in ("nocap.png (missing_caption", "orphan.txt (missing_file", "corrupt.png (unreadable",
                 "blank.png (empty_text", "README.md (unsupported_type"):
        assert name in listed
    assert meta["pairs"] == meta["files"] == 10 and sum(v["count"] for v in meta["splits"].values()) == 10
    assert {s: v["count"] for s, v in meta["splits"].items()} == {"train": 6, "val": 2, "test": 2}
    seen = set()
    for items in read_back(out, meta, ["image", "text"]).values():
        for path, it in items:
            assert torch.equal(it["image"], torch.from_numpy(pixels[path]))
            assert torch.equal(it["text"], encode_text(captions[path]))
            assert "label" not in it
            seen.add(path)
    assert seen == set(pixels)
    with pytest.raises(FileExistsError):  # a non-empty out is refused
        pack_pairs(["image", "text"], root, out)


def test_labelled_folder_gives_classes_and_prompts(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for c in ("dog", "cat"):
        for i in range(4):
            png(root / c / f"{i}.png", i + (100 if c == "dog" else 0))
            (root / c / f"{i}.txt").write_text(f"a {c} sitting, photo {i}", encoding="utf-8")
    png(root / "bird" / "0.png", 5)  # a class folder whose only file has no caption: still a class
    png(root / "stray.png", 6)
    (root / "stray.txt").write_text("not in a class folder", encoding="utf-8")
    out = tmp_path / "packed"
    meta = pack_pairs(["text", "image"], root, out, num_shards=3, val=0.25, test=0.25)
    assert meta["modalities"] == ["text", "image"]
    assert meta["classes"] == ["bird", "cat", "dog"] and meta["prompts"] == ["a {}.", "a photo of a {}."]
    assert meta["bad_samples"] == {"missing_caption": 1, "unlabelled_file": 1}
    for items in read_back(out, meta, ["text", "image"]).values():
        for path, it in items:
            cls = path.split("/")[0]
            assert it["label"] == meta["classes"].index(cls)
            assert torch.equal(it["text"], encode_text(f"a {cls} sitting, photo {path.split('/')[1][0]}"))
    # each class is split in the same proportions: one of its four files in val and in test
    got = read_back(out, meta, ["text", "image"])
    for split in ("val", "test"):
        assert sorted(it["label"] for _, it in got[split]) == [1, 2]


def test_csv_several_captions_per_file_stay_in_one_split(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    lines = ["filepath,title,label"]
    want: dict[str, list[str]] = {}
    for i in range(12):
        png(root / "img" / f"{i:03d}.png", i)
        want[f"img/{i:03d}.png"] = [f"image {i} caption {k}, a {'cat' if i % 2 else 'dog'}" for k in range(1 + i % 3)]
        lines += [f"img/{i:03d}.png,\"{c}\",{'cat' if i % 2 else 'dog'}" for c in want[f"img/{i:03d}.png"]]
    absolute = root / "img" / "000.png"  # an absolute path names a file too
    lines.append(f"{absolute},\"the first image again\",dog")
    want[str(absolute)] = ["the first image again"]
    lines += ["img/missing.png,a caption for nothing,cat",  # missing_file
              "img/001.png,,cat",  # empty_text
              "img/001.png,   ,cat",  # empty_text
              "img/002.png,too,many,fields",  # malformed_row
              "img/003.png,\"bad\"quote,cat",  # malformed_row (strict CSV)
              ""]
    (root / "pairs.csv").write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "packed"
    meta = pack_pairs(["image", "text"], root / "pairs.csv", out, num_shards=4, val=0.2, test=0.3, seed=3)
    n = sum(len(v) for v in want.values())
    assert meta["bad_samples"] == {"missing_file": 1, "empty_text": 2, "malformed_row": 2}
    assert any(f.startswith("pairs.csv:") and "missing.png does not exist" in f for f in meta["bad_files"])
    assert meta["pairs"] == n and sum(v["count"] for v in meta["splits"].values()) == n
    assert meta["files"] == 12  # the absolute path and img/000.png are one file
    assert meta["classes"] == ["cat", "dog"] and meta["source"] == str((root / "pairs.csv").resolve())
    got = read_back(out, meta, ["image", "text"])
    split_of: dict[str, set[str]] = {}
    rows: dict[str, list[list[int]]] = {}
    for split, items in got.items():
        for path, it in items:
            key = str((root / path).resolve())
            split_of.setdefault(key, set()).add(split)
            rows.setdefault(path, []).append(it["text"].tolist())
            assert it["label"] == (0 if int(Path(path).stem) % 2 else 1)
    assert all(len(s) == 1 for s in split_of.values())  # no image in two splits
    assert len({next(iter(s)) for s in split_of.values()}) == 3  # and all three splits used
    assert {p: sorted(r) for p, r in rows.items()} == {p: sorted(encode_text(c).tolist() for c in cs)
                                                       for p, cs in want.items()}


def test_csv_columns_by_name_and_conflicting_labels(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i in range(4):
        png(root / f"{i}.png", i)
    rows = ["Img,Desc,Label", "0.png,zero,a", "1.png,one,b", "2.png,two,a", "3.png,three,b", "3.png,three again,a",
            "2.png,two unlabelled,"]
    (root / "x.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no file column"):
        pack_pairs(["image", "text"], root / "x.csv", tmp_path / "o1")
    meta = pack_pairs(["image", "text"], root / "x.csv", tmp_path / "o2", num_shards=1, val=0, test=0,
                      file_column="img", caption_column="DESC")
    assert meta["bad_samples"] == {"label_conflict": 1, "unlabelled": 1}
    assert meta["splits"]["train"]["count"] == 4 and set(meta["splits"]) == {"train"}


def test_jsonl_speech_with_bad_lines(tmp_path: Path) -> None:
    root = tmp_path / "clips"
    objs = []
    for i in range(6):
        wav(root / f"c{i}.wav", i, 1600 + 160 * i)
        objs.append({"audio": f"c{i}.wav", "text": f"someone says word {i}", "label": i % 2})
    lines = [json.dumps(o) for o in objs]
    lines[2:2] = ["{not json", "[1, 2]", json.dumps({"audio": "c0.wav", "text": "x y", "label": -1}),
                  json.dumps({"text": "no file key"}), json.dumps({"audio": "c1.wav"})]
    (root / "clips.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    (root / "short.wav").parent.mkdir(exist_ok=True)
    sf.write(root / "short.wav", np.zeros(10, dtype=np.float32), 16000)
    with open(root / "clips.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"audio": "short.wav", "text": "too short to use"}) + "\n")
    out = tmp_path / "packed"
    meta = pack_pairs(["text", "speech"], root / "clips.jsonl", out, num_shards=2, val=0, test=0.34)
    assert meta["modalities"] == ["text", "speech"] and meta["classes"] == ["0", "1"]
    assert meta["prompts"] == ["the sound of a {}."]
    assert meta["bad_samples"] == {"invalid_json": 2, "bad_label": 1, "missing_file": 1, "missing_text": 1,
                                   "too_short": 1}
    assert meta["bad_files"][0].startswith("clips.jsonl:3 (invalid_json")
    got = read_back(out, meta, ["text", "speech"])
    assert sorted(len(v) for v in got.values()) == [2, 4]
    for items in got.values():
        for path, it in items:
            i = int(path[1])
            assert it["speech"].shape == (1600 + 160 * i,) and it["label"] == i % 2
            ref, _ = sf.read(root / path, dtype="float32")
            assert torch.allclose(it["speech"], torch.from_numpy(ref), atol=1 / 32767)  # 16-bit FLAC
            assert torch.equal(it["text"], encode_text(f"someone says word {i}"))


def test_modalities_must_be_a_file_modality_and_text(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("file,caption\n", encoding="utf-8")
    for ms in (["image", "speech"], ["text", "text"], ["image"], ["image", "text", "speech"]):
        with pytest.raises(ValueError, match="exactly one of them 'text'"):
            pack_pairs(ms, tmp_path / "p.csv", tmp_path / "o")
    with pytest.raises(ValueError, match="every pair"):
        pack_pairs(["image", "text"], tmp_path / "p.csv", tmp_path / "o")
    assert not (tmp_path / "o").exists()
