"""Two CPU processes (gloo) under torchrun: DistributedDataParallel pretraining, per-rank resume state."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_overrides


def test_two_process_gloo_run(packed: Path, tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", MMSSL_CACHE=str(cache_dir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "mmssl.cli", "pretrain", *tiny_overrides(packed, run, steps=3)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 3
    for rank in (0, 1):
        assert (run / "checkpoints" / "last" / f"rng_rank{rank}.safetensors").exists()
    states = [json.loads((run / "checkpoints" / "last" / f"state_rank{k}.json").read_text()) for k in (0, 1)]
    assert states[0]["roles"] and states[1]["roles"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in rows] == [1, 2, 3]  # rank 0 logs once per step
    assert (run / "encoders" / "speech" / "model.safetensors").exists()
