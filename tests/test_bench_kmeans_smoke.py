"""``bench/kmeans.py --smoke``: both sides fit both cases at tiny sizes, and what the JSON reports is
what it claims (the inertias are those of each side's centroids, the ratios follow from the times)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kmeans", ROOT / "bench" / "kmeans.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_kmeans"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_kmeans", None)


def test_smoke_run_reports_both_sides(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "kmeans.json"
    assert bench.main(["--device", "cpu", "--smoke", "--repeats", "2", "--threads", "1", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the bench restores the caller's thread count
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert res["smoke"] and res["threads"] == 1 and set(res["cases"]) == {"blobs", "mfcc"}
    for name, case in res["cases"].items():
        assert (case["rows"], case["features"], case["k"]) == bench.CASES[name][1]  # smoke sizes
        assert len(case["runs"]) == 2
        for run in case["runs"]:
            m, r = run["mmssl"], run["ref"]
            assert m["seconds"] > 0 and r["seconds"] > 0 and m["full_passes"] >= 1 and r["steps"] >= 1
            # the bench's float64 inertia of each side's centroids agrees with the side's own figure
            assert m["inertia"] == pytest.approx(m["inertia_reported"], rel=1e-5)
            assert r["inertia"] == pytest.approx(r["inertia_reported"], rel=1e-4)
            assert run["speedup"] == pytest.approx(r["seconds"] / m["seconds"])
            assert run["inertia_ratio"] == pytest.approx(m["inertia"] / r["inertia"])
        assert case["speedup_min"] == min(run["speedup"] for run in case["runs"])
        assert sum(f"| {name} |" in line for line in printed.splitlines()) == 2
    assert res["ratios"]["mmssl/ref"] == min(c["speedup_min"] for c in res["cases"].values())
    assert res["goal_met"] == (res["ratios"]["mmssl/ref"] >= 1.5 and res["inertia_ratio_max"] <= 1.001)
    assert res["check"]["status"] == ("passed" if res["inertia_ratio_max"] <= 1.001 else "failed")


def test_speech_case_reports_pnmi(bench, tmp_path: Path) -> None:
    out = tmp_path / "speech.json"
    assert bench.main(["--device", "cpu", "--smoke", "--cases", "speech", "--threads", "1", "--out", str(out)]) == 0
    case = json.loads(out.read_text())["cases"]["speech"]
    assert case["utterances"] == 20 and case["features"] == 39 and case["rows"] > 500
    for side in ("mmssl", "ref"):
        assert 0.0 < case["runs"][0][side]["pnmi"] <= 1.0


def test_exact_inertia_is_the_literal_sum(bench) -> None:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1000, 7, generator=g) * 5 + 20, torch.randn(9, 7, generator=g) * 5 + 20
    literal = float(((x.double()[:, None] - c.double()[None]) ** 2).sum(-1).min(1).values.sum())
    assert bench.exact_inertia(x, c, rows=300) == pytest.approx(literal, rel=1e-12)


def test_mfcc_like_frames_look_like_mfcc(bench) -> None:
    x = bench.mfcc_like(5000, seed=1, frames_per_utt=250)
    assert x.shape == (5000, 39) and x.dtype == np.float32 and np.isfinite(x).all()
    std = x.std(0)
    assert std[0] > 5 * std[12]  # c0 dominates, the higher cepstra fall off
    assert (std[13:26] < std[:13]).all() and (std[26:] < std[13:26]).all()  # deltas are smaller
    # neighbouring frames are correlated (phone segments, smoothing), unlike shuffled ones
    a = x[:250, 1] - x[:250, 1].mean()
    assert float((a[1:] * a[:-1]).mean() / (a * a).mean()) > 0.5
    assert not math.isclose(float(x[:, 0].mean()), 0.0, abs_tol=1.0)  # raw: not centred
