"""Runs every fuzz case through the packer's own read path, one case at a time, under a time limit and
an address-space limit, and classifies what happened.

``python -m tests.fuzz.harness OUT.json [--seed S] [--modality M ...]`` (run from the repository root)
writes one record per case: its modality, stem, mutation, outcome and the outcomes it was allowed.

Outcomes:
- ``packed``: the codec read the file and encoded at least one item (what ``mmssl data pack`` stores);
- ``skipped:<reason>``: the codec rejected it with a ``BadSample`` (counted in ``meta.json``);
- ``refused``: an ``MmsslError`` (a one-line error from the CLI);
- ``crash:<Type>: <message>``: anything else, which the CLI would print as a traceback: a defect;
- ``hang``: the case ran past ``CASE_SECONDS``: a defect.

After the per-case pass, the whole tree of one modality's cases goes through ``mmssl.data.pack.pack``
once, and the record ``{"pack": M, ...}`` says whether its counts add up: every case is either in a
split or counted in ``bad_samples`` (nothing vanishes)."""
from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: a single file of a few KB must decode in well under this on one core
CASE_SECONDS = 10
#: address space for the worker: torch and the codecs map about 3.4 GB; a header claiming 8 GB must
#: be refused before it is allocated, and an allocation over the limit shows as a MemoryError crash
ADDRESS_SPACE = 6 * 2**30


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang()


def _outcome(codec: Any, path: Path) -> tuple[list[str], str]:
    """Outcomes of every item the file holds (a JSONL file may hold several) and a note."""
    from mmssl.data.pack import read_items
    from mmssl.data.shards import BadSample
    from mmssl.errors import MmsslError

    got: list[str] = []
    try:
        for _, item, _ in read_items(codec, path):
            if isinstance(item, BadSample):
                got.append("skipped:" + str(item).split(":")[0])
            else:
                codec.encode(item)
                got.append("packed")
    except BadSample as e:
        got.append("skipped:" + str(e).split(":")[0])
    except MmsslError:
        got.append("refused")
    except Hang:
        return ["hang"], ""
    except Exception as e:  # noqa: BLE001 - the point of the fuzz: anything else is a defect
        first = (str(e).splitlines() or [""])[0][:160]
        return [f"crash:{type(e).__name__}: {first}"], ""
    return got or ["skipped:no_items"], ""


def _allowed(expect: frozenset[str] | None, got: list[str]) -> bool:
    """Each item's outcome must be allowed: ``skipped`` admits every reason, ``skipped:r`` only r."""
    if any(g == "hang" or g.startswith("crash:") for g in got):
        return False
    if expect is None:
        return True
    for g in got:
        if g in expect or (g.startswith("skipped:") and "skipped" in expect):
            continue
        return False
    return True


def _write(case: Any, folder: Path, case_dirs: bool) -> Path:
    """The case's files under ``folder``; the path the packer reads: the file, or for codecs whose
    item is a folder of files (an MRI case) the folder."""
    for rel, data in case.files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return folder if case_dirs else folder / next(iter(case.files))


def run(modalities: list[str], seed: int, work: Path) -> list[dict[str, Any]]:
    from mmssl.data.pack import pack
    from mmssl.registry import MODALITIES
    from tests.fuzz import formats

    signal.signal(signal.SIGALRM, _alarm)
    records: list[dict[str, Any]] = []
    for m in modalities:
        codec = MODALITIES.get(m).codec
        rng = np.random.default_rng([seed, sorted(formats.ORIGINALS).index(m)])
        tree = work / m
        case_dirs = getattr(codec, "case_dirs", False)
        for i, case in enumerate(formats.cases(m, rng)):
            # one class folder per case parity, so the end-to-end pack is a labelled two-class set
            folder = tree / f"c{i % 2}" / (f"{i:04d}_{case.stem}" if case_dirs else f"{i:04d}")
            path = _write(case, folder, case_dirs)
            t = time.perf_counter()
            signal.alarm(CASE_SECONDS)
            try:
                got, _ = _outcome(codec, path)
            finally:
                signal.alarm(0)
            records.append({"modality": m, "stem": case.stem, "mutation": case.mutation, "origin": case.origin,
                            "outcome": got, "expect": sorted(case.expect) if case.expect is not None else None,
                            "ok": _allowed(case.expect, got), "seconds": round(time.perf_counter() - t, 3)})
        # the same tree through the real packer: counts must add up, nothing lost
        mine = [r for r in records if r.get("modality") == m]
        n_items = sum(len(r["outcome"]) for r in mine)
        signal.alarm(120)
        try:
            meta = pack(m, tree, work / f"{m}-packed", num_shards=2, val=0.0, test=0.2, seed=seed)
            stored = sum(s["count"] for s in meta["splits"].values())
            skipped = sum(meta["bad_samples"].values())
            records.append({"pack": m, "items": n_items, "stored": stored, "skipped": skipped,
                            "bad_samples": meta["bad_samples"], "ok": stored + skipped == n_items,
                            "packed_cases": sum(r["outcome"].count("packed") for r in mine)})
        except Exception as e:  # noqa: BLE001
            records.append({"pack": m, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
        finally:
            signal.alarm(0)
    return records


def main(argv: list[str] | None = None) -> int:
    from tests.fuzz import formats

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modality", nargs="*", default=sorted(formats.ORIGINALS))
    a = ap.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    with tempfile.TemporaryDirectory() as d:
        records = run(a.modality, a.seed, Path(d))
    Path(a.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
