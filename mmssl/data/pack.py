"""``mmssl data pack``: an ImageFolder-style tree (one sub-folder per class, or a flat folder without
labels), or a single file, -> shards with stratified train/val/test splits. A file may hold one item
(an image, a recording, a .txt document) or many (a .jsonl file: one item per line, each with an
optional own label). Bad files and items are skipped, counted by reason and listed in ``meta.json``;
none vanish silently."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmssl.data.shards import BadSample, build_atomically, write_split
from mmssl.registry import MODALITIES

MAX_LISTED = 1000  # bad items listed by name in meta.json; all are counted
MAX_PRINTED = 20  # ... and printed by `mmssl data pack`


def stratified_split(labels: list[int], val: float, test: float, seed: int) -> dict[str, list[int]]:
    """Indices per split, each class divided in the same proportions (at least one item per split
    where the class has three or more)."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for y in sorted(by_class):
        idx = [by_class[y][j] for j in torch.randperm(len(by_class[y]), generator=g).tolist()]
        n = len(idx)
        n_test = max(1, round(test * n)) if n >= 3 and test > 0 else 0
        n_val = max(1, round(val * n)) if n >= 3 and val > 0 else 0
        out["test"] += idx[:n_test]
        out["val"] += idx[n_test:n_test + n_val]
        out["train"] += idx[n_test + n_val:]
    return {k: sorted(v) for k, v in out.items()}


def grouped_split(groups: list[str], val: float, test: float, seed: int) -> dict[str, list[int]]:
    """Indices per split with every group (a speaker, a font, a source package) in one split only:
    the sorted groups are shuffled with ``seed`` and whole groups go to test, then val, the rest to
    train (at least one group each where there are three or more). Classes are not stratified: a
    class whose items all sit in one group lies in one split."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(set(groups))
    order = [names[j] for j in torch.randperm(len(names), generator=g).tolist()]
    n = len(order)
    n_test = max(1, round(test * n)) if n >= 3 and test > 0 else 0
    n_val = max(1, round(val * n)) if n >= 3 and val > 0 else 0
    where = {x: "test" for x in order[:n_test]} | {x: "val" for x in order[n_test:n_test + n_val]}
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, x in enumerate(groups):
        out[where.get(x, "train")].append(i)
    return out


def read_items(codec: Any, path: Path) -> Iterator[tuple[str, dict[str, Any] | BadSample, str | int | None]]:
    """``(part, item or the BadSample rejecting it, the item's own label or None)`` for each item of a
    file. ``part`` locates the item inside a multi-item file ("" for a whole file). Codecs with
    multi-item files define ``read_items(path)`` with this contract; otherwise ``read_file`` reads one."""
    if hasattr(codec, "read_items"):
        yield from codec.read_items(str(path))
        return
    try:
        yield "", codec.read_file(str(path)), None
    except BadSample as e:
        yield "", e, None


def _case_dirs(codec: Any, src: Path) -> tuple[Path, list[Path], list[Path]]:
    """(root, case folders, other files) for codecs whose item is a folder (``case_dirs = True``): every
    folder directly holding a file with one of ``codec.suffixes`` is one case; with ``src`` itself a case,
    it is the only one. Class = the first path part below ``src`` for cases two or more levels down."""
    if not src.is_dir():
        raise FileNotFoundError(f"src={src} is not a folder of {codec.modality} cases")
    def is_member(p: Path) -> bool:
        return p.is_file() and p.name.lower().endswith(tuple(codec.suffixes))

    if any(is_member(p) for p in src.iterdir()):
        return src.parent, [src], []
    cases = sorted({p.parent for p in src.rglob("*") if is_member(p)})
    if not cases:
        raise FileNotFoundError(f"no {codec.modality} cases ({'/'.join(codec.suffixes)} files in a folder) under {src}")
    inside = set(cases)
    others = sorted(p for p in src.rglob("*") if p.is_file() and p.parent not in inside)
    return src, cases, others


def _class_index(names: list[str | int]) -> tuple[list[str], dict[str | int, int]]:
    """Class names and each label's index: integer labels (all of them) are class indices
    themselves; otherwise names sort as ImageFolder sorts them."""
    if names and all(isinstance(n, int) for n in names):
        top = max(int(n) for n in names)
        return [str(i) for i in range(top + 1)], {n: int(n) for n in names}
    classes = sorted({str(n) for n in names})
    return classes, {n: classes.index(str(n)) for n in names}


def pack(modality: str, src: Path, out: Path, num_shards: int = 8, val: float = 0.1, test: float = 0.2,
         seed: int = 0, group_level: int = 0) -> dict[str, Any]:
    """``group_level=N`` (N >= 1): the folder N levels below ``src`` (1: the class folder, 2: a folder
    inside it, e.g. ``src/<class>/<speaker>/``) is each item's group, and whole groups are split
    (``grouped_split``); an item fewer levels down is a group of its own. 0: stratified by class."""
    codec = MODALITIES.get(modality).codec
    src = Path(src)
    kinds = "/".join(codec.suffixes)
    if getattr(codec, "case_dirs", False):  # an item is a folder of files (an MRI case: one NIfTI per contrast)
        root, files, others = _case_dirs(codec, src)
    elif src.is_file():
        if src.suffix.lower() not in codec.suffixes:
            raise ValueError(f"src={src} is not a {kinds} file")
        root, files, others = src.parent, [src], []
    elif src.is_dir():
        root = src
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in codec.suffixes)
        others = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() not in codec.suffixes)
        if not files:
            raise FileNotFoundError(f"no {kinds} files under {src}")
    else:
        raise FileNotFoundError(f"src={src} is not a file or a folder")
    bad: Counter = Counter()
    bad_files: list[str] = []

    def reject(name: str, reason: str, why: str) -> None:
        bad[reason] += 1
        if len(bad_files) < MAX_LISTED:
            bad_files.append(f"{name} ({why})")

    for p in others:
        reject(str(p.relative_to(root)), "unsupported_type", "unsupported_type")
    # (name, item, label: folder name or own label or None, whole file?)
    found: list[tuple[str, dict[str, Any], str | int | None, bool]] = []
    origin: dict[str, tuple[str, ...]] = {}  # item name -> its file's path parts below src (for groups)
    for p in files:
        rel = p.relative_to(root)
        folder = rel.parts[0] if src.is_dir() and len(rel.parts) > 1 else None
        for part, item, own in read_items(codec, p):
            name = f"{rel}:{part}" if part else str(rel)
            if isinstance(item, BadSample):
                reject(name, str(item).split(":")[0], str(item))
            elif folder is not None and own is not None and str(own) != folder:
                reject(name, "label_conflict", f"label_conflict: own label {own!r} in class folder {folder!r}")
            else:
                found.append((name, item, folder if folder is not None else own, not part))
                origin[name] = rel.parts
    labelled = any(y is not None for _, _, y, _ in found)
    if group_level < 0:
        raise ValueError(f"group={group_level}: a folder depth >= 1, or 0 for no groups")
    items: list[tuple[str, dict[str, Any]]] = []
    names: list[str | int] = []
    for name, item, y, whole in found:
        if labelled and y is None:  # in a labelled set an item without a label cannot be used
            if whole:
                reject(name, "unlabelled_file", "unlabelled_file: not inside a class folder")
            else:
                reject(name, "unlabelled", "unlabelled: no label in a labelled data set")
            continue
        items.append((name, item))
        names.append(y if y is not None else 0)
    if not items:
        raise ValueError(f"every item in {src} was unusable: {dict(bad)}")
    # every class folder names a class, even one whose files were all unusable (as ImageFolder)
    folders = [p.relative_to(root).parts[0] for p in files if src.is_dir() and len(p.relative_to(root).parts) > 1]
    classes, index = _class_index(names + folders) if labelled else ([], {0: 0})
    labels = [index[y] for y in names]
    if group_level:
        groups = [p[group_level - 1] if len(p) > group_level else "/".join(p) for p in (origin[n] for n, _ in items)]
        splits = grouped_split(groups, val, test, seed)
    else:
        splits = stratified_split(labels, val, test, seed)
    if len(bad_files) < sum(bad.values()):
        bad_files.append(f"... and {sum(bad.values()) - len(bad_files)} more (counted in bad_samples)")

    def build(tmp: Path) -> None:
        meta: dict[str, Any] = {"name": f"packed:{src.name}", "modality": modality, "source": str(src.resolve()),
                                "classes": classes, "splits": {}, "bad_samples": dict(bad), "bad_files": bad_files}
        if group_level:  # which groups each split holds, so a reader can check none is in two
            meta["group_level"] = group_level
            meta["groups"] = {k: sorted({groups[i] for i in idx}) for k, idx in splits.items() if idx}
        for split, idx in splits.items():
            if not idx:
                continue

            def samples(idx: list[int] = idx) -> Any:
                for sid, i in enumerate(idx):
                    name, item = items[i]
                    s = codec.encode(item)
                    s.update({"__key__": f"{sid:08d}", "sid": str(sid).encode(), "path": name.encode()})
                    if labelled:
                        s["cls"] = str(labels[i]).encode()
                    yield s

            shards = min(num_shards, len(idx))
            meta["splits"][split] = {"shards": write_split(samples(), tmp / split, shards), "count": len(idx)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={out} exists and is not empty; choose a new folder")
    if out.resolve() == src.resolve() or (src.is_dir() and src.resolve() in out.resolve().parents):
        raise FileExistsError(f"out={out} lies inside src={src}; choose a folder outside it")
    build_atomically(out, build)
    return json.loads((out / "meta.json").read_text())
