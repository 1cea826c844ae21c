"""`mmssl data pack modality=text`: a .jsonl file and a class-folder tree of .txt/.jsonl files become
shards; bad lines and files are skipped, counted by reason and listed; read back through the loader."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from mmssl.modalities.text.data import encode_text

from mmssl.cli import main
from mmssl.data.loader import iter_split, resolve_source
from mmssl.data.pack import pack


def read_back(out: Path, cache_dir: Path) -> tuple[dict, dict[str, int | None], Counter]:
    """-> (meta, {text body ids as a tuple: label}, bad) over every split."""
    src = resolve_source({"name": "shards", "path": str(out)}, ["text"], None, cache_dir)
    seen: dict = {}
    bad: Counter = Counter()
    for split in src.meta["splits"]:
        for b in iter_split(src, split, 8, bad):
            for i in range(b["text"].shape[0]):
                key = tuple(b["text"][i, :int(b["text_len"][i])].tolist())
                assert key not in seen
                seen[key] = int(b["label"][i]) if "label" in b else None
    return src.meta, seen, bad


def ids(text: str) -> tuple:
    return tuple(encode_text(text).tolist())


def test_pack_jsonl_file_skips_and_reports_bad_lines(tmp_path: Path, cache_dir: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    good = [{"text": f"sentence number {i} about {'cats' if i % 3 else 'dogs'}.", "label": "cat" if i % 3 else "dog"}
            for i in range(30)]
    lines = [json.dumps(g).encode() for g in good]
    lines[3:3] = [b"{not json", json.dumps({"label": "cat"}).encode(), json.dumps({"text": 7, "label": "cat"}).encode(),
                  json.dumps({"text": "   ", "label": "dog"}).encode(), b'{"text": "caf\xe9", "label": "cat"}',
                  json.dumps({"text": "fine text", "label": True}).encode(), b"[1, 2]", b"", b"   "]
    src = tmp_path / "corpus.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "packed"
    assert main(["data", "pack", "modality=text", f"src={src}", f"out={out}", "shards=2", "val=0.2", "test=0.2"]) == 0
    assert "skipped 7 bad" in capsys.readouterr().out
    meta, seen, bad = read_back(out, cache_dir)
    assert meta["classes"] == ["cat", "dog"]
    assert meta["bad_samples"] == {"invalid_json": 2, "missing_text": 2, "empty_text": 1, "undecodable": 1,
                                   "bad_label": 1}
    assert len(meta["bad_files"]) == 7 and meta["bad_files"][0].startswith("corpus.jsonl:4 (invalid_json")
    assert not bad and sum(v["count"] for v in meta["splits"].values()) == 30
    assert seen == {ids(g["text"]): meta["classes"].index(g["label"]) for g in good}


def test_pack_class_tree_of_txt_and_jsonl(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "tree"
    texts: dict[str, str] = {}
    for c in ("news", "sport"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            texts[f"{c}/{i}.txt"] = f"{c} story {i}: something happened today."
            (root / c / f"{i}.txt").write_text(texts[f"{c}/{i}.txt"], encoding="utf-8")
    (root / "sport" / "more.jsonl").write_text("\n".join(json.dumps(o) for o in [
        {"text": "a match was won"}, {"text": "the team lost", "label": "sport"},
        {"text": "a conflicting line", "label": "news"}]) + "\n", encoding="utf-8")
    (root / "news" / "latin1.txt").write_bytes("na\u00efve caf\u00e9".encode("latin-1"))
    (root / "news" / "blank.txt").write_text("\n \n", encoding="utf-8")
    (root / "stray.txt").write_text("not in a class folder", encoding="utf-8")
    (root / "notes.csv").write_text("a,b\n", encoding="utf-8")
    out = tmp_path / "packed"
    meta = pack("text", root, out, num_shards=2, val=0.2, test=0.2)
    assert meta["classes"] == ["news", "sport"]
    assert meta["bad_samples"] == {"unsupported_type": 1, "undecodable": 1, "empty_text": 1, "label_conflict": 1,
                                   "unlabelled_file": 1}
    assert any(f.startswith("sport/more.jsonl:3 (label_conflict") for f in meta["bad_files"])
    _, seen, bad = read_back(out, cache_dir)
    want = {ids(t): meta["classes"].index(k.split("/")[0]) for k, t in texts.items()}
    want.update({ids("a match was won"): 1, ids("the team lost"): 1})
    assert not bad and seen == want
    with pytest.raises(FileExistsError):
        pack("text", root, out)


def test_pack_integer_labels_and_unlabelled_text(tmp_path: Path, cache_dir: Path) -> None:
    src = tmp_path / "ints.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"item {i} of class {i % 3}", "label": i % 3}) for i in range(12)),
                   encoding="utf-8")
    pack("text", src, tmp_path / "a", num_shards=1)
    meta, seen, _ = read_back(tmp_path / "a", cache_dir)
    assert meta["classes"] == ["0", "1", "2"]
    assert seen == {ids(f"item {i} of class {i % 3}"): i % 3 for i in range(12)}
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        (flat / f"{i}.txt").write_text(f"document {i}", encoding="utf-8")
    pack("text", flat, tmp_path / "b", num_shards=1)
    meta, seen, _ = read_back(tmp_path / "b", cache_dir)
    assert meta["classes"] == [] and set(seen.values()) == {None} and len(seen) == 5
    with pytest.raises(ValueError, match="not a .txt/.jsonl file"):
        pack("text", tmp_path / "a" / "meta.json", tmp_path / "c")
