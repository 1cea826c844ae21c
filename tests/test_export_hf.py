"""mmssl -> transformers (``mmssl export hf``) and mmssl -> timm (``mmssl export timm``): encoders built by
mmssl's factory, every tensor perturbed, written the way a run writes them (``RUN/encoders/<m>``),
exported, loaded by the peer library (``AutoModel.from_pretrained``, ``timm.create_model``) and compared
layer by layer with ``mmssl.load_encoder(RUN)``; then back into mmssl."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import TOL, max_diff, perturb, report
from omegaconf import OmegaConf

from mmssl.convert import CONVERTERS
from mmssl.errors import MmsslError
from mmssl.export import load_encoder, save_encoder
from mmssl.exporters import EXPORTERS
from mmssl.factory import build_encoder, encoder_config

T = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
ROUND = 1e-5  # the issue's bound for round trips


def _modality_cfg(m: str, **refine: dict[str, Any]) -> dict[str, Any]:
    cfg = OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality" / f"{m}.yaml"))
    for k, v in refine.items():
        cfg[k] = {**(cfg.get(k) or {}), **v}
    return cfg


def _run(tmp: Path, modality: str, size: str, model: dict[str, Any] | None = None, **refine: dict[str, Any]) -> Path:
    """A run directory holding one perturbed encoder, as the trainer's export writes it."""
    torch.manual_seed(0)
    enc = perturb(build_encoder(encoder_config(modality, size, _modality_cfg(modality, **refine), model or {})),
                  params_only=True)
    run = tmp / "run"
    save_encoder(enc.eval(), run / "encoders" / modality)
    return run


def _load_hf(out: Path):
    model, info = T.AutoModel.from_pretrained(out, output_loading_info=True)
    # every weight came from the export: none missing, none left over, none of the wrong shape
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _speech_diffs(enc, model, wav: torch.Tensor) -> list[float]:
    with torch.no_grad():
        r = model(wav, output_hidden_states=True)
        o = enc({"speech": wav}, return_layers=True)
    return [max_diff(o.layers[i], r.hidden_states[i + 1]) for i in range(len(o.layers))] + \
        [max_diff(o.last, r.last_hidden_state)]


SPEECH = {  # name: (size, model overrides, modality refinements, transformers class)
    "micro_group_postnorm": ("micro", {}, {}, "HubertModel"),  # micro's narrow per-layer front-end
    "micro2_layer_prenorm": ("micro", {"depth": 2}, {"adapter": {"frontend_norm": "layer_norm", "frontend_bias": True},
                                                   "backbone": {"norm_first": True}}, "HubertModel"),
    "micro_data2vec_stack": ("micro", {"depth": 2}, {"adapter": {"frontend_norm": "layer_norm", "pos_conv_depth": 3,
                                                                 "pos_conv_kernel": 7}}, "Data2VecAudioModel"),
}


@pytest.mark.parametrize("case", sorted(SPEECH))
def test_speech_export_loads_in_transformers(case: str, tmp_path: Path) -> None:
    size, model, refine, cls = SPEECH[case]
    run = _run(tmp_path, "speech", size, model, **refine)
    out = EXPORTERS["hf"].run(run, tmp_path / "hf", {})
    hf = _load_hf(out)
    assert type(hf).__name__ == cls
    enc = load_encoder(run)
    wav = torch.randn(2, 4000, generator=torch.Generator().manual_seed(1))
    assert report(f"export hf speech {case}", _speech_diffs(enc, hf, wav)) < TOL
    # and back: mmssl -> transformers -> mmssl gives the same tensors and features
    back = load_encoder(CONVERTERS["hf"].run(out, tmp_path / "back", {}))
    ours, theirs = dict(enc.named_parameters()), dict(back.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert max_diff(enc({"speech": wav}).last, back({"speech": wav}).last) < ROUND


def test_speech_export_as_wav2vec2_and_padded_batch(tmp_path: Path) -> None:
    run = _run(tmp_path, "speech", "micro", {"depth": 2}, adapter={"frontend_norm": "layer_norm"})
    hf = _load_hf(EXPORTERS["hf"].run(run, tmp_path / "hf", {"arch": "wav2vec2"}))
    assert type(hf).__name__ == "Wav2Vec2Model"
    enc = load_encoder(run)
    wav = torch.randn(2, 5000, generator=torch.Generator().manual_seed(2))
    lens = torch.tensor([5000, 3100])
    wav[1, 3100:] = 0.0
    with torch.no_grad():
        r = hf(wav, attention_mask=(torch.arange(5000)[None] < lens[:, None]).long(), output_hidden_states=True)
        o = enc({"speech": wav, "speech_len": lens}, return_layers=True)
    real = ~o.pad
    diffs = [max_diff(o.layers[i][real], r.hidden_states[i + 1][real]) for i in range(2)]
    assert report("export hf speech wav2vec2 padded batch", diffs + [max_diff(o.last[real], r.last_hidden_state[real])]) < TOL


@pytest.mark.parametrize("size", ["micro", "tiny"])
def test_image_export_loads_in_transformers(size: str, tmp_path: Path) -> None:
    run = _run(tmp_path, "image", size, {"depth": 2} if size == "tiny" else {})
    out = EXPORTERS["hf"].run(run, tmp_path / "hf", {})
    hf = _load_hf(out)
    assert type(hf).__name__ == "ViTModel"
    enc = load_encoder(run)
    proc = T.AutoImageProcessor.from_pretrained(out)
    assert list(proc.image_mean) == enc.config["adapter"]["mean"] and proc.size["height"] == enc.config["adapter"]["image_size"]
    side = enc.config["adapter"]["image_size"]
    img = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(3))
    px = (img - torch.tensor(proc.image_mean).view(1, 3, 1, 1)) / torch.tensor(proc.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        r = hf(px, output_hidden_states=True)
        o = enc({"image": img}, return_layers=True)
        emb = enc.embed({"image": img})
    diffs = [max_diff(o.layers[i], r.hidden_states[i + 1][:, 1:]) for i in range(len(o.layers))]
    diffs += [max_diff(o.last, r.last_hidden_state[:, 1:]), max_diff(emb, r.pooler_output)]
    assert report(f"export hf image {size}", diffs) < TOL
    back = load_encoder(CONVERTERS["hf"].run(out, tmp_path / "back", {}))
    with torch.no_grad():
        assert max_diff(back({"image": img}).last, o.last) < ROUND and max_diff(back.embed({"image": img}), emb) < ROUND


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_timm_export_round_trip(pool: str, tmp_path: Path) -> None:
    from mmssl.convert.timm import convert_timm_state_dict
    from safetensors.torch import load_file

    run = _run(tmp_path, "image", "micro")
    if pool == "mean":  # a run that pools the patch tokens
        cfg = json.loads((run / "encoders" / "image" / "config.json").read_text())
        (run / "encoders" / "image" / "config.json").write_text(json.dumps({**cfg, "pool": "mean"}))
    out = EXPORTERS["timm"].run(run, tmp_path / "timm", {})
    a = json.loads((out / "timm.json").read_text())
    model = timm.create_model(a["model_name"], pretrained=True, **a["kwargs"],
                              pretrained_cfg_overlay={**a["pretrained_cfg_overlay"], "file": str(out / "model.safetensors")})
    model.eval()
    enc = load_encoder(run)
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mean, std = (torch.tensor(a["pretrained_cfg_overlay"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        feats = model.forward_features((img - mean) / std)
        pooled = model((img - mean) / std)
        o = enc({"image": img})
        emb = enc.embed({"image": img})
    diffs = [max_diff(feats[:, 1:], o.last), max_diff(feats[:, :1], o.prefix), max_diff(pooled, emb)]
    assert report(f"export timm pool={pool}", diffs) < ROUND
    # and back through mmssl's timm converter
    cfg, state = convert_timm_state_dict(load_file(str(out / "model.safetensors")), size="micro",
                                         mean=enc.config["adapter"]["mean"], std=enc.config["adapter"]["std"])
    back = build_encoder({**cfg, "pool": enc.config["pool"]})
    back.load_state_dict({**state, "mask_embedding": enc.mask_embedding.detach()}, strict=True)
    with torch.no_grad():
        assert max_diff(back.eval()({"image": img}).last, o.last) < ROUND


def test_refusals_name_the_nearest_option(tmp_path: Path) -> None:
    cases = [
        (("speech", "micro", {"depth": 1}, {"adapter": {"position": "sinusoidal"}}), "hf", "position='sinusoidal'.*nearest: a position=conv"),
        (("image", "micro", {"depth": 1}, {}), "timm", None),
        (("speech", "micro", {"depth": 1}, {}), "timm", "timm holds image models.*nearest: mmssl export hf"),
        (("eeg", "micro", {"depth": 1}, {}), "hf", "no model that computes mmssl's eeg encoder"),
    ]
    for i, ((m, size, model, refine), fmt, match) in enumerate(cases):
        run = _run(tmp_path / str(i), m, size, model, **refine)
        if match is None:
            EXPORTERS[fmt].run(run, tmp_path / f"out{i}", {})
            continue
        with pytest.raises(MmsslError, match=match):
            EXPORTERS[fmt].run(run, tmp_path / f"out{i}", {})
        assert not (tmp_path / f"out{i}").exists()  # nothing written
    # an image encoder without a CLS token has no ViTModel; HF-converted ViTs (eps 1e-12) no timm ViT
    run = tmp_path / "noprefix" / "run"
    torch.manual_seed(0)
    enc = build_encoder(encoder_config("image", "micro", {**_modality_cfg("image"), "pool": "mean", "num_prefix": 0}, {"depth": 1}))
    save_encoder(enc, run / "encoders" / "image")
    with pytest.raises(MmsslError, match="nearest: num_prefix=1"):
        EXPORTERS["hf"].run(run, tmp_path / "o", {})
    run2 = _run(tmp_path / "eps", "image", "micro", {"depth": 1, "eps": 1e-12})
    with pytest.raises(MmsslError, match="eps 1e-12.*nearest: mmssl export hf"):
        EXPORTERS["timm"].run(run2, tmp_path / "o2", {})


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmssl.cli import main

    run = _run(tmp_path, "speech", "micro", {"depth": 1}, adapter={"position": "sinusoidal"})
    assert main(["export", "hf", str(run), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nearest" in err[0]
    run2 = _run(tmp_path / "i", "image", "micro", {"depth": 1})
    assert main(["export", "timm", str(run2), str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "timm.json").is_file()
    assert main(["export", "onnx", str(run2), str(tmp_path / "x")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["speech", "image"])
def test_base_size_export_matches(modality: str, tmp_path: Path) -> None:
    """The Done-when case: a model=base encoder (HuBERT Base / ViT-B/16 numbers) exported as a run exports it."""
    run = _run(tmp_path, modality, "base")
    hf = _load_hf(EXPORTERS["hf"].run(run, tmp_path / "hf", {}))
    enc = load_encoder(run)
    with torch.no_grad():
        if modality == "speech":
            diffs = _speech_diffs(enc, hf, torch.randn(1, 16000, generator=torch.Generator().manual_seed(5)))
        else:
            img = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
            a = enc.config["adapter"]
            px = (img - torch.tensor(a["mean"]).view(1, 3, 1, 1)) / torch.tensor(a["std"]).view(1, 3, 1, 1)
            r, o = hf(px, output_hidden_states=True), enc({"image": img}, return_layers=True)
            diffs = [max_diff(o.layers[i], r.hidden_states[i + 1][:, 1:]) for i in range(12)]
            diffs += [max_diff(o.last, r.last_hidden_state[:, 1:]), max_diff(enc.embed({"image": img}), r.pooler_output)]
    assert type(hf).__name__ == ("HubertModel" if modality == "speech" else "ViTModel")
    assert report(f"export hf {modality} model=base", diffs) < TOL
