"""sd_further: the distillation term by hand, the MAE defaults it inherits, and the two-run recipe from
the command line with a teacher that never moves."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmssl.cli import main
from mmssl.factory import objective_defaults
from mmssl.objectives.sd_further import distill_loss


def test_distill_loss_by_hand() -> None:
    h_s = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])
    h_t = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [-9.0, 9.0]]])
    pad = torch.tensor([[False, False, True]])
    # (1 + 4) and (1 + 1) over the two real tokens
    assert distill_loss(h_s, h_t, pad).item() == pytest.approx(3.5)


def test_inherits_the_modalitys_mae_defaults() -> None:
    cfg = {"objectives": {"mae": {"mask_ratio": 0.75, "mask_mode": "drop", "trainer": {"lr": 1e-3}},
                          "sd_further": {"trainer": {"warmup_steps": 5}}}}
    d = objective_defaults(cfg, "sd_further")
    assert d["mask_ratio"] == 0.75 and d["mask_mode"] == "drop"
    assert d["trainer"] == {"lr": 1e-3, "warmup_steps": 5}
    assert objective_defaults(cfg, "mae") == cfg["objectives"]["mae"]


def test_point_centre_prediction_is_inherited_and_can_be_turned_off() -> None:
    from mmssl.config import compose, to_dict
    from mmssl.factory import merge_objective_cfg

    def weight(args: list[str]) -> float:
        cfg = compose(["modality=point", "objective=sd_further", *args])
        return merge_objective_cfg("sd_further", to_dict(cfg.objective),
                                   {"point": to_dict(cfg.modality.point)})["locate_weight"]

    assert weight([]) == 0.1  # point's MAE default
    assert weight(["objective.locate_weight=0"]) == 0  # a command-line key, as under objective=mae


def _run(data: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "data=shards", f"data.path={data}", f"run_dir={run}", "trainer.max_steps=2",
            "trainer.batch_size=8", "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.num_workers=0",
            "trainer.progress=false", "trainer.tensorboard=false", "model.depth=2", "model.dim=64",
            "model.heads=2", "model.ffn_dim=128", *extra]


def test_recipe_from_the_command_line(packed: Path, tmp_path: Path, cache_dir: Path) -> None:
    theta0, teacher, student = tmp_path / "theta0", tmp_path / "teacher", tmp_path / "student"
    assert main(_run(packed, theta0, "objective=mae")) == 0
    assert main(_run(packed, teacher, "objective=mae", f"init={theta0}")) == 0
    # without a teacher: a one-line usage error
    assert main(_run(packed, tmp_path / "bad", "objective=sd_further", f"init={theta0}")) == 2
    assert main(_run(packed, student, "objective=sd_further", f"init={theta0}", f"objective.teacher={teacher}",
                     "objective.distill_weight=0.5")) == 0
    rows = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    for r in rows:
        assert r["distill_loss"] > 0
        assert r["loss"] == pytest.approx(r["mae_loss"] + 0.5 * r["distill_loss"], rel=1e-4)
    # the teacher inside the student's checkpoint is exactly the teacher run's export: it never moved
    ck = load_file(str(student / "checkpoints" / "last" / "model.safetensors"))
    t = load_file(str(teacher / "encoders" / "speech" / "model.safetensors"))
    assert all(torch.equal(ck["teacher.module." + k], v) for k, v in t.items())
    # the student started from theta0, not from the teacher
    s0 = load_file(str(theta0 / "encoders" / "speech" / "model.safetensors"))
    s = load_file(str(student / "encoders" / "speech" / "model.safetensors"))
    assert any(not torch.equal(s[k], t[k]) for k in t) and set(s) == set(s0)
