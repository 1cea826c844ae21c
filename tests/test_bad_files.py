"""Every file a command reads gets one line on failure: a missing, empty, truncated, corrupt,
wrong-kind or wrong-shape file is a ``BadFileError`` naming the file (the API) and exit code 2 with
one line (the CLI); a pickle that would run code is refused without running it."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import mmssl
from mmssl.cli import main
from mmssl.errors import BadFileError, MissingFileError
from mmssl.export import save_encoder
from mmssl.factory import build_encoder, encoder_config

TINY = {"depth": 1, "dim": 32, "heads": 2, "ffn_dim": 64}


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    from mmssl.config import compose, to_dict

    mcfg = to_dict(compose(["modality=image"]).modality.image)
    enc = build_encoder(encoder_config("image", "micro", mcfg, TINY, "mae"))
    out = tmp_path / "export"
    save_encoder(enc, out)
    return out


def one_line_exit_2(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("[mmssl]")]
    assert len(err) == 1 and err[0].startswith("mmssl: error: "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


class Boom:
    """A pickle payload that would write a file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (Path(self.path), "ran"))


@pytest.mark.parametrize("fmt", ["hubert", "timm"])
def test_convert_refuses_bad_checkpoints_in_one_line(fmt: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    raw = good.read_bytes()
    cases = {
        "empty.pt": b"",
        "truncated.pt": raw[: len(raw) // 2],
        "random.pt": bytes(range(256)) * 8,
        "text.pt": b"not a checkpoint at all\n" * 20,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        one_line_exit_2(["convert", fmt, str(tmp_path / name), str(tmp_path / "out")], capsys, str(tmp_path / name))
        assert not (tmp_path / "out").exists()
    one_line_exit_2(["convert", fmt, str(tmp_path / "missing.pt"), str(tmp_path / "out")], capsys, "no such file")
    one_line_exit_2(["convert", fmt, str(tmp_path), str(tmp_path / "out")], capsys, "is a directory")
    # a pickle that would run code: refused by the weights-only loader, and nothing ran
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Boom(str(marker))}, evil)
    one_line_exit_2(["convert", fmt, str(evil), str(tmp_path / "out")], capsys, str(evil), "weights_only")
    assert not marker.exists()
    with evil.open("wb") as f:  # the same as a plain pickle stream
        pickle.dump(Boom(str(marker)), f)
    one_line_exit_2(["convert", fmt, str(evil), str(tmp_path / "out")], capsys, str(evil))
    assert not marker.exists()


def test_load_encoder_names_the_bad_file(export: Path, tmp_path: Path) -> None:
    assert mmssl.load_encoder(export) is not None
    cases = {}
    for name, mutate in {
        "truncated weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200]),
        "empty weights": lambda d: (d / "model.safetensors").write_bytes(b""),
        "corrupt config": lambda d: (d / "config.json").write_text('{"modality": "image",'),
        "config not an object": lambda d: (d / "config.json").write_text("[1, 2]"),
        "config without backbone": lambda d: (d / "config.json").write_text('{"modality": "image"}'),
        "weights of another shape": lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()),
             "backbone": {**json.loads((d / "config.json").read_text())["backbone"], "ffn_dim": 96}})),
    }.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(export, d)
        mutate(d)
        with pytest.raises(BadFileError) as e:
            mmssl.load_encoder(d)
        assert str(d) in str(e.value), (name, e.value)
        cases[name] = str(e.value)
    assert "not valid JSON" in cases["corrupt config"]
    assert "lacks backbone" in cases["config without backbone"]
    assert "do not fit config.json" in cases["weights of another shape"]
    with pytest.raises(MissingFileError):
        mmssl.load_encoder(tmp_path / "nowhere")


def test_eval_and_init_name_the_bad_export(export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (export / "model.safetensors").write_bytes(b"\x00" * 64)
    one_line_exit_2(["eval", "linear-probe", f"encoder={export}"], capsys, str(export / "model.safetensors"))
    (export / "config.json").write_text("")
    one_line_exit_2(["eval", "knn", f"encoder={export}"], capsys, str(export / "config.json"), "empty file")
    run = tmp_path / "run"
    one_line_exit_2(["pretrain", "modality=image", "objective=mae", f"init={export}", f"run_dir={run}"], capsys,
                    str(export / "config.json"))
    assert not run.exists()


def test_resume_names_a_bad_saved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "last").mkdir(parents=True)
    (run / "checkpoints" / "last" / "trainer.json").write_text('{"step": 1}')
    (run / "config.yaml").write_text("trainer: [unclosed\n")
    one_line_exit_2(["pretrain", f"run_dir={run}", "resume=true"], capsys, str(run / "config.yaml"))
    shutil.rmtree(run / "checkpoints")
    one_line_exit_2(["pretrain", f"run_dir={run}", "resume=true"], capsys, "holds no checkpoint")
