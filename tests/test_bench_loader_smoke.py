"""``bench/loader.py --smoke``: both sides read the same files' worth of samples through real loader
workers, the JSON reports what it claims (rates from the counts and times, ratios from the rates, the
cores needed from the claimed GPU rates), and run_all's smoke run carries every case."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "bench" / "loader.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_loader"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_loader", None)


def check_case(bench, name: str, c: dict, workers: list[int]) -> None:
    case = next(x for x in bench.CASES if x.name == name)
    assert c["modality"] == case.modality and c["files"] == case.smoke_files
    assert [r["workers"] for r in c["runs"]] == workers
    for r in c["runs"]:
        m, ref = r["mmssl"], r["ref"]
        # one epoch on each side: every file once, in full batches
        assert m["samples"] == ref["samples"] == c["files"]
        assert m["batches"] == ref["batches"] == c["files"] // c["batch_size"]
        for side in (m, ref):
            assert side["cpu_s"] > 0 and side["wall_s"] > 0
            assert side["samples_per_core_s"] == pytest.approx(side["samples"] / side["cpu_s"], rel=1e-2)
        assert r["ratio"] == pytest.approx(m["samples_per_core_s"] / ref["samples_per_core_s"], rel=1e-2)
        if case.gpu:
            assert c["gpu_rate"]["status"] == "claimed, GPU pending"
            assert r["cores_needed"]["mmssl"] == pytest.approx(case.gpu[0] / m["samples_per_core_s"], rel=1e-2, abs=6e-3)  # rounded to 0.01
        else:
            assert c["gpu_rate"] is None and "cores_needed" not in r


@pytest.mark.slow  # ~16 s; the run_all smoke output below checks every case in the default run
def test_smoke_with_a_worker_per_side(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "loader.json"
    names = ["image-jpeg", "point"]  # the cheapest to generate; run_all's smoke run covers the rest
    assert bench.main(["--smoke", "--cases", ",".join(names), "--workers", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["smoke"] and res["check"]["status"] == "passed" and list(res["cases"]) == names
    for n in names:
        check_case(bench, n, res["cases"][n], [1])
    assert set(res["ratios"]) == {"mmssl/ref", *(f"mmssl/ref:{n}" for n in names)}
    printed = capsys.readouterr().out
    assert sum(line.startswith(f"| {n} |") for n in names for line in printed.splitlines()) == 2


def test_run_all_smoke_covers_every_case(bench, bench_smoke: Path) -> None:
    res = json.loads((bench_smoke / "loader.json").read_text())
    assert list(res["cases"]) == [c.name for c in bench.CASES] and res["workers"] == [0]
    for name, c in res["cases"].items():
        check_case(bench, name, c, [0])
    summary = {r["bench"]: r for r in json.loads((bench_smoke / "summary.json").read_text())["benchmarks"]}
    assert summary["loader"]["status"] == "ok" and summary["loader"]["check"] == "passed"
    assert summary["loader"]["ratios"]["mmssl/ref"] == res["ratios"]["mmssl/ref"]
