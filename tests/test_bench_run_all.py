"""``bench/run_all.py`` (``make bench-gpu``) in its CPU smoke mode: every benchmark of the plan runs
(or is reported absent), the summary carries each one's status, ratios and loss check, and the exit
code says whether any failed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import run_all

sys.path.remove(str(ROOT / "bench"))


def test_every_benchmark_of_the_plan_ran(bench_smoke: Path) -> None:
    summary = json.loads((bench_smoke / "summary.json").read_text())
    assert summary["smoke"] and summary["device"] == "cpu"
    got = {r["bench"]: r for r in summary["benchmarks"]}
    assert list(got) == [b.name for b in run_all.PLAN]
    for b in run_all.PLAN:
        r = got[b.name]
        if not (ROOT / "bench" / b.script).exists():
            assert r["status"] == "absent"
            continue
        assert r["status"] == "ok", r
        assert r["command"].startswith(f"python bench/{b.script} --device cpu --smoke")
        for k in b.ratio_keys:  # the headline ratio of every benchmark that has a reference side
            assert k in r["ratios"]
    for name in ("hubert", "mae", "clip"):
        assert got[name]["check"] == "passed", got[name]
        assert got[name]["ratios"]["mmssl/ref"] > 0
    md = (bench_smoke / "summary.md").read_text()
    assert all(f"| {b.name} |" in md for b in run_all.PLAN)


def test_ratios_and_failures_are_reported(tmp_path: Path, monkeypatch) -> None:
    assert run_all.ratios({"ratios": {"mmssl/ref": 1.5, "x": None}, "ratio_ref_over_mmssl": 2.0},
                          ("mmssl/ref", "mmssl_compiled/ref_compiled")) == {
        "mmssl/ref": 1.5, "mmssl_compiled/ref_compiled": None, "ratio_ref_over_mmssl": 2.0}
    # a script that crashes is reported with its last stderr line, one that is missing as absent,
    # and the whole command exits 1
    (tmp_path / "crash.py").write_text("import sys\nsys.exit('bad thing happened')\n")
    monkeypatch.setattr(run_all, "BENCH", tmp_path)
    monkeypatch.setattr(run_all, "PLAN", (run_all.Bench("crash", "crash.py"), run_all.Bench("gone", "gone.py")))
    out = tmp_path / "out"
    assert run_all.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 1
    recs = json.loads((out / "summary.json").read_text())["benchmarks"]
    assert recs[0]["status"] == "failed" and recs[0]["error"] == "bad thing happened"
    assert recs[1]["status"] == "absent"
