"""Resume continues with the same losses as an uninterrupted run (two loader workers), and refuses a
changed config unless told otherwise."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmssl.cli import main
from tests.conftest import tiny_overrides


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_matches_uninterrupted(packed: Path, tmp_path: Path, cache_dir: Path) -> None:
    extra = {"trainer.num_workers": "2", "trainer.ckpt_every": "3"}
    full = tmp_path / "full"
    assert main(["pretrain", *tiny_overrides(packed, full, steps=6, **extra)]) == 0
    assert (full / "checkpoints" / "step_3" / "trainer.json").exists()
    assert not list((full / "checkpoints").glob(".tmp-*"))  # no half-written checkpoint left

    # a run interrupted after step 3: the same folder as it was then
    cut = tmp_path / "cut"
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("encoders", "heads", "plots", "metrics.jsonl"))
    shutil.rmtree(cut / "checkpoints" / "last")
    shutil.copytree(cut / "checkpoints" / "step_3", cut / "checkpoints" / "last")
    shutil.rmtree(cut / "checkpoints" / "step_6")

    # a changed config is refused (exit 2), unless allow_config_change=true
    assert main(["pretrain", *tiny_overrides(packed, cut, steps=6, **extra), "resume=true",
                 "trainer.lr=1e-3"]) == 2
    assert main(["pretrain", *tiny_overrides(packed, cut, steps=6, **extra), "resume=true"]) == 0
    a, b = losses(full), losses(cut)
    assert sorted(b) == [4, 5, 6]
    for s in (4, 5, 6):
        assert abs(b[s] - a[s]) < 1e-5, (s, b[s], a[s])
    assert (cut / "encoders" / "speech" / "model.safetensors").exists()
