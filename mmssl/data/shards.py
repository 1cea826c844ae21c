"""webdataset shards: writing splits, reading samples with bad-sample accounting.

A data set folder holds ``meta.json`` (classes, per-split shard lists and counts, bad-sample report)
and ``<split>/shard-NNNNNN.tar``. Each sample carries ``sid`` (an integer id unique within its split),
``cls`` (the class index, when labelled) and the modality's own fields."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from filelock import FileLock

from mmssl.atomic import make_tmp_dir, replace_dir
from mmssl.errors import UnknownNameError

SPLITS = ("train", "val", "test")


class BadSample(Exception):
    """A sample that cannot be used; its message is the reason, counted under its first word."""


def write_split(samples: Iterable[dict[str, Any]], out_dir: Path, num_shards: int) -> list[str]:
    """Write samples (dicts with ``__key__`` and encoded fields) round-robin into ``num_shards`` shards.
    Round-robin keeps every shard a sample of the whole split, which resampling assumes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"shard-{i:06d}.tar" for i in range(num_shards)]
    writers = [wds.TarWriter(str(out_dir / n)) for n in names]
    try:
        for i, s in enumerate(samples):
            writers[i % num_shards].write(s)
    finally:
        for w in writers:
            w.close()
    return names


def read_samples(paths: Iterable[Path], decode: Callable[[dict[str, Any]], dict[str, Any]],
                 bad: Counter, on_error: str = "skip") -> Iterator[dict[str, Any]]:
    """Decoded samples from tar shards in order. A sample whose decoding fails is counted in ``bad``
    (by reason) and skipped, or raised when ``on_error == "raise"``; an unreadable shard likewise."""
    for path in paths:
        def handler(exn: Exception, _p: Path = path) -> bool:
            if on_error == "raise":
                raise exn
            bad[f"unreadable_shard:{type(exn).__name__}"] += 1
            return True

        for raw in wds.tariterators.tarfile_samples([{"url": str(path)}], handler=handler):
            try:
                yield decode(raw)
            except BadSample as e:
                if on_error == "raise":
                    raise ValueError(f"bad sample {raw.get('__key__')} in {path}: {e}") from None
                bad[str(e).split(":")[0]] += 1


def load_meta(root: Path) -> dict[str, Any]:
    return json.loads((Path(root) / "meta.json").read_text())


def split_paths(root: Path, split: str) -> list[Path]:
    meta = load_meta(root)
    if split not in meta["splits"]:
        raise UnknownNameError(f"data set {root} has no split {split!r}; it has: {', '.join(meta['splits'])}")
    return [Path(root) / split / n for n in meta["splits"][split]["shards"]]


def write_labelled_splits(out: Path, sizes: dict[str, int], items: Callable[[str, int], Iterable[tuple[dict[str, Any], int]]],
                          meta: dict[str, Any]) -> None:
    """An embedded preset's shards: for each split, ``items(split, n)`` yields (encoded fields, label);
    each becomes a sample keyed by its index (``cls`` the label, ``sid`` the index), written into 8
    train shards or 2 for other splits (never more shards than items); then ``meta.json`` with each
    split's shards and count filled in."""
    meta.setdefault("splits", {})
    for split, n in sizes.items():
        def samples(split: str = split, n: int = n) -> Iterator[dict[str, Any]]:
            for i, (fields, label) in enumerate(items(split, n)):
                yield {**fields, "__key__": f"{i:08d}", "cls": str(label).encode(), "sid": str(i).encode()}

        shards = write_split(samples(), out / split, num_shards=min(8 if split == "train" else 2, max(n, 1)))
        meta["splits"][split] = {"shards": shards, "count": n}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def build_atomically(root: Path, build: Callable[[Path], None]) -> Path:
    """Create a data set folder once: under a file lock, into a temporary folder, renamed when whole.
    Other processes (DDP ranks, parallel tests) wait on the lock and then find it finished."""
    root = Path(root)
    if (root / "meta.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "meta.json").exists():
            return root
        tmp = make_tmp_dir(root)
        try:
            build(tmp)
            replace_dir(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root
