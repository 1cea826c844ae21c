"""trainer.strategy=fsdp (FSDP2) against DDP, 2 gloo processes on CPU: the same losses over 20 steps for
hubert, mae, data2vec (its EMA teacher sharded and updated on the local shards), distill (teacher, DINO
centre) and clip (embeddings gathered with gradients; the logit scale left replicated); sharded
checkpoints (torch.distributed.checkpoint) that continue exactly at the same world size and resume at
another one (2 -> 1, 1 -> 2); the export is a plain full safetensors file either way.

The workers are this file run as a script under torchrun (``python tests/test_fsdp.py JOBS.json``): each
rank trains every job of the list in one process, one after the other, so the start-up is paid once."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tests.test_contrastive_end_to_end import SMALL as CLIP_SMALL
from tests.test_contrastive_end_to_end import pairs  # noqa: F401  (the pairs fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
QUIET = {"trainer.save_minutes": "0", "trainer.num_workers": "0", "trainer.threads": "1", "trainer.batch_size": "4"}


def overrides(objective: str, run: Path, speech: Path, image_text: Path, steps: int = STEPS, **extra: str) -> list[str]:
    if objective == "clip":
        return ["modality=[image,text]", "objective=clip", "data=shards", f"data.path={image_text}", f"run_dir={run}",
                f"trainer.max_steps={steps}", *CLIP_SMALL, *[f"{k}={v}" for k, v in {**QUIET, **extra}.items()]]
    args = ["modality=speech", f"objective={objective}", *tiny_overrides(speech, run, steps=steps, **QUIET, **extra)]
    if objective != "hubert":  # the unit-target keys are HuBERT's
        args = [a for a in args if not a.startswith(("objective.k=", "objective.kmeans_iters="))]
    if objective == "data2vec":  # a teacher that moves within 20 steps
        args += ["objective.ema_decay=0.9", "objective.ema_end_decay=0.99"]
    if objective == "distill":
        args += ["objective.n_local=1", "objective.out_dim=16", "objective.head_hidden_dim=32",
                 "objective.head_bottleneck_dim=8"]
    return args


def run_jobs(jobs: list[list[str]], tmp: Path, cache: Path, nproc: int = 2, timeout: int = 600) -> None:
    spec = tmp / f"jobs-{len(list(tmp.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", MMSSL_CACHE=str(cache), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           str(spec)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


def losses(run: Path) -> dict[int, float]:
    """step -> loss, the last record of each step."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps: list[int]) -> None:
    assert sorted(a) == sorted(b) == steps
    for s in steps:
        assert abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])), (s, a[s], b[s])


def _fsdp_and_ddp(objective: str, speech: Path, image_text: Path, tmp: Path, cache: Path
                  ) -> tuple[dict[int, float], dict[int, float]]:
    """The same 2-process run under DDP and under FSDP -> (DDP's losses, FSDP's); checks on the way
    that both export the same plain safetensors and that FSDP checkpointed through DCP."""
    runs = {s: tmp / f"{objective}-{s}" for s in ("ddp", "fsdp")}
    run_jobs([overrides(objective, r, speech, image_text, **{"trainer.strategy": s}) for s, r in runs.items()], tmp, cache)
    ddp, fsdp = losses(runs["ddp"]), losses(runs["fsdp"])
    # the export is the same plain, full safetensors file under both
    for m in (p.name for p in (runs["ddp"] / "encoders").iterdir()):
        a = load_file(runs["ddp"] / "encoders" / m / "model.safetensors")
        b = load_file(runs["fsdp"] / "encoders" / m / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].shape == b[k].shape
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda msg, k=k, m=m: f"{m} {k}: {msg}")
    assert (runs["fsdp"] / "checkpoints" / "last" / "dcp" / ".metadata").exists()
    assert not (runs["fsdp"] / "checkpoints" / "last" / "model.safetensors").exists()
    return ddp, fsdp


def test_fsdp_matches_ddp_data2vec(packed: Path, pairs: Path, tmp_path: Path, cache_dir: Path) -> None:  # noqa: F811
    ddp, fsdp = _fsdp_and_ddp("data2vec", packed, pairs, tmp_path, cache_dir)
    assert_same_losses(ddp, fsdp, list(range(1, STEPS + 1)))
    assert len({round(v, 6) for v in ddp.values()}) > 1  # it trains: the losses move


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["hubert", "mae", "distill", "clip"])
def test_fsdp_matches_ddp(objective: str, packed: Path, pairs: Path, tmp_path: Path, cache_dir: Path) -> None:  # noqa: F811
    ddp, fsdp = _fsdp_and_ddp(objective, packed, pairs, tmp_path, cache_dir)
    assert_same_losses(ddp, fsdp, list(range(1, STEPS + 1)))
    assert len({round(v, 6) for v in ddp.values()}) > 1  # it trains: the losses move


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_at_2_and_at_1(packed: Path, pairs: Path, tmp_path: Path, cache_dir: Path) -> None:  # noqa: F811
    """Saved by 2 processes at step 3: resumed by 2, steps 4..6 equal the uninterrupted 6-step run's;
    resumed by 1 (the shards gathered by DCP) it trains on; and a 1-process checkpoint resumes with 2."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    # schedules that do not depend on max_steps, so the 3-step run's steps are the 6-step run's first three
    ck = {"trainer.strategy": "fsdp", "trainer.ckpt_every": "3", "trainer.schedule": "constant",
          "objective.ema_anneal_steps": "10"}
    run_jobs([overrides("data2vec", full, packed, pairs, steps=6, **ck),
              overrides("data2vec", cut, packed, pairs, steps=3, **ck)], tmp_path, cache_dir)
    one = tmp_path / "one"
    shutil.copytree(cut, one)  # the same step-3 checkpoint, resumed by one process below
    run_jobs([[*overrides("data2vec", cut, packed, pairs, steps=6, **ck), "resume=true", "allow_config_change=true"]], tmp_path, cache_dir)
    assert_same_losses(losses(full), losses(cut), list(range(1, 7)))

    run_jobs([[*overrides("data2vec", one, packed, pairs, steps=5, **ck), "resume=true", "allow_config_change=true"]], tmp_path, cache_dir, nproc=1)
    got = losses(one)
    assert sorted(got) == [1, 2, 3, 4, 5] and all(math.isfinite(v) for v in got.values())
    meta = json.loads((one / "checkpoints" / "last" / "trainer.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 5
    # its first resumed step starts from the 2-process weights: close to the 2-process run's step 4
    assert abs(got[4] - losses(full)[4]) < 0.2 * abs(losses(full)[4])

    # 1 -> 2: the 1-process checkpoint (step 5) resumed by 2 processes
    run_jobs([[*overrides("data2vec", one, packed, pairs, steps=7, **ck), "resume=true", "allow_config_change=true"]], tmp_path, cache_dir)
    meta = json.loads((one / "checkpoints" / "last" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 7
    assert sorted(losses(one)) == list(range(1, 8))
    enc = load_file(one / "encoders" / "speech" / "model.safetensors")
    assert all(isinstance(v, torch.Tensor) for v in enc.values()) and len(enc) > 10


def _worker(spec: Path) -> None:
    """Every job of ``spec`` in this process; the process group is kept between jobs."""
    import torch.distributed as dist

    import mmssl.train.distributed as d
    from mmssl.cli import main

    def keep_group(info: d.DistInfo, wait_for_peers: bool = True) -> None:
        if info.enabled and wait_for_peers:
            dist.barrier()

    d.shutdown, real = keep_group, d.shutdown  # type: ignore[assignment]
    try:
        for args in json.loads(spec.read_text()):
            rc = main(["pretrain", *args])
            if rc != 0:
                raise SystemExit(rc)
    finally:
        if dist.is_initialized():
            real(d.DistInfo(dist.get_rank(), dist.get_world_size()))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
