"""The fuzz suite: every ``mmssl data pack`` format, its originals and their mutants (truncated, bit
flipped, wrong magic, zero length, garbage tails, absurd headers, NaN/Inf payloads, ...), read one by
one by the packer's own codecs in a worker with a time and an address-space limit, then packed as one
tree. A mutant may pack, be skipped and counted, or be refused in one line; a traceback, a hang or an
item that is neither stored nor counted fails the test. The counts print at the end of the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("MMSSL_FUZZ_SEED", "0"))
#: the Done-when budget for the whole suite on CI's 2 cores
BUDGET_S = 60

SUMMARY: list[str] = []


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fuzz") / "records.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tests.fuzz.harness", str(out), "--seed", str(SEED)],
                       check=False, cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=BUDGET_S * 3)
    seconds = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads(out.read_text())
    cases = [x for x in recs if "modality" in x]
    for m in sorted({x["modality"] for x in cases}):
        c: Counter = Counter()
        for x in cases:
            if x["modality"] == m:
                c["cases"] += 1
                for o in set(x["outcome"]):
                    c[o.split(":")[0]] += 1
        SUMMARY.append(f"{m:7s} " + ", ".join(f"{k} {v}" for k, v in c.items()))
    SUMMARY.append(f"{len(cases)} cases (seed {SEED}) in {seconds:.1f} s")
    recs.append({"seconds": seconds})
    return recs


def test_no_mutant_crashes_or_hangs(records: list[dict]) -> None:
    bad = [f"{x['modality']}/{x['stem']} ({x['mutation']}): {x['outcome']} (allowed: {x['expect']})"
           for x in records if "modality" in x and not x["ok"]]
    assert not bad, "\n".join(bad)


def test_every_item_is_stored_or_counted(records: list[dict]) -> None:
    packs = [x for x in records if "pack" in x]
    assert len(packs) == 6
    bad = [x for x in packs if not x["ok"]]
    assert not bad, bad


def test_originals_pack_and_mutants_are_caught(records: list[dict]) -> None:
    """The suite would pass vacuously if every reader accepted nothing, or everything."""
    cases = [x for x in records if "modality" in x]
    originals = [x for x in cases if x["mutation"] == "original"]
    assert originals and all(set(x["outcome"]) == {"packed"} for x in originals), originals
    for m in {x["modality"] for x in cases}:
        skipped = [x for x in cases if x["modality"] == m and any(o.startswith("skipped") for o in x["outcome"])]
        assert len(skipped) >= 10, (m, len(skipped))


def test_within_budget(records: list[dict]) -> None:
    assert records[-1]["seconds"] < BUDGET_S
