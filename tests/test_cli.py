"""The command line's user errors: exit code 2 and one line naming the valid choices."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mmssl.cli import main
from mmssl.registry import MODALITIES, OBJECTIVES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmssl.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["pretrain", "modality=klingon"], "unknown modality 'klingon'; choose one of: eeg, image, mri, point, speech, text"),
    (["pretrain", "objective=telepathy"], "unknown objective 'telepathy'; choose one of: clap, clip, cloob, data2vec, distill, hubert, mae, pqae, sd_further"),
    (["pretrain", "trainer.bogus=1"], "unknown key 'trainer.bogus'"),
    (["pretrain", "nonsense=3"], "unknown key 'nonsense'"),
    (["pretrain", "modality=point", "modality.point.backbone.bogus=1"], "unknown key 'modality.point.backbone.bogus'"),
    (["pretrain", "model=gigantic"], "unknown model 'gigantic'; choose one of: base, micro, small, tiny"),
    (["pretrain", "resume=true"], "resume=true needs run_dir"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["eval", "linear-probe"], "needs encoder=PATH"),
])
def test_errors_are_one_line_with_exit_2(args: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mmssl: error: ") and needle in lines[0]


def test_error_from_a_real_process_has_no_traceback() -> None:
    r = run_cli("pretrain", "modality=klingon", "objective=hubert")
    assert r.returncode == 2
    assert r.stderr.strip() == "mmssl: error: unknown modality 'klingon'; choose one of: eeg, image, mri, point, speech, text"


def test_unsupported_pair_names_the_supported_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter without frame-level unit features cannot be trained with HuBERT: a plug-in
    modality registered from outside shows the message (and the plug-in path)."""
    from mmssl.config import ConfigError, check_pair, compose
    from mmssl.modalities.base import ModalityAdapter
    from mmssl.modalities.speech import SpeechAdapter

    class NoUnits(SpeechAdapter):
        name = "nounits"
        unit_features = ModalityAdapter.unit_features  # the base class: no unit features

    # registered for this test only: a leaked plug-in would join every audio pair list
    MODALITIES.names()
    monkeypatch.setitem(MODALITIES._items, "nounits", NoUnits)
    assert OBJECTIVES.get("hubert").supports(["nounits"]) is not None
    from omegaconf import open_dict

    cfg = compose([])
    with open_dict(cfg):
        cfg.modality["nounits"] = cfg.modality["speech"]
        del cfg.modality["speech"]
    with pytest.raises(ConfigError, match="unsupported pair.*supported: hubert with modality=.*speech"):
        check_pair(cfg)


def test_list_shows_choices(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "objective=hubert: modality=eeg, modality=image, modality=mri, modality=point, modality=speech, modality=text" in out
    assert "micro (4x256)" in out


def test_sweep_expansion_uses_hydra_grammar() -> None:
    from mmssl.cli import expand_sweep

    jobs = expand_sweep(["trainer.seed=0,1", "trainer.lr=1e-4,3e-4", "model=micro"])
    assert len(jobs) == 4
    assert ["trainer.seed=1", "trainer.lr=0.0003", "model=micro"] in jobs


def test_a_bug_is_not_printed_as_a_user_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """An unregistered name is a user error (one line, no KeyError quotes); a bare KeyError is a bug and
    keeps its traceback; a plain ValueError prints one line that says where it was raised."""
    from mmssl import cli
    from mmssl.errors import UnknownNameError

    def raise_(exc: BaseException) -> None:
        raise exc

    with pytest.raises(UnknownNameError) as e:
        MODALITIES.get("klingon")
    assert isinstance(e.value, KeyError) and str(e.value).startswith("unknown modality 'klingon'")
    monkeypatch.setitem(cli.COMMANDS, "pretrain", lambda args: raise_(KeyError("feature_rate")))
    with pytest.raises(KeyError, match="feature_rate"):
        main(["pretrain"])
    monkeypatch.setitem(cli.COMMANDS, "pretrain", lambda args: raise_(ValueError("bad width 3")))
    assert main(["pretrain"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmssl: error: bad width 3 [ValueError at tests/test_cli.py:"), lines
