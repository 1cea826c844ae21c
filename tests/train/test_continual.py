"""Continual pretraining: schedules, weighted data mixtures (replay), ExPLoRA-style LoRA, init= from a
run built under another objective, and the whole path from the command line."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mmssl.data.loader import DataSource, TrainStream, _seed, batches_per_shard, mixture_probs, resolve_source
from mmssl.train.schedule import lr_factor, phases, trainer_schedule

# -- schedules -----------------------------------------------------------------------------------------


def test_schedules_give_the_expected_rates_at_given_steps() -> None:
    # cosine, 100 steps, 10 of warm-up: (s + 1) / 10, then 0.5 (1 + cos(pi (s - 10) / 90))
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(4, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)              # half-way through the decay
    assert lr_factor(55, 100, 10, "cosine", min_factor=0.1) == pytest.approx(0.55)
    assert lr_factor(40, 100, 10, "cosine") == pytest.approx(0.75)             # cos(pi / 3) = 0.5
    # constant
    assert lr_factor(2, 100, 10, "constant") == pytest.approx(0.3)
    assert lr_factor(77, 100, 10, "constant") == 1.0
    # infinite, 100 steps: warm-up 10, cool-down 20 steps (10..30) from 1 to 0.5, constant 0.5 until 90,
    # linear annealing 90..100 from 0.5 to min 0.1
    kw = {"kind": "infinite", "cooldown": 0.2, "const_factor": 0.5, "anneal": 0.1, "min_factor": 0.1}
    expected = {0: 0.1, 9: 1.0, 10: 1.0, 20: 0.75, 25: 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.75)),
                30: 0.5, 60: 0.5, 89: 0.5, 90: 0.5, 95: 0.3, 99: 0.5 - 0.4 * 0.9}
    for step, want in expected.items():
        assert lr_factor(step, 100, 10, **kw) == pytest.approx(want), step
    assert phases(100, 10, "infinite", 0.2, 0.1) == [("warm-up", 0, 10), ("cool-down", 10, 30),
                                                     ("constant", 30, 90), ("anneal", 90, 100)]
    assert phases(100, 0, "cosine") == [("cosine decay", 0, 100)]


def test_infinite_schedule_reads_the_trainer_keys_and_refuses_bad_ones() -> None:
    t = {"max_steps": 100, "warmup_steps": 10, "schedule": "infinite", "min_lr_factor": 0.1,
         "cooldown_fraction": 0.2, "constant_factor": 0.5, "anneal_fraction": 0.1}
    kw = trainer_schedule(t)
    assert lr_factor(20, **kw) == pytest.approx(0.75) and lr_factor(95, **kw) == pytest.approx(0.3)
    for bad, needle in [({"cooldown_fraction": 0.6, "anneal_fraction": 0.4}, "exceed trainer.max_steps=100"),
                        ({"constant_factor": 0.0}, "trainer.constant_factor must lie in (0, 1]"),
                        ({"anneal_fraction": -0.1}, "trainer.anneal_fraction must lie in [0, 1]"),
                        ({"schedule": "linear"}, "unknown trainer.schedule 'linear'")]:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            trainer_schedule({**t, **bad})


# -- two small EEG data sets ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eeg_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """new: the unseen-montage simulation (train 160 = 8 shards of 20); old: the training montages
    (train 64 = 8 shards of 8). With batches of 4: 5 and 2 batches per shard."""
    from mmssl.modalities.eeg.data import EEGSynthPreset, EEGSynthUnseenPreset

    root = tmp_path_factory.mktemp("eeg")
    out = {}
    for name, cls, n in (("new", EEGSynthUnseenPreset, 160), ("old", EEGSynthPreset, 64)):
        cls().build(root / name, seed=0, sizes={"train": n, "val": 8, "test": 8})
        out[name] = root / name
    return out


def mixture(eeg_sets: dict[str, Path], w_new: float = 0.7, w_old: float = 0.3) -> DataSource:
    cfg = {"name": "default", "seed": 0, "sources": [{"name": "shards", "path": str(eeg_sets["new"]), "weight": w_new},
                                                     {"name": "shards", "path": str(eeg_sets["old"]), "weight": w_old}]}
    return resolve_source(cfg, ["eeg"], "eeg-synth", Path("/nonexistent-cache"))


def test_mixture_gives_the_weights_as_fractions_of_batches(eeg_sets: dict[str, Path]) -> None:
    src = mixture(eeg_sets)
    assert [p.label for p in src.mixture] == ["eeg-synth-unseen-montage", "eeg-synth"]
    assert src.root == eeg_sets["new"]                       # validation and probes: the first source
    assert batches_per_shard(160, 8, 4) == 5 and batches_per_shard(64, 8, 4) == 2
    assert batches_per_shard(10, 3, 2) == pytest.approx((2 + 1 + 1) / 3)  # shards of 4, 3, 3 items
    # drawn per round with probability w / batches per shard: 0.7 / 5 : 0.3 / 2 -> 0.14 : 0.15
    assert mixture_probs(src, 4).tolist() == pytest.approx([0.14 / 0.29, 0.15 / 0.29])
    stream = TrainStream(src, 4, None, seed=0, rank=0, num_roles=1)
    batches = [0, 0]
    for rnd in range(4000):
        which, part, shard = stream.pick(torch.Generator().manual_seed(_seed(0, 0, 0, rnd)))
        assert shard.parent.parent == part.root == eeg_sets[("new", "old")[which]]
        batches[which] += (5, 2)[which]
    assert batches[0] / sum(batches) == pytest.approx(0.7, abs=0.02)
    # the fingerprint covers every source and its weight
    assert len({mixture(eeg_sets, 0.7, 0.3).fingerprint, mixture(eeg_sets, 0.5, 0.5).fingerprint,
                DataSource(src.root, src.meta, ["eeg"]).fingerprint}) == 3


def test_mixed_stream_resumes_to_the_identical_batches(eeg_sets: dict[str, Path]) -> None:
    src = mixture(eeg_sets, 0.5, 0.5)
    full = iter(TrainStream(src, 4, 1000, seed=3, rank=0, num_roles=1))
    run = [next(full) for _ in range(14)]
    assert {int(b["_source"]) for b in run} == {0, 1}          # both sources within a few rounds
    ids = {i: set() for i in (0, 1)}
    for b in run:
        ids[int(b["_source"])] |= set(b["sample_id"].tolist())
    assert max(ids[0]) < 160 <= min(ids[1])                     # the old set's ids offset past the new set's
    cut = 5
    resumed = iter(TrainStream(src, 4, 1000, seed=3, rank=0, num_roles=1, start={0: tuple(run[cut - 1]["_next"].tolist())}))
    for want in run[cut:]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("sources,needle", [
    ("[{name:shards,path:NEW,weight:0}]", "data.sources[0]: weight must be a positive number, got 0"),
    ("[{name:shards,path:NEW,weight:-1}]", "weight must be a positive number"),
    ("[{name:shards,path:NEW},{name:default,preset:speech-synth}]", "data.sources[1]: data set"),
    ("[{name:shards,path:NEW,wieght:1}]", "data.sources[0]: unknown key 'wieght'"),
])
def test_bad_sources_are_one_line_errors(sources: str, needle: str, eeg_sets: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmssl.cli import main

    if "speech-synth" in sources:  # another modality's data: a fake preset folder, nothing generated
        from mmssl.registry import PRESETS

        fake = tmp_path / "speech"
        fake.mkdir()
        (fake / "meta.json").write_text(json.dumps({"name": "speech-synth", "modality": "speech", "splits": {}}))
        monkeypatch.setattr(PRESETS.get("speech-synth"), "ensure", lambda self, cache, seed=0: fake)
    assert main(["pretrain", "modality=eeg", "objective=mae", f"run_dir={tmp_path / 'r'}",
                 f"data.sources={sources.replace('NEW', str(eeg_sets['new']))}"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    if "speech-synth" in sources:
        assert "holds 'speech' data, not eeg" in lines[0]


@pytest.mark.parametrize("args,needle", [
    (["trainer.peft=lora", "trainer.unfreeze_last=9"], "trainer.unfreeze_last must lie in 0..2 (the eeg encoder's depth), got 9"),
    (["trainer.peft=adapters"], "unknown trainer.peft 'adapters'; choose one of: null, lora"),
    (["trainer.schedule=infinite", "trainer.anneal_fraction=1.0"], "exceed trainer.max_steps=2"),
])
def test_bad_trainer_keys_are_one_line_errors(args: list[str], needle: str, eeg_sets: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from mmssl.cli import main

    run = tmp_path / "r"
    assert main(["pretrain", *overrides(run, 2, data="shards", **{"data.path": str(eeg_sets["old"])}), *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("[mmssl]")]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (run / "encoders_init").exists()  # refused before anything was written


# -- LoRA / ExPLoRA -------------------------------------------------------------------------------------
def tiny_mae(depth: int = 3):
    from mmssl.config import compose, to_dict
    from mmssl.factory import build_encoder, build_objective, encoder_config

    cfg = compose(["modality=eeg", "objective=mae", f"model.depth={depth}", "model.dim=32", "model.heads=2",
                   "model.ffn_dim=64"])
    mod = to_dict(cfg.modality.eeg)
    enc = build_encoder(encoder_config("eeg", "micro", mod, to_dict(cfg.model), "mae"))
    return build_objective("mae", to_dict(cfg.objective), {"eeg": enc}, {"eeg": mod})


def test_lora_mode_trains_the_right_parameters_and_exports_merged(eeg_sets: dict[str, Path], tmp_path: Path) -> None:
    from mmssl.data.loader import iter_split
    from mmssl.export import load_encoder, save_encoder
    from mmssl.lora import LoRALinear
    from mmssl.train.trainer import apply_peft, exportable, parameter_counts

    torch.manual_seed(0)
    obj = tiny_mae(depth=3)
    enc = obj.encoders["eeg"]
    t = {"peft": "lora", "unfreeze_last": 1, "lora_rank": 4, "lora_alpha": 8}
    with pytest.raises(ValueError, match=r"trainer.unfreeze_last must lie in 0..3 \(the eeg encoder's depth\), got 4"):
        apply_peft(tiny_mae(depth=3), {**t, "unfreeze_last": 4})
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    info = apply_peft(obj, t)
    assert info == {"lora_layers": 4, "unfreeze_last": 1}       # qkv and proj of blocks 0 and 1
    d, r = 32, 4
    lora = 2 * (r * d + 3 * d * r) + 2 * (r * d + d * r)         # qkv: A [r, d], B [3d, r]; proj: A [r, d], B [d, r]
    last = sum(p.numel() for p in enc.backbone.blocks[2].parameters())
    norms = 2 * 2 * (2 * d) + 2 * d                              # norm1 / norm2 of the two frozen blocks, final norm
    counts = parameter_counts(obj)
    assert counts["trainable_encoder_params"] == lora + last + norms
    assert counts["encoder_params"] == sum(p.numel() for p in before.values()) + lora
    heads = sum(p.numel() for n, p in obj.named_parameters() if not n.startswith("towers."))
    assert counts["trainable_params"] == lora + last + norms + heads  # the decoder stays trainable
    assert not enc.adapter.parameters().__next__().requires_grad

    batch = next(iter(iter_split(DataSource(eeg_sets["new"], json.loads((eeg_sets["new"] / "meta.json").read_text()),
                                            ["eeg"]), "train", 8, max_len=1000)))
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        obj(batch).loss.backward()
        opt.step()
        opt.zero_grad()
    now = dict(enc.named_parameters())
    for n, p in before.items():
        key = n.replace(".attn.qkv.", ".attn.qkv.base.").replace(".attn.proj.", ".attn.proj.base.") \
            if n.startswith(("backbone.blocks.0.", "backbone.blocks.1.")) else n
        trained = n.startswith("backbone.blocks.2.") or (n.startswith("backbone.") and ".norm" in n)
        assert torch.equal(now[key], p) != trained, n           # frozen ones unchanged, trained ones moved
    assert any(m.lora_B.abs().sum() > 0 for m in enc.modules() if isinstance(m, LoRALinear))

    plain = exportable(enc)
    assert plain is not enc and not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert any(isinstance(m, LoRALinear) for m in enc.modules())  # the training tower is not altered
    save_encoder(plain, tmp_path / "export")
    loaded = load_encoder(tmp_path / "export")
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.embed(batch), enc.embed(batch), atol=1e-5)


def test_init_tower_takes_the_source_architecture(tmp_path: Path) -> None:
    """A HuBERT speech encoder (convolutional position) started under MAE keeps its architecture (MAE alone
    would build sinusoidal positions, whose weights do not fit)."""
    from mmssl.config import UsageError, init_tower_config
    from mmssl.config import compose, to_dict
    from mmssl.export import save_encoder
    from mmssl.factory import build_encoder, encoder_config

    small = ["model.depth=1", "model.dim=32", "model.heads=2", "model.ffn_dim=64"]
    cfg = compose(["modality=speech", "objective=mae", *small])
    mod, model = to_dict(cfg.modality.speech), to_dict(cfg.model)
    hub = build_encoder(encoder_config("speech", "micro", mod, model, "hubert"))
    save_encoder(hub, tmp_path / "hubert" / "encoders" / "speech", extra={"objective": "hubert", "step": 5})
    mae = encoder_config("speech", "micro", mod, model, "mae")
    got, note = init_tower_config("speech", str(tmp_path / "hubert"), mae, small, "mae")
    assert got["adapter"]["position"] == "conv" and mae["adapter"]["position"] == "sinusoidal"
    assert "trained with hubert" in note and "adapter.position: 'conv' vs 'sinusoidal'" in note
    tower = build_encoder(got)
    assert set(tower.state_dict()) == set(hub.state_dict())
    assert set(build_encoder(mae).state_dict()) != set(hub.state_dict())  # what init= used to build: no fit
    # explicit command-line keys still apply; a different size is refused
    got2, _ = init_tower_config("speech", str(tmp_path / "hubert"), {**mae, "adapter": {**mae["adapter"], "mask_span": 4}},
                                [*small, "modality.speech.adapter.mask_span=4"], "mae")
    assert got2["adapter"]["mask_span"] == 4 and got2["adapter"]["position"] == "conv"
    with pytest.raises(UsageError, match="keeps its size"):
        init_tower_config("speech", str(tmp_path / "hubert"), {**mae, "size": "tiny"}, ["model=tiny"], "mae")
    with pytest.raises(ValueError, match="no 'eeg' encoder"):
        init_tower_config("eeg", str(tmp_path / "hubert"), mae, [], "mae")


# -- the whole path from the command line ----------------------------------------------------------------
def overrides(run: Path, steps: int, **extra: str) -> list[str]:
    ov = {"modality": "eeg", "objective": "mae", "run_dir": str(run), "trainer.max_steps": str(steps),
          "trainer.batch_size": "4", "trainer.warmup_steps": "1", "trainer.log_every": "1", "trainer.num_workers": "0",
          "trainer.progress": "false", "trainer.tensorboard": "false", "trainer.threads": "1", "model.depth": "2",
          "model.dim": "32", "model.heads": "2", "model.ffn_dim": "64"}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def test_continual_run_from_the_command_line(eeg_sets: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """A on the old data; B = init=A on the new data with 30% replay of the old, infinite schedule, LoRA;
    B's schedule plot; B resumed after the init source is gone gives the uninterrupted run's losses."""
    from mmssl.cli import main
    from mmssl.export import load_encoder

    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["pretrain", *overrides(a, 2, data="shards", **{"data.path": str(eeg_sets["old"]),
                                                                "modality.eeg.adapter.fourier_features": "32"})]) == 0
    sources = (f"data.sources=[{{name:shards,path:{eeg_sets['new']},weight:0.7}},"
               f"{{name:shards,path:{eeg_sets['old']},weight:0.3}}]")
    cont = overrides(b, 6, init=str(a), **{"trainer.schedule": "infinite", "trainer.cooldown_fraction": "0.34",
                                           "trainer.anneal_fraction": "0.34", "trainer.peft": "lora",
                                           "trainer.unfreeze_last": "1", "trainer.ckpt_every": "3"})
    # the encoder is A's (fourier_features 32), not what this command line alone would build (256)
    capsys.readouterr()
    assert main(["pretrain", *cont, sources]) == 0
    err = capsys.readouterr().err
    assert "init: the eeg encoder keeps the architecture of" in err and "adapter.fourier_features: 32 vs 256" in err
    assert "[mmssl] trainable parameters: encoders" in err and "LoRA rank 8 on 2 attention projections" in err
    rows = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # re-warmed from 0 (1 step), cool-down steps 1-2, constant 0.5 at step 3, annealing steps 4-5 (logged at k + 1)
    for step, factor in {1: 1.0, 2: 1.0, 3: 0.75, 4: 0.5, 5: 0.5, 6: 0.25}.items():
        assert lrs[step] == pytest.approx(1e-3 * factor), step
    assert any("source_frac/eeg-synth" in r for r in rows)
    par = next(r for r in rows if r.get("event") == "parameters")
    assert 0 < par["trainable_encoder_params"] < par["encoder_params"]
    assert (b / "plots" / "schedule.png").stat().st_size > 0 and (b / "plots" / "loss.png").exists()
    enc = load_encoder(b)                                     # merged: the plain architecture
    assert enc.config["adapter"]["fourier_features"] == 32 and enc.config["init"] == str(a)
    assert not any("lora" in k for k in enc.state_dict())

    # resume from step 3 with the init source gone: the architecture comes from B's encoders_init record
    cut = tmp_path / "cut"
    shutil.copytree(b, cut, ignore=shutil.ignore_patterns("encoders", "heads", "plots", "metrics.jsonl"))
    shutil.rmtree(cut / "checkpoints" / "last")
    shutil.copytree(cut / "checkpoints" / "step_3", cut / "checkpoints" / "last")
    shutil.rmtree(cut / "checkpoints" / "step_6")
    shutil.rmtree(a)
    resume = [o if not o.startswith("run_dir=") else f"run_dir={cut}" for o in cont] + [sources, "resume=true"]
    assert main(["pretrain", *resume]) == 0
    again = {r["step"]: r["loss"] for r in (json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    first = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(again) == [4, 5, 6]
    for s, loss in again.items():
        assert loss == pytest.approx(first[s], abs=1e-5), s
