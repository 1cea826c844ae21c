"""The issue's acceptance run at full size (slow: about 5 minutes on 2 cores; `pytest -m slow`):
default HuBERT pretraining on the embedded speech data, then the linear probe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmssl.cli import main


@pytest.mark.slow
def test_default_200_steps_beats_random_init_and_mfcc(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", "modality=speech", "objective=hubert", "trainer.max_steps=200", f"run_dir={run}",
                 "trainer.progress=false"]) == 0
    assert main(["eval", "linear-probe", f"encoder={run}", f"out={tmp_path / 'o'}"]) == 0
    r = json.loads((tmp_path / "o" / "linear_probe.json").read_text())
    assert r["accuracy"] >= r["random_init_accuracy"] + 0.05
    assert r["accuracy"] >= r["features_baseline_accuracy"] + 0.05
