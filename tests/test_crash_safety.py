"""Crash safety, measured: a run killed with SIGKILL at a seeded point (a step, inside the unit-target
fit, halfway through writing a checkpoint, while one is moved aside, before the export) and then
resumed ends with exactly the losses and weights of the uninterrupted run; a full disk while a
checkpoint is written stops the run with one line and keeps the previous checkpoint whole.

The kill points come from ``mmssl.faults`` (``MMSSL_FAULT=NAME:N`` makes the process SIGKILL itself
the N-th time it reaches NAME). The default suite runs 2 points (hubert and clip); ``-m slow`` runs 20 over all three objectives."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmssl.cli import main
from mmssl.faults import POINTS
from tests.conftest import tiny_overrides
from tests.test_contrastive_end_to_end import SMALL, pairs  # noqa: F401  (the pairs fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# deterministic checkpoints: every 2 steps and at the end, no clock-driven ones
CKPT = {"trainer.ckpt_every": "2", "trainer.save_minutes": "0", "trainer.num_workers": "0", "trainer.threads": "1"}
#: how often each point is reached in one uninterrupted run of this configuration (hubert also fits units)
REACHED = {"units_dumped": 1, "units_fitted": 1, "step": STEPS, "ckpt_rank_state": 2, "ckpt_weights": 2,
           "ckpt_optimizer": 2, "ckpt_aside": 1, "export": 1}


def overrides(objective: str, run: Path, speech: Path, image_text: Path) -> list[str]:
    if objective == "clip":
        return ["modality=[image,text]", "objective=clip", "data=shards", f"data.path={image_text}",
                f"run_dir={run}", f"trainer.max_steps={STEPS}", *SMALL, *[f"{k}={v}" for k, v in CKPT.items()]]
    args = ["modality=speech", f"objective={objective}", *tiny_overrides(speech, run, steps=STEPS, **CKPT)]
    if objective == "mae":  # the unit-target keys are HuBERT's
        args = [a for a in args if not a.startswith(("objective.k=", "objective.kmeans_iters="))]
    return args


def run_cli(args: list[str], cache: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MMSSL_CACHE=str(cache))
    env.pop("MMSSL_FAULT", None)
    if fault:
        env["MMSSL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mmssl.cli", "pretrain", *args], check=False, capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)


def last_losses(run: Path) -> dict[int, float]:
    """step -> loss, the last record of each step (a killed attempt's steps are redone on resume)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def has_checkpoint(run: Path) -> bool:
    return any((run / "checkpoints" / n / "trainer.json").exists() for n in ("last", "last.old"))


def kill_points(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (objective, NAME:N) kill points, seeded, spread over hubert, mae and clip."""
    every = [(obj, f"{p}:{k}") for obj in ("hubert", "mae", "clip") for p in POINTS
             if not (p.startswith("units") and obj != "hubert") for k in range(1, REACHED[p] + 1)]
    rng = random.Random(seed)
    picked = rng.sample(every, n)
    for obj in ("hubert", "mae", "clip"):  # each objective at least once
        if not any(o == obj for o, _ in picked):
            picked[-1] = next(x for x in every if x[0] == obj)
    return picked


class References:
    """The uninterrupted run of each objective, built the first time a test asks for it (the default
    suite needs two of the three)."""

    def __init__(self, root: Path, packed: Path, pairs: Path) -> None:  # noqa: F811
        self.root, self.packed, self.pairs, self.runs = root, packed, pairs, {}

    def __getitem__(self, obj: str) -> Path:
        if obj not in self.runs:
            run = self.root / obj
            r = run_cli(overrides(obj, run, self.packed, self.pairs), self.root / "cache")
            assert r.returncode == 0, r.stderr[-2000:]
            self.runs[obj] = run
        return self.runs[obj]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, packed: Path, pairs: Path) -> References:  # noqa: F811
    return References(tmp_path_factory.mktemp("uninterrupted"), packed, pairs)


def kill_and_resume(obj: str, fault: str, tmp: Path, packed: Path, pairs: Path, ref: Path  # noqa: F811
                    ) -> tuple[dict[int, float], dict[int, float], list[str]]:
    """Kill the run at ``fault``, resume it, -> (its losses, the uninterrupted run's, the towers whose
    exported weights differ from the uninterrupted run's)."""
    run, cache = tmp / "run", tmp / "cache"  # a fresh cache: hubert fits its units again (and can die there)
    args = overrides(obj, run, packed, pairs)
    r = run_cli(args, cache, fault)
    assert r.returncode == -signal.SIGKILL, f"{fault} never reached (rc {r.returncode}): {r.stderr[-1500:]}"
    assert not list(run.glob("checkpoints/*/.tmp-*"))
    r = run_cli(args + ["resume=true"] if has_checkpoint(run) else args, cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    differ = []
    for tower in (ref / "encoders").iterdir():
        a, b = load_file(str(tower / "model.safetensors")), load_file(str(run / "encoders" / tower.name / "model.safetensors"))
        if a.keys() != b.keys() or not all((a[k] == b[k]).all() for k in a):
            differ.append(tower.name)
    return last_losses(run), last_losses(ref), differ


#: the default suite's points (the suite must fit 10 minutes on 2 cores): after the units are fitted and
#: while the step-2 checkpoint is moved aside (hubert), and halfway through writing a two-tower
#: checkpoint (clip); every objective and point kind is in the slow set
DEFAULT_POINTS = [("hubert", "ckpt_aside:1"), ("clip", "ckpt_weights:1")]


@pytest.mark.parametrize("obj, fault", DEFAULT_POINTS)
def test_killed_run_resumes_exactly(obj: str, fault: str, tmp_path: Path, packed: Path, pairs: Path,  # noqa: F811
                                    references: References) -> None:
    resumed, uninterrupted, differ = kill_and_resume(obj, fault, tmp_path, packed, pairs, references[obj])
    assert resumed == uninterrupted and not differ, (fault, resumed, uninterrupted, differ)


@pytest.mark.slow
@pytest.mark.parametrize("obj, fault", kill_points(20, seed=1))
def test_killed_run_resumes_exactly_20_points(obj: str, fault: str, tmp_path: Path, packed: Path,
                                              pairs: Path, references: References) -> None:  # noqa: F811
    resumed, uninterrupted, differ = kill_and_resume(obj, fault, tmp_path, packed, pairs, references[obj])
    assert resumed == uninterrupted and not differ, (fault, resumed, uninterrupted, differ)


def test_full_disk_keeps_the_previous_checkpoint(packed: Path, tmp_path: Path, cache_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from mmssl.train import checkpoint as ckpt

    real, calls = ckpt.finish, []

    def finish(tmp, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half its weights written, then the disk is full
            (tmp / "model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, *a, **kw)

    monkeypatch.setattr(ckpt, "finish", finish)
    run = tmp_path / "run"
    assert main(["pretrain", *tiny_overrides(packed, run, steps=STEPS, **CKPT)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mmssl: error")]
    assert len(err) == 1 and "No space left on device" in err[0] and "last (step 2) is intact" in err[0], err
    assert json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())["step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step_2"]  # no partial one left
    monkeypatch.setattr(ckpt, "finish", real)
    assert main(["pretrain", *tiny_overrides(packed, run, steps=STEPS, **CKPT), "resume=true"]) == 0
    assert sorted(last_losses(run)) == [1, 2, 3, 4]
