"""A tiny contrastive run through the CLI, as a user runs it: pack image-caption pairs from a CSV, pretrain
`clip` a few steps, then `eval retrieval` and `eval zero-shot` against the step-0 twin; `cloob` on the
same data; and a clear error for pairs without data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmssl
from mmssl.cli import main
from mmssl.export import load_pair

SMALL = ["model.depth=1", "model.dim=32", "model.heads=2", "model.ffn_dim=64", "objective.embed_dim=16",
         "trainer.num_workers=0", "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=1",
         "trainer.warmup_steps=1", "trainer.batch_size=8"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 one-colour squares with captions naming the colour, packed through `mmssl data pack`."""
    src = tmp_path_factory.mktemp("pairs_src")
    rng = np.random.default_rng(0)
    rows = ["file,caption,label"]
    for i in range(60):
        name = list(COLOURS)[i % 3]
        img = np.zeros((32, 32, 3), np.uint8)
        x, y = rng.integers(0, 16, 2)
        img[y:y + 16, x:x + 16] = COLOURS[name]
        Image.fromarray(img).save(src / f"{i}.png")
        rows.append(f"{i}.png,a {name} square,{name}")
    (src / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("pairs") / "shards"
    assert main(["data", "pack", "modality=[image,text]", f"src={src / 'pairs.csv'}", f"out={out}", "shards=2",
                 "val=0.2", "test=0.4"]) == 0
    return out


def test_clip_pretrain_then_retrieval_and_zero_shot(pairs: Path, tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "clip"
    assert main(["pretrain", "modality=[image,text]", "objective=clip", "data=shards", f"data.path={pairs}",
                 f"run_dir={run}", "trainer.max_steps=3", *SMALL]) == 0
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in steps)
    assert all(abs(r["logit_scale"] - 1 / 0.07) < 0.1 for r in steps) and steps[0]["pairs"] == 8
    for d in ("encoders", "encoders_init"):
        assert sorted(p.name for p in (run / d).iterdir()) == ["image", "text"]
    assert json.loads((run / "heads/contrastive.json").read_text())["modalities"] == ["image", "text"]
    # the step-0 head differs from the trained one: it is the random-init twin's
    trained, init = load_pair(run), load_pair(run, "encoders_init")
    assert not torch.equal(trained.head.proj["text"].net.weight, init.head.proj["text"].net.weight)
    with pytest.raises(ValueError, match="several towers"):
        mmssl.load_encoder(run)
    assert mmssl.load_encoder(run, modality="text").adapter.name == "text"

    assert main(["eval", "retrieval", f"encoder={run}", "data=shards", f"data.path={pairs}"]) == 0
    r = json.loads((run / "eval/retrieval.json").read_text())
    assert r["modalities"] == ["image", "text"] and r["n_captions"] == 3 and r["n_items"] == 24
    for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert 0.0 <= r[k] <= 1.0 and 0.0 <= r["random_init_" + k] <= 1.0
    # the caption gallery holds each distinct caption once: with 3 of them every image finds its own in the
    # top 5, trained or not (with one gallery entry per item, 8 copies of a wrong caption could fill it)
    assert r["i2t_R@5"] == 1.0 and r["random_init_i2t_R@5"] == 1.0 and r["n_groups"] == 24
    assert (run / "eval/retrieval.png").stat().st_size > 0

    out = tmp_path / "zs"
    assert main(["eval", "zero-shot", f"encoder={run}", "data=shards", f"data.path={pairs}", f"out={out}"]) == 0
    z = json.loads((out / "zero_shot.json").read_text())
    assert z["num_classes"] == 3 and z["n_items"] == 24 and 0.0 <= z["accuracy"] <= 1.0
    assert 0.0 <= z["random_init_accuracy"] <= 1.0 and (out / "zero_shot.png").exists()


def test_cloob_runs_and_pairs_need_paired_data(pairs: Path, tmp_path: Path, cache_dir: Path, capsys) -> None:
    run = tmp_path / "cloob"
    assert main(["pretrain", "modality=[image,text]", "objective=cloob", "data=shards", f"data.path={pairs}",
                 f"run_dir={run}", "trainer.max_steps=2", *SMALL]) == 0
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["inv_tau"] for r in steps if "loss" in r] == pytest.approx([30.0, 30.0])
    # a single-modality data set cannot feed a pair
    assert main(["pretrain", "modality=[image,text]", "objective=clip", "data=digits", f"run_dir={tmp_path / 'x'}",
                 "trainer.max_steps=1", *SMALL]) == 2
    assert "not image+text pairs" in capsys.readouterr().err
    assert main(["pretrain", "modality=[image,text]", "objective=clap", *SMALL]) == 2
    assert "pairs audio" in capsys.readouterr().err


def test_two_process_clip_run(pairs: Path, tmp_path: Path, cache_dir: Path) -> None:
    """torchrun, 2 gloo processes: embeddings gathered with gradients, every parameter that needs a gradient
    gets one (DDP refuses a second step otherwise), rank 0 exports both towers and the head."""
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", MMSSL_CACHE=str(cache_dir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m",
           "mmssl.cli", "pretrain", "modality=[image,text]", "objective=clip", "data=shards", f"data.path={pairs}",
           f"run_dir={run}", "trainer.max_steps=3", "trainer.threads=1", *SMALL, "trainer.batch_size=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in rows] == [1, 2, 3] and rows[0]["pairs"] == 8  # 2 ranks x 4: the global batch
    assert (run / "heads" / "contrastive.safetensors").exists() and (run / "encoders" / "text").is_dir()
