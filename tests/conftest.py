"""Shared fixtures: a small packed speech data set (real files through `mmssl data pack`, including
broken ones), an isolated cache, and deliberate thread counts (2 cores)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(2)
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = Path(os.environ.get("MMSSL_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["MMSSL_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def audio_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 words x 40 utterances as 22.05 kHz wav/flac files in class folders, plus 3 bad files."""
    from mmssl.modalities.speech import synth

    root = tmp_path_factory.mktemp("audio")
    wanted = {0: "sa-ti", 2: "mo-ke-shu", 9: "fo-ni-tae-pu"}
    counts = {k: 0 for k in wanted}
    for u in synth.generate("train", seed=1):
        if all(c == 40 for c in counts.values()):
            break
        if u.label in wanted and counts[u.label] < 40:
            d = root / wanted[u.label]
            d.mkdir(exist_ok=True)
            # store at 22.05 kHz so packing must resample
            import torchaudio

            w = torchaudio.functional.resample(torch.from_numpy(u.wav), 16000, 22050).numpy()
            ext = "flac" if counts[u.label] % 2 else "wav"
            sf.write(d / f"u{counts[u.label]:03d}.{ext}", w, 22050)
            counts[u.label] += 1
    (root / "sa-ti" / "broken.wav").write_bytes(b"RIFF....not really a wave file")
    sf.write(root / "mo-ke-shu" / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(root / "fo-ni-tae-pu" / "tiny.wav", np.zeros(100, dtype=np.float32), 16000)
    return root


@pytest.fixture(scope="session")
def packed(tmp_path_factory: pytest.TempPathFactory, audio_tree: Path, cache_dir: Path) -> Path:
    from mmssl.cli import main

    out = tmp_path_factory.mktemp("packed") / "shards"
    assert main(["data", "pack", "modality=speech", f"src={audio_tree}", f"out={out}", "shards=4",
                 "val=0.2", "test=0.2"]) == 0
    return out


def tiny_overrides(data: Path, run_dir: Path, steps: int = 4, **extra: str) -> list[str]:
    """A fast CPU pretraining configuration on the packed fixture data."""
    ov = {"data": "shards", "data.path": str(data), "run_dir": str(run_dir), "trainer.max_steps": str(steps),
          "trainer.batch_size": "8", "trainer.warmup_steps": "1", "trainer.log_every": "1",
          "trainer.num_workers": "0", "trainer.progress": "false", "trainer.tensorboard": "false",
          "objective.k": "20", "objective.kmeans_iters": "10", "model.depth": "2", "model.dim": "64",
          "model.heads": "2", "model.ffn_dim": "128", "modality.speech.adapter.pos_conv_kernel": "16",
          "modality.speech.adapter.pos_conv_groups": "4"}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.fixture(scope="session")
def bench_smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``bench/run_all.py --device cpu --smoke`` run (what ``make bench-gpu`` runs on a device, at
    smoke sizes): every benchmark's JSON and log and ``summary.json`` in the returned folder. The
    benchmark smoke tests read it, so each benchmark runs once per session."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("bench-smoke")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "bench" / "run_all.py"), "--device", "cpu", "--smoke",
                           "--out", str(out)], check=False, cwd=root, capture_output=True, text=True, timeout=900)
    (out / "run_all.stdout").write_text(proc.stdout + proc.stderr)
    return out
