"""``mmssl data pack modality=[image,text]``: (file, caption) pairs -> shards for contrastive
pretraining (CLIP/CLAP). One modality is ``text`` (the caption), the other any registered file
modality (image, speech, ...). Sources:

- a folder: every file of the other modality (recursively) with a caption sidecar of the same stem,
  ``cat/x.png`` + ``cat/x.txt`` (UTF-8, the whole file is one caption). As in ImageFolder, a first-level
  sub-folder names the file's class; a flat folder is unlabelled.
- a ``.csv`` (header row required) or ``.jsonl`` (one object per line): one pair per row, columns/keys
  ``file`` and ``caption`` (or the alternatives in ``FILE_KEYS``/``CAPTION_KEYS``, or ``file_column`` /
  ``caption_column``), an optional ``label``. Paths are relative to the CSV/JSONL file's folder
  (absolute ones are allowed).

A file may be named by several rows with different captions (COCO has five per image): each row is one
pair, i.e. one sample, and the file is stored once per row. Splits are drawn over files, not rows
(stratified by class), so every row of a file lands in the same split and no image of the test split
was seen in training. Within a split the rows of a file are consecutive, so the round-robin shard
writer spreads them over consecutive shards: a batch drawn from one shard rarely holds the same file
twice (in-batch duplicates are false negatives for a contrastive loss); the ``path`` field identifies
them where that matters.

Policies are those of ``mmssl.data.pack``: bad rows and files are skipped, counted by reason in
``bad_samples`` and listed (the first ``MAX_LISTED``) in ``bad_files``; a non-empty ``out`` is refused;
the data set appears atomically. Files are read twice, once to check them before splitting and once
to write them, so memory stays bounded by the captions, not by the images."""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmssl.data.pack import MAX_LISTED, _class_index, stratified_split
from mmssl.data.shards import BadSample, build_atomically, write_split
from mmssl.modalities.text.data import TOKENIZER_NAME, check_text
from mmssl.registry import MODALITIES

TEXT = "text"
#: CSV columns / JSONL keys naming the file, tried in order (case-insensitive for CSV); the other
#: modality's own name ("image", "speech") is tried before the generic ones
FILE_KEYS = ("file", "filepath", "file_path", "file_name", "filename", "image", "audio", "path")
CAPTION_KEYS = ("caption", "text", "title")
LABEL_KEY = "label"
#: zero-shot prompt templates written to meta.json of a labelled set ("{}" = the class name)
PROMPTS: dict[str, list[str]] = {"image": ["a {}.", "a photo of a {}."], "speech": ["the sound of a {}."]}
DEFAULT_PROMPTS = ["a {}."]


@dataclass
class Pair:
    """One usable row: where its file is, how the sample names it, its caption and label."""

    name: str  # where the row came from, for messages: "cat/x.png" or "pairs.csv:7"
    file: Path  # the file, resolved (also the group key of the file split)
    path: str  # stored in the sample's ``path`` field: relative to the source's folder where given so
    caption: str
    label: str | int | None


class _Report:
    """Bad rows counted by reason (the message's first word), the first MAX_LISTED listed by name."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.listed: list[str] = []

    def reject(self, name: str, why: str | BadSample) -> None:
        why = str(why)
        self.counts[why.split(":")[0]] += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(f"{name} ({why})")

    def files(self) -> list[str]:
        n = sum(self.counts.values())
        return self.listed + ([f"... and {n - len(self.listed)} more (counted in bad_samples)"]
                              if len(self.listed) < n else [])


def _other_modality(modalities: list[str]) -> str:
    ms = list(modalities)
    if len(ms) != 2 or ms.count(TEXT) != 1:
        raise ValueError(f"pairs need two modalities, exactly one of them {TEXT!r} (the caption), not {ms}")
    other = ms[1 - ms.index(TEXT)]
    codec = MODALITIES.get(other).codec
    suffixes = tuple(getattr(codec, "suffixes", ()) or ())
    if not suffixes or ".txt" in suffixes:
        raise ValueError(f"modality {other!r} cannot be paired with captions: its codec reads "
                         f"{'no files' if not suffixes else '.txt files, which are the captions'}")
    return other


def _checked_file(codec: Any, cache: dict[Path, BadSample | None]) -> Callable[[Path], BadSample | None]:
    """``check(path)`` -> None if the codec reads the file, else the BadSample; each file read once."""
    def check(path: Path) -> BadSample | None:
        if path not in cache:
            try:
                codec.read_file(str(path))
                cache[path] = None
            except BadSample as e:
                cache[path] = e
        return cache[path]
    return check


# -- sources -------------------------------------------------------------------------------------------
def _folder_pairs(root: Path, codec: Any, report: _Report, check: Callable[[Path], BadSample | None]
                  ) -> tuple[list[Pair], list[str]]:
    """Files with ``.txt`` sidecars -> pairs (labelled by first-level folder), and the class folders."""
    text_codec = MODALITIES.get(TEXT).codec
    everything = sorted(p for p in root.rglob("*") if p.is_file())
    files = [p for p in everything if p.suffix.lower() in codec.suffixes]
    captions = {p.with_suffix(""): p for p in everything if p.suffix.lower() == ".txt"}
    for p in everything:
        if p.suffix.lower() not in codec.suffixes and p.suffix.lower() != ".txt":
            report.reject(str(p.relative_to(root)), "unsupported_type")
    stems = {p.with_suffix("") for p in files}
    for stem, c in sorted(captions.items()):
        if stem not in stems:
            report.reject(str(c.relative_to(root)), f"missing_file: no {'/'.join(codec.suffixes)} file "
                          f"beside caption {c.name}")
    if not files:
        raise FileNotFoundError(f"no {'/'.join(codec.suffixes)} files under {root}")
    caption_of: dict[Path, str | BadSample] = {}
    found: list[Pair] = []
    for p in files:
        rel = p.relative_to(root)
        c = captions.get(p.with_suffix(""))
        if c is None:
            report.reject(str(rel), f"missing_caption: no {p.with_suffix('.txt').name} beside it")
            continue
        if c not in caption_of:
            try:
                caption_of[c] = text_codec.read_file(str(c))["text"].strip()
            except BadSample as e:
                caption_of[c] = e
        bad = caption_of[c] if isinstance(caption_of[c], BadSample) else check(p)
        if bad is not None:
            report.reject(str(rel), bad)
            continue
        folder = rel.parts[0] if len(rel.parts) > 1 else None
        found.append(Pair(str(rel), p.resolve(), rel.as_posix(), str(caption_of[c]), folder))
    # every class folder names a class, even one whose files were all unusable (as ImageFolder)
    folders = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if folders:
        kept = []
        for pair in found:
            if pair.label is None:
                report.reject(pair.name, "unlabelled_file: not inside a class folder")
            else:
                kept.append(pair)
        found = kept
    return found, folders


def _pick(keys: list[str], given: str | None, candidates: tuple[str, ...]) -> str | None:
    """The key of ``keys`` to use: ``given`` (exactly or case-insensitively), else the first
    candidate present. None if absent."""
    lower = {k.strip().lower(): k for k in keys}
    for c in ([given] if given else list(candidates)):
        if c in keys:
            return c
        if c.strip().lower() in lower:
            return lower[c.strip().lower()]
    return None


def _csv_rows(src: Path, file_keys: tuple[str, ...], file_column: str | None, caption_column: str | None,
              report: _Report) -> Iterator[tuple[str, str, Any, Any]]:
    """``(name, file, caption, label)`` per good CSV row; bad rows go to ``report``."""
    # surrogateescape: one non-UTF-8 byte spoils its row only, found below
    text = src.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{src} is empty: a header row is needed") from None
    except csv.Error as e:
        raise ValueError(f"{src}: unreadable header row: {e}") from None
    fk = _pick(header, file_column, file_keys)
    ck = _pick(header, caption_column, CAPTION_KEYS)
    if fk is None or ck is None:
        missing = [f"{w} column ({g or ' / '.join(c)})" for k, w, g, c in
                   [(fk, "file", file_column, file_keys), (ck, "caption", caption_column, CAPTION_KEYS)] if k is None]
        raise ValueError(f"{src}: no {' and no '.join(missing)} in the header {header}; "
                         f"name them with file_column= / caption_column=")
    fi, ci = header.index(fk), header.index(ck)
    lk = _pick(header, None, (LABEL_KEY,))
    li = header.index(lk) if lk is not None else None
    last = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            lines = f"{last + 1}" if reader.line_num == last + 1 else f"{last + 1}-{reader.line_num}"
            report.reject(f"{src.name}:{lines}", f"malformed_row: {src.name}:{lines}: {e}")
            last = reader.line_num
            continue
        name, last = f"{src.name}:{reader.line_num}", reader.line_num
        if not row:  # a blank line
            continue
        if len(row) != len(header):
            report.reject(name, f"malformed_row: {name}: {len(row)} fields, the header has {len(header)}")
            continue
        try:
            "".join(row).encode("utf-8")
        except UnicodeEncodeError:
            report.reject(name, f"undecodable: {name}: not UTF-8")
            continue
        label = (row[li].strip() or None) if li is not None else None
        yield name, row[fi], row[ci], label


def _jsonl_rows(src: Path, file_keys: tuple[str, ...], file_column: str | None, caption_column: str | None,
                report: _Report) -> Iterator[tuple[str, str, Any, Any]]:
    """``(name, file, caption, label)`` per good JSONL line; bad lines go to ``report``."""
    for n, line in enumerate(src.read_bytes().split(b"\n"), 1):
        name = f"{src.name}:{n}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            report.reject(name, f"undecodable: {name}: not UTF-8 ({e.reason} at byte {e.start})")
            continue
        except json.JSONDecodeError as e:
            report.reject(name, f"invalid_json: {name}: {e.msg}")
            continue
        if not isinstance(obj, dict):
            report.reject(name, f"invalid_json: {name}: a line must be a JSON object, not {type(obj).__name__}")
            continue
        keys = list(obj)
        fk = _pick(keys, file_column, file_keys)
        ck = _pick(keys, caption_column, CAPTION_KEYS)
        yield name, obj.get(fk) if fk else None, obj.get(ck) if ck else None, obj.get(LABEL_KEY)


def _table_pairs(src: Path, other: str, file_column: str | None, caption_column: str | None, report: _Report,
                 check: Callable[[Path], BadSample | None]) -> list[Pair]:
    """CSV/JSONL rows -> pairs; rows with a missing or unreadable file, a bad caption or label are
    rejected (each row counted, also when several name the same bad file)."""
    file_keys = tuple(dict.fromkeys(FILE_KEYS[:5] + (other,) + FILE_KEYS[5:]))
    rows = (_csv_rows if src.suffix.lower() == ".csv" else _jsonl_rows)(src, file_keys, file_column,
                                                                       caption_column, report)
    found: list[Pair] = []
    for name, file, caption, label in rows:
        if not isinstance(file, str) or not file.strip():
            report.reject(name, f"missing_file: {name}: no file named")
            continue
        try:
            caption = check_text(caption, name).strip()
        except BadSample as e:
            report.reject(name, e)
            continue
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))
                                  or (isinstance(label, int) and label < 0) or label == ""):
            report.reject(name, f"bad_label: {name}: label must be a class name or an integer >= 0, not {label!r}")
            continue
        path = Path(file.strip()).expanduser()
        path = path if path.is_absolute() else src.parent / path
        if not path.is_file():
            report.reject(name, f"missing_file: {name}: {file.strip()} does not exist")
            continue
        bad = check(path.resolve())
        if bad is not None:
            reason, _, why = str(bad).partition(":")
            report.reject(name, f"{reason}: {name}: {why.strip()}")
            continue
        found.append(Pair(name, path.resolve(), file.strip(), caption, label))
    labelled = any(p.label is not None for p in found)
    if not labelled:
        return found
    kept: list[Pair] = []
    first: dict[Path, str | int] = {}  # a file's class is that of its first labelled row
    for p in found:
        if p.label is None:
            report.reject(p.name, f"unlabelled: {p.name}: no label in a labelled data set")
        elif first.setdefault(p.file, p.label) != p.label:
            report.reject(p.name, f"label_conflict: {p.name}: label {p.label!r}, an earlier row of "
                          f"{p.path} has {first[p.file]!r}")
        else:
            kept.append(p)
    return kept


# -- packing -------------------------------------------------------------------------------------------
def pack_pairs(modalities: list[str], src: Path, out: Path, num_shards: int = 8, val: float = 0.1,
               test: float = 0.2, seed: int = 0, file_column: str | None = None,
               caption_column: str | None = None) -> dict[str, Any]:
    """Pack (file, caption) pairs from ``src`` (a folder with .txt sidecars, a .csv or a .jsonl; see the
    module docstring) into shards under ``out``; returns the written meta.json.

    Each sample holds the other modality's encoded fields (e.g. ``png``/``jpg``, ``flac``), the caption
    as ``txt``, ``sid``, ``path`` (the file as the source names it) and ``cls`` when labelled. meta.json
    has ``modalities`` (in the given order, no ``modality`` key), ``classes`` and, when labelled,
    zero-shot ``prompts``; ``pairs`` and ``files`` count what was written."""
    other = _other_modality(modalities)
    codec = MODALITIES.get(other).codec
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, not {num_shards}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"src={src} is not a file or a folder")
    if src.is_file() and src.suffix.lower() not in (".csv", ".jsonl"):
        raise ValueError(f"src={src}: pairs come from a folder (files + .txt captions), a .csv or a .jsonl")
    if src.is_dir() and (file_column or caption_column):
        raise ValueError("file_column / caption_column apply to a .csv or .jsonl src, not a folder")
    # checked before reading anything: a large source should not be read only to be refused
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={out} exists and is not empty; choose a new folder")
    if out.resolve() == src.resolve() or (src.is_dir() and src.resolve() in out.resolve().parents):
        raise FileExistsError(f"out={out} lies inside src={src}; choose a folder outside it")

    report = _Report()
    check = _checked_file(codec, {})
    if src.is_dir():
        pairs, folders = _folder_pairs(src, codec, report, check)
    else:
        pairs, folders = _table_pairs(src, other, file_column, caption_column, report, check), []
    if not pairs:
        raise ValueError(f"every pair in {src} was unusable: {dict(report.counts)}")
    labelled = any(p.label is not None for p in pairs)
    classes, index = _class_index([p.label for p in pairs] + folders) if labelled else ([], {})

    # split files, not rows: all captions of an image stay in one split
    groups: dict[Path, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.file, []).append(i)
    keys = list(groups)
    group_labels = [index[pairs[groups[k][0]].label] if labelled else 0 for k in keys]
    splits = {s: [i for g in sorted(idx) for i in groups[keys[g]]]
              for s, idx in stratified_split(group_labels, val, test, seed).items()}

    text_codec = MODALITIES.get(TEXT).codec

    file_ids: dict[Path, int] = {}

    def build(tmp: Path) -> None:
        meta: dict[str, Any] = {"name": f"packed:{src.name}", "modalities": list(modalities),
                                "source": str(src.resolve()), "classes": classes, "splits": {},
                                "bad_samples": dict(report.counts), "bad_files": report.files(),
                                "pairs": len(pairs), "files": len(groups), "tokenizer": TOKENIZER_NAME}
        if labelled:
            meta["prompts"] = list(PROMPTS.get(other, DEFAULT_PROMPTS))
        for split, idx in splits.items():
            if not idx:
                continue

            def samples(idx: list[int] = idx) -> Iterator[dict[str, Any]]:
                last: tuple[Path | None, dict[str, Any]] = (None, {})
                for sid, i in enumerate(idx):
                    p = pairs[i]
                    if last[0] != p.file:  # rows of a file are consecutive: read it once per run
                        try:
                            last = (p.file, codec.encode(codec.read_file(str(p.file))))
                        except BadSample as e:
                            raise ValueError(f"{p.file} changed while packing: {e}") from None
                    s = dict(last[1])
                    t = text_codec.encode({"text": p.caption})
                    if set(t) & set(s):
                        raise RuntimeError(f"{other} and text samples share fields {sorted(set(t) & set(s))}")
                    s.update(t)
                    # fid: the file's number, shared by its rows (retrieval counts a file once)
                    s.update({"__key__": f"{sid:08d}", "sid": str(sid).encode(), "path": p.path.encode(),
                              "fid": str(file_ids.setdefault(p.file, len(file_ids))).encode()})
                    if labelled:
                        s["cls"] = str(index[p.label]).encode()
                    yield s

            meta["splits"][split] = {"shards": write_split(samples(), tmp / split, min(num_shards, len(idx))),
                                     "count": len(idx)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    build_atomically(out, build)
    return json.loads((out / "meta.json").read_text())
