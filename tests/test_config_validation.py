"""Config values are checked right after composition: a wrong one exits 2 with a line that names the
key, the value and what is allowed, before anything is built, cached or written."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmssl.cli import main
from mmssl.config import ConfigError, compose
from mmssl.schema import check


@pytest.mark.parametrize("args, key, why", [
    (["trainer.lr=abc"], "trainer.lr='abc'", "expected a number"),
    (["trainer.max_steps=-1"], "trainer.max_steps=-1", "must be >= 0"),
    (["modality=image", "objective=mae", "objective.mask_ratio=1.5"], "objective.mask_ratio=1.5", "must be > 0 and <= 1"),
    (["data=shards", "data.path=/nonexistent"], "data.path=/nonexistent", "no such directory"),
    (["trainer.schedule=linear"], "trainer.schedule='linear'", "expected one of cosine, constant, infinite"),
    (["model.depth=0"], "model.depth=0", "must be >= 1"),
])
def test_bad_values_exit_2_naming_the_key_and_leave_nothing(args: list[str], key: str, why: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["pretrain", *args, f"run_dir={run}", f"cache_dir={cache}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmssl: error: {key}: ") and why in err[0], err
    assert not run.exists() and not cache.exists()


def test_every_default_passes_and_types_are_checked() -> None:
    for mod, obj in (("speech", "hubert"), ("image", "mae"), ("text", "mae"), ("eeg", "data2vec"), ("image", "distill")):
        check(compose([f"modality={mod}", f"objective={obj}"]))
    check(compose(["modality=[image,text]", "objective=clip"]))
    for ok in ("trainer.threads=3", "trainer.threads=auto", "trainer.lr=1", "trainer.clip_grad=null"):
        check(compose([ok]))
    for bad, msg in (("trainer.threads=many", "expected an integer or one of auto"),
                     ("trainer.batch_size=0", "must be >= 1"), ("trainer.batch_size=1.5", "expected an integer"),
                     ("trainer.progress=3", "expected true or false"), ("trainer.eps=0", "must be > 0"),
                     ("data.on_error=ignore", "expected one of skip, raise"), ("trainer.lr=null", "null is not allowed")):
        with pytest.raises(ConfigError, match=msg):
            check(compose([bad]))


def test_every_evaluator_default_passes_and_its_keys_are_checked() -> None:
    for ev in ("linear_probe", "knn", "finetune", "layer_probe", "retrieval", "zero_shot"):
        check(compose([f"eval={ev}"]))
    for ok in ("eval.k=[10,20]", "eval.k=5", "eval.label_fraction=[0.01,1.0]", "eval.label_fraction=1"):
        check(compose(["eval=knn", ok]))
    for ev, bad, msg in (("knn", "eval.k=[10,0]", r"eval.k=\[10, 0\]: \[1\]: must be >= 1"),
                         ("linear_probe", "eval.label_fraction=[0.1,2]", r"\[1\]: must be > 0 and <= 1"),
                         ("linear_probe", "eval.solver=adam", "expected one of sgd, lbfgs"),
                         ("finetune", "eval.mode=qlora", "expected one of full, lora"),
                         ("finetune", "eval.epochs=0", "must be >= 1"),
                         ("retrieval", "eval.split=dev", "expected one of train, val, test")):
        with pytest.raises(ConfigError, match=msg):
            check(compose([f"eval={ev}", bad]))
