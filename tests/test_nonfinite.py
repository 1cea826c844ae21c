"""A non-finite loss skips the step on every rank, is counted and logged; too many in a row stop the
run with a clear message (exit code 1)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmssl.cli import main
from mmssl.objectives.hubert import HuBERT
from mmssl.types import ObjectiveOutput
from tests.conftest import tiny_overrides


def poison(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    orig = HuBERT.forward
    calls = {"n": 0}

    def forward(self, batch):  # type: ignore[no-untyped-def]
        out = orig(self, batch)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            return ObjectiveOutput(out.loss * float("nan"), out.metrics)
        return out

    monkeypatch.setattr(HuBERT, "forward", forward)


def test_nonfinite_steps_are_skipped_and_counted(packed: Path, tmp_path: Path, cache_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    poison(monkeypatch, {3, 4})
    run = tmp_path / "r"
    assert main(["pretrain", *tiny_overrides(packed, run, steps=3, **{"trainer.accumulate": "2"})]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "nonfinite_step_skipped" for r in rows) == 1  # calls 3 and 4: both halves of one step
    last = [r for r in rows if "loss" in r][-1]
    assert last["step"] == 3 and last["skipped_steps"] == 1
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN reached the weights or the log


def test_too_many_nonfinite_steps_stop_the_run(packed: Path, tmp_path: Path, cache_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    poison(monkeypatch, set(range(1, 100)))
    assert main(["pretrain", *tiny_overrides(packed, tmp_path / "r", steps=5, **{"trainer.max_nonfinite": "2"})]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmssl: error: 3 non-finite steps in a row")
