"""The evaluation harness (eval/protocol.py): defaults read from the packaged yaml, the training pool and
label fractions x seeds, the random-init twin (the run's step-0 weights, else a fresh init), the result
schema and file, the pair's towers by kind; and zero-shot's prompts tokenised through the text codec."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from mmssl.encoder import Encoder
from mmssl.eval import protocol
from mmssl.eval.protocol import EncoderEval, PairEval, eval_config, eval_defaults, headline, train_pool
from mmssl.export import save_encoder
from mmssl.factory import build_encoder, encoder_config

ROOT = Path(__file__).resolve().parent.parent
IMAGE = {"pool": "cls", "num_prefix": 1, "backbone": {"norm_first": True},
         "adapter": {"patch_size": 8, "image_size": 32, "position": "sincos"}}
SHAPE = {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64}
EVALUATORS = ("linear_probe", "knn", "finetune", "layer_probe", "retrieval", "zero_shot")


def tiny(seed: int) -> Encoder:
    torch.manual_seed(seed)
    return build_encoder(encoder_config("image", "micro", IMAGE, SHAPE)).eval()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


class Source:
    """What the harness reads of a DataSource: its root."""

    root = Path("/data/somewhere")


# -- defaults ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EVALUATORS)
def test_defaults_are_the_yaml_the_cli_composes(name: str) -> None:
    from mmssl.config import compose, to_dict

    packaged = eval_defaults(name)
    assert packaged == yaml.safe_load((ROOT / "configs" / "eval" / f"{name}.yaml").read_text())
    assert packaged == to_dict(compose([f"eval={name}"]).eval)  # what `mmssl eval` passes today


def test_eval_config_fills_only_what_is_missing() -> None:
    got = eval_config("finetune", {"lr": 0.5, "tune_last": 1, "extra": "kept"})
    assert got["lr"] == 0.5 and got["tune_last"] == 1 and got["extra"] == "kept"
    assert got["batch_size"] == 32 and got["min_steps"] == 64  # the yaml's, not a second default in code
    got["lrs"] = "changed"
    eval_defaults("linear_probe")["lrs"].append(99.0)  # callers get copies: the packaged values stay
    assert eval_defaults("linear_probe")["lrs"] == [0.03, 0.1, 0.3, 1.0]
    with pytest.raises(FileNotFoundError, match="nothing"):
        eval_defaults("nothing")


# -- labelled data -------------------------------------------------------------------------------------
def test_train_pool_is_a_seeded_random_cap() -> None:
    assert torch.equal(train_pool(7, None), torch.arange(7)) and torch.equal(train_pool(7, 0), torch.arange(7))
    a = train_pool(100, 30)
    assert len(a) == 30 and len(set(a.tolist())) == 30 and int(a.max()) < 100
    assert torch.equal(a, train_pool(100, 30))  # seed 0 every time
    assert not torch.equal(a.sort().values, torch.arange(30))  # a random draw, not the first 30
    assert sorted(train_pool(5, 10).tolist()) == list(range(5))  # a cap above n keeps them all


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run with trained weights (seed 1) and its step-0 weights (seed 0)."""
    save_encoder(tiny(1), tmp_path / "run" / "encoders" / "image")
    save_encoder(tiny(0), tmp_path / "run" / "encoders_init" / "image")
    return tmp_path / "run"


def test_label_fractions_times_seeds(run_dir: Path) -> None:
    ev = EncoderEval("knn", run_dir, Source(), {"label_fraction": [0.25, 1.0], "seeds": 3, "seed": 4},
                     torch.device("cpu"))
    assert ev.fractions == [0.25, 1.0] and ev.seeds == [4, 5, 6]
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 2)
    subsets = dict(ev.subsets(labels))
    assert list(subsets) == [0.25, 1.0]
    quarter = subsets[0.25]
    assert [s for s, _ in quarter] == [4, 5, 6]
    for _, idx in quarter:  # stratified: a quarter of each class, at least one of the rare one
        assert torch.bincount(labels[idx], minlength=3).tolist() == [10, 5, 1]
        assert len(set(idx.tolist())) == len(idx)
    assert len({tuple(idx.tolist()) for _, idx in quarter}) == 3  # each seed draws its own subset
    assert all(torch.equal(idx, torch.arange(62)) for _, idx in subsets[1.0])
    assert [f for f, _ in ev.subsets(labels, [1.0, 0.25])] == [1.0, 0.25]
    with pytest.raises(ValueError, match="seeds"):
        EncoderEval("knn", run_dir, Source(), {"seeds": 0}, torch.device("cpu"))


# -- the random-init twin ------------------------------------------------------------------------------
def test_twin_is_the_run_s_step0_weights(run_dir: Path) -> None:
    ev = EncoderEval("linear_probe", run_dir, Source(), {}, torch.device("cpu"))
    assert ev.init_source == "step0"
    assert same_weights(ev.init, tiny(0)) and same_weights(ev.encoder, tiny(1))
    assert not same_weights(ev.init, ev.encoder)
    assert list(ev.twins) == ["", "random_init_"] and ev.twins["random_init_"] is ev.init
    assert not ev.init.training and ev.input_size == 32


def test_twin_without_step0_weights_is_a_fresh_seeded_init(tmp_path: Path) -> None:
    save_encoder(tiny(1), tmp_path / "export")  # an export alone: no encoders_init beside it
    ev = EncoderEval("knn", tmp_path / "export", Source(), {}, torch.device("cpu"))
    assert ev.init_source == "fresh_init_seed0"
    assert same_weights(ev.init, tiny(0)) and not same_weights(ev.init, ev.encoder)


# -- the result ----------------------------------------------------------------------------------------
def test_result_reports_the_largest_fraction_and_writes_the_file(run_dir: Path, tmp_path: Path) -> None:
    ev = EncoderEval("knn", run_dir, Source(), {"label_fraction": [1.0, 0.1], "seeds": 2}, torch.device("cpu"))
    rows = [{"label_fraction": f, "n_train": n, "accuracy": a, "accuracy_std": 0.0, "random_init_accuracy": a / 2,
             "features_baseline_accuracy": 0.3, "chosen_k": [5]} for f, n, a in ((1.0, 60, 0.9), (0.1, 6, 0.5))]
    r = ev.result(rows, num_classes=3)
    assert r["accuracy"] == 0.9 and r["random_init_accuracy"] == 0.45 and r["accuracy_std"] == 0.0
    assert "features_baseline_accuracy" not in r and "chosen_k" not in r  # only the sides asked for
    assert ev.result(rows, ("features_baseline_",))["features_baseline_accuracy"] == 0.3
    assert r["seeds"] == 2 and r["label_fractions"] == rows and r["num_classes"] == 3
    assert (r["evaluator"], r["modality"], r["data"], r["random_init_source"]) == \
        ("knn", "image", "/data/somewhere", "step0")
    assert r["encoder"].endswith("encoders/image")
    assert headline({"accuracy": 1, "accuracy_ci95": 2, "per_layer_accuracy": 3}) == {"accuracy": 1, "accuracy_ci95": 2}

    plotted: list[Path] = []
    path = ev.write(tmp_path / "out", r, lambda res, p: plotted.append(p))
    assert path == tmp_path / "out" / "knn.json" and plotted == [tmp_path / "out" / "knn.png"]
    saved = json.loads(path.read_text())
    assert saved == r and saved["seconds"] >= 0
    assert not list((tmp_path / "out").glob("*.tmp*"))


# -- pairs ---------------------------------------------------------------------------------------------
class Pair(nn.Module):
    def __init__(self, modalities: list[str]) -> None:
        super().__init__()
        self.modalities = modalities
        self.encoders = nn.ModuleDict()


def test_pair_towers_by_kind_and_a_lazy_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []

    def load(path: Any, which: str, device: Any) -> Pair:
        loaded.append(which)
        return Pair(["image", "text"])

    monkeypatch.setattr(protocol, "load_pair", load)
    ev = PairEval("zero_shot", "RUN", Source(), {}, torch.device("cpu"))
    assert ev.towers("text") == ["text"] and ev.towers("image") == ["image"] and ev.towers("audio") == []
    assert loaded == ["encoders"]  # the step-0 pair only when asked for
    assert ev.twins["random_init_"] is ev.init and loaded == ["encoders", "encoders_init"]
    h = ev.header("image")
    assert h["modality"] == "image" and h["modalities"] == ["image", "text"] and h["random_init_source"] == "step0"
    assert ev.ecfg["split"] == "test" and ev.ecfg["prompts"] is None  # configs/eval/zero_shot.yaml
    ev.pair.modalities = ["speech", "image"]
    assert ev.towers("audio") == ["speech"] and ev.towers("text") == []


def test_prompts_are_tokenised_as_the_text_codec_decodes_samples() -> None:
    from mmssl.eval.zero_shot import tokenise
    from mmssl.modalities.text.data import TextCodec, encode_text

    texts = ["a photo of a cat.", "a hot air balloon in the dark, blurry"]
    got = tokenise("text", texts, 6)
    want = TextCodec().collate([{"text": encode_text(s)} for s in texts], 6, None)
    assert got.keys() == want.keys() == {"text", "text_len"}
    assert torch.equal(got["text"], want["text"]) and got["text_len"].tolist() == [6, 6]
    whole = tokenise("text", texts, None)["text"]
    assert whole[0, 0] == encode_text(texts[0])[0] and torch.equal(whole[1], encode_text(texts[1]))
