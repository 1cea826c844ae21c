"""``mmssl data pack``: an ImageFolder-style tree (one sub-folder per class, or a flat folder without
labels) -> shards with stratified train/val/test splits. Bad files are skipped, counted by reason and
listed in ``meta.json``; none vanish silently."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from mmssl.data.shards import BadSample, build_atomically, write_split
from mmssl.registry import MODALITIES


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


def pack(modality: str, src: Path, out: Path, num_shards: int = 8, val: float = 0.1, test: float = 0.2,
         seed: int = 0) -> dict[str, Any]:
    codec = MODALITIES.get(modality).codec
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"src={src} is not a folder")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in codec.suffixes)
    others = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() not in codec.suffixes)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(codec.suffixes)} files under {src}")
    classes = sorted({p.relative_to(src).parts[0] for p in files if len(p.relative_to(src).parts) > 1})
    labelled = bool(classes)
    bad: Counter = Counter()
    bad_files: list[str] = [f"{p.relative_to(src)} (unsupported_type)" for p in others]
    if labelled:  # a class tree: files outside the class folders have no label; skipped and counted
        stray = [p for p in files if len(p.relative_to(src).parts) == 1]
        if stray:
            bad["unlabelled_file"] += len(stray)
            bad_files += [f"{p.relative_to(src)} (unlabelled_file: not inside a class folder)" for p in stray]
            files = [p for p in files if len(p.relative_to(src).parts) > 1]
    if others:
        bad["unsupported_type"] += len(others)
    items, labels = [], []
    for p in files:
        try:
            item = codec.read_file(str(p))
        except BadSample as e:
            reason = str(e).split(":")[0]
            bad[reason] += 1
            bad_files.append(f"{p.relative_to(src)} ({e})")
            continue
        items.append((p, item))
        labels.append(classes.index(p.relative_to(src).parts[0]) if labelled else 0)
    if not items:
        raise ValueError(f"every file under {src} was unusable: {dict(bad)}")
    splits = stratified_split(labels, val, test, seed)

    def build(tmp: Path) -> None:
        meta: dict[str, Any] = {"name": f"packed:{src.name}", "modality": modality, "source": str(src.resolve()),
                                "classes": classes if labelled else [], "splits": {}, "bad_samples": dict(bad),
                                "bad_files": bad_files}
        for split, idx in splits.items():
            if not idx:
                continue

            def samples(idx: list[int] = idx) -> Any:
                for sid, i in enumerate(idx):
                    p, item = items[i]
                    s = codec.encode(item)
                    s.update({"__key__": f"{sid:08d}", "sid": str(sid).encode(), "path": str(p.relative_to(src)).encode()})
                    if labelled:
                        s["cls"] = str(labels[i]).encode()
                    yield s

            shards = min(num_shards, len(idx))
            meta["splits"][split] = {"shards": write_split(samples(), tmp / split, shards), "count": len(idx)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={out} exists and is not empty; choose a new folder")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise FileExistsError(f"out={out} lies inside src={src}; choose a folder outside it")
    build_atomically(out, build)
    return json.loads((out / "meta.json").read_text())
