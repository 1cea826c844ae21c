"""Hugging Face directories -> mmssl: each reference model is built by transformers from a tiny config,
every tensor perturbed away from its initial value, written with ``save_pretrained``, converted with
``mmssl convert ... hf`` (``mmssl.convert.CONVERTERS["hf"]``), and every layer compared with
transformers' own forward (``output_hidden_states=True``) in fp32."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_helpers import SPEECH, TOL, VISION, max_diff, perturb, report
from safetensors.torch import load_file, save_file

from mmssl.convert import CONVERTERS
from mmssl.errors import MmsslError
from mmssl.export import load_encoder, load_pair

T = pytest.importorskip("transformers")


def _convert(src: Path, out: Path, **kv: str) -> Path:
    return CONVERTERS["hf"].run(src, out, kv)


def _save(model, d: Path) -> Path:
    model.eval().save_pretrained(d)
    return d


# -- speech ----------------------------------------------------------------------------------------------
SPEECH_CASES = {
    "hubert_group_postnorm": lambda: T.HubertModel(T.HubertConfig(**SPEECH)),
    "hubert_layer_prenorm_bias": lambda: T.HubertModel(T.HubertConfig(**SPEECH, do_stable_layer_norm=True,
                                                                      feat_extract_norm="layer", conv_bias=True)),
    "wav2vec2_group_postnorm": lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(**SPEECH)),
    "wav2vec2_layer_prenorm": lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(**SPEECH, do_stable_layer_norm=True,
                                                                       feat_extract_norm="layer")),
    "data2vec_audio": lambda: T.Data2VecAudioModel(T.Data2VecAudioConfig(
        **{**SPEECH, "num_conv_pos_embeddings": 3, "conv_pos_kernel_size": 7})),
}


def _speech_diffs(ref, enc, wav: torch.Tensor) -> list[float]:
    with torch.no_grad():
        r = ref(wav, output_hidden_states=True)
        o = enc({"speech": wav}, return_layers=True)
    # transformers' hidden_states: the blocks' input, then each block's output (pre-final-norm)
    return [max_diff(o.layers[i], r.hidden_states[i + 1]) for i in range(len(o.layers))] + \
        [max_diff(o.last, r.last_hidden_state)]


#: in the default suite: one per transformers class; the rest with -m slow
FAST = ("hubert_group_postnorm", "wav2vec2_layer_prenorm", "data2vec_audio")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in sorted(SPEECH_CASES)])
def test_speech_matches_transformers(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = perturb(SPEECH_CASES[case]()).eval()
    out = _convert(_save(ref, tmp_path / "hf"), tmp_path / "mm")
    enc = load_encoder(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["converted_from"].startswith("transformers.") and cfg["adapter"]["frontend_channels"] == list(SPEECH["conv_dim"])
    assert enc.config["backbone"]["norm_first"] == ref.config.do_stable_layer_norm if case != "data2vec_audio" else True
    # the mask embedding is the source's masked_spec_embed
    assert torch.equal(enc.mask_embedding.detach(), ref.masked_spec_embed.detach())
    wav = torch.randn(2, 4000, generator=torch.Generator().manual_seed(3))
    assert report(f"HF {case}", _speech_diffs(ref, enc, wav)) < TOL
    # the comparison can fail: one weight of the last block nudged by 1e-3 shows above the bound
    with torch.no_grad():
        enc.backbone.blocks[-1].ffn.fc2.bias[0] += 1e-3
    assert max(_speech_diffs(ref, enc, wav)) > TOL


def test_speech_layer_norm_padded_batch(tmp_path: Path) -> None:
    """Layer-norm front-ends agree on a padded batch too (transformers with attention_mask), on the real frames."""
    ref = perturb(SPEECH_CASES["wav2vec2_layer_prenorm"]()).eval()
    enc = load_encoder(_convert(_save(ref, tmp_path / "hf"), tmp_path / "mm"))
    wav = torch.randn(2, 6000, generator=torch.Generator().manual_seed(4))
    lens = torch.tensor([6000, 3500])
    wav[1, 3500:] = 0.0
    mask = (torch.arange(6000)[None] < lens[:, None]).long()
    with torch.no_grad():
        r = ref(wav, attention_mask=mask, output_hidden_states=True)
        o = enc({"speech": wav, "speech_len": lens}, return_layers=True)
    real = ~o.pad
    diffs = [max_diff(o.layers[i][real], r.hidden_states[i + 1][real]) for i in range(len(o.layers))]
    assert report("HF wav2vec2 layer-norm padded batch", diffs + [max_diff(o.last[real], r.last_hidden_state[real])]) < TOL


def test_speech_do_normalize_pipeline_on_raw_audio(tmp_path: Path) -> None:
    """A directory whose feature extractor normalises each utterance (``do_normalize``, as wav2vec 2.0
    Large's): transformers' own pipeline (Wav2Vec2FeatureExtractor, then the model with attention_mask)
    against mmssl on the raw padded waveforms; the export writes ``do_normalize`` back."""
    ref = perturb(SPEECH_CASES["wav2vec2_layer_prenorm"]()).eval()
    d = _save(ref, tmp_path / "hf")
    fe = T.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=True)
    fe.save_pretrained(d)
    enc = load_encoder(_convert(d, tmp_path / "mm"))
    assert enc.adapter.waveform_normalize and enc.adapter.waveform_norm_eps == 1e-7
    g = torch.Generator().manual_seed(6)
    # an offset and a gain unlike unit variance, so a missing normalisation shows
    raw = [0.2 * torch.randn(n, generator=g) + 0.07 for n in (6000, 3700)]
    inputs = fe([w.numpy() for w in raw], sampling_rate=16000, padding=True, return_tensors="pt")
    lens = torch.tensor([len(w) for w in raw])
    batch = torch.zeros(2, 6000)
    for i, w in enumerate(raw):
        batch[i, : len(w)] = w
    with torch.no_grad():
        r = ref(inputs["input_values"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
        o = enc({"speech": batch, "speech_len": lens}, return_layers=True)
    real = ~o.pad
    diffs = [max_diff(o.layers[i][real], r.hidden_states[i + 1][real]) for i in range(len(o.layers))]
    assert report("HF wav2vec2 do_normalize pipeline vs mmssl on raw audio",
                  diffs + [max_diff(o.last[real], r.last_hidden_state[real])]) < TOL
    # without the adapter's normalisation the raw audio gives other features: the check can fail
    enc.adapter.waveform_normalize = False
    with torch.no_grad():
        o2 = enc({"speech": batch, "speech_len": lens})
    assert max_diff(o2.last[real], r.last_hidden_state[real]) > 1e-2
    # exported back, transformers' own AutoFeatureExtractor normalises again and the model agrees
    from mmssl.exporters import EXPORTERS

    EXPORTERS["hf"].run(tmp_path / "mm", tmp_path / "back", {})
    fe2 = T.AutoFeatureExtractor.from_pretrained(tmp_path / "back")
    assert fe2.do_normalize is True
    back = T.AutoModel.from_pretrained(tmp_path / "back").eval()
    inputs2 = fe2([w.numpy() for w in raw], sampling_rate=16000, padding=True, return_tensors="pt")
    with torch.no_grad():
        r2 = back(inputs2["input_values"], attention_mask=inputs2["attention_mask"])
    assert max_diff(r2.last_hidden_state[real], r.last_hidden_state[real]) < TOL


def test_speech_legacy_weight_norm_names_and_task_model(tmp_path: Path) -> None:
    """Hub checkpoints written before parametrizations name the position conv's weight norm
    weight_g / weight_v; task models (HubertForCTC) carry the encoder under ``hubert.`` and a head."""
    ref = perturb(T.HubertForCTC(T.HubertConfig(**SPEECH, vocab_size=12))).eval()
    d = _save(ref, tmp_path / "hf")
    sd = load_file(str(d / "model.safetensors"))
    p = "hubert.encoder.pos_conv_embed.conv."
    sd[p + "weight_g"] = sd.pop(p + "parametrizations.weight.original0")
    sd[p + "weight_v"] = sd.pop(p + "parametrizations.weight.original1")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = _convert(d, tmp_path / "mm")
    assert json.loads((out / "config.json").read_text())["skipped"] == ["lm_head"]
    wav = torch.randn(1, 4000, generator=torch.Generator().manual_seed(5))
    assert report("HF HubertForCTC (weight_g/weight_v)", _speech_diffs(ref.hubert, load_encoder(out), wav)) < TOL


# -- images ----------------------------------------------------------------------------------------------
def _vision_diffs(enc, r, img: torch.Tensor, order: torch.Tensor | None = None, **kw) -> list[float]:
    with torch.no_grad():
        o = enc({"image": img}, return_layers=True, **kw)
    hs = [h[:, 1:] for h in r.hidden_states[1:]] + [r.last_hidden_state[:, 1:]]
    ours = list(o.layers) + [o.last]
    if order is not None:  # transformers keeps the visible patches in noise order, mmssl in index order
        hs = [torch.stack([h[b, order[b]] for b in range(h.shape[0])]) for h in hs]
    return [max_diff(a, b) for a, b in zip(ours, hs)] + [max_diff(o.prefix[:, 0], r.last_hidden_state[:, 0])]


def test_vit_matches_transformers(tmp_path: Path) -> None:
    ref = perturb(T.ViTModel(T.ViTConfig(**VISION), use_mask_token=True)).eval()
    d = _save(ref, tmp_path / "hf")
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]}))
    enc = load_encoder(_convert(d, tmp_path / "mm"))
    assert enc.config["adapter"]["mean"] == [0.4, 0.5, 0.6] and enc.config["pool"] == "cls"
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    px = (img - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
    with torch.no_grad():
        r = ref(px, output_hidden_states=True)
    assert report("HF ViTModel", _vision_diffs(enc, r, img)) < TOL
    with torch.no_grad():  # the comparison can fail
        enc.adapter.pos_embed[0, 3, 0] += 1e-3
    assert max(_vision_diffs(enc, r, img)) > TOL
    with torch.no_grad():
        enc.adapter.pos_embed[0, 3, 0] -= 1e-3
    # the mask token replaces patch content before positions, as mmssl's replace masking does
    hide = torch.zeros(2, 16, dtype=torch.bool)
    hide[:, ::3] = True
    with torch.no_grad():
        r = ref(px, bool_masked_pos=hide, output_hidden_states=True)
    assert report("HF ViTModel mask token", _vision_diffs(enc, r, img, token_mask=hide, mask_mode="replace")) < TOL


def test_vit_without_qkv_bias_classifier_model(tmp_path: Path) -> None:
    ref = perturb(T.ViTForImageClassification(T.ViTConfig(**VISION, qkv_bias=False, num_labels=5))).eval()
    out = _convert(_save(ref, tmp_path / "hf"), tmp_path / "mm", mean="0.5,0.5,0.5", std="0.5,0.5,0.5")
    assert json.loads((out / "config.json").read_text())["skipped"] == ["classifier"]
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        r = ref.vit((img - 0.5) / 0.5, output_hidden_states=True)
    assert report("HF ViTForImageClassification (qkv_bias=False)", _vision_diffs(load_encoder(out), r, img)) < TOL


def test_vit_mae_matches_transformers_with_its_masking(tmp_path: Path) -> None:
    """All patches (mask_ratio 0, ordered noise), and 75% hidden: transformers' kept patches equal mmssl's
    drop-mode encoding of the same visible set."""
    ref = perturb(T.ViTMAEModel(T.ViTMAEConfig(**VISION, mask_ratio=0.75))).eval()
    enc = load_encoder(_convert(_save(ref, tmp_path / "hf"), tmp_path / "mm"))
    assert enc.config["adapter"]["position"] == "learned"  # a perturbed table is no longer MAE's sin-cos
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        r = ref((img - 0.5) / 0.5, noise=noise, output_hidden_states=True)
    keep = torch.argsort(noise, 1)[:, :4]
    hidden = torch.ones(2, 16, dtype=torch.bool).scatter(1, keep, False)
    # transformers' row j is patch keep[:, j]; mmssl's visible patches come in index order
    order = torch.argsort(keep, 1)
    diffs = _vision_diffs(enc, r, img, order=order, token_mask=hidden, mask_mode="drop")
    assert report("HF ViTMAEModel (75% masked)", diffs) < TOL
    ref.config.mask_ratio = 0.0
    with torch.no_grad():
        r = ref((img - 0.5) / 0.5, noise=torch.arange(16.0).expand(2, 16), output_hidden_states=True)
    assert report("HF ViTMAEModel (all patches)", _vision_diffs(enc, r, img)) < TOL


def test_vit_mae_fixed_sincos_table_stays_fixed(tmp_path: Path) -> None:
    """An untouched ViTMAE position table is MAE's 2D sin-cos: it converts to position=sincos (not trained
    in continued pretraining, as in MAE), with the same outputs."""
    ref = T.ViTMAEModel(T.ViTMAEConfig(**VISION, mask_ratio=0.0))
    ref.embeddings.patch_embeddings.projection._is_hf_initialized = False  # the table as MAE's release holds it
    ref.embeddings.initialize_weights()
    assert float(ref.embeddings.position_embeddings[0, 1:].abs().max()) > 0.5
    ref = perturb(ref, skip=("position_embeddings",)).eval()
    enc = load_encoder(_convert(_save(ref, tmp_path / "hf"), tmp_path / "mm"))
    assert enc.config["adapter"]["position"] == "sincos"
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        r = ref((img - 0.5) / 0.5, noise=torch.arange(16.0)[None], output_hidden_states=True)
    assert report("HF ViTMAEModel sin-cos", _vision_diffs(enc, r, img)) < TOL


# -- CLIP ------------------------------------------------------------------------------------------------
def _clip():
    return T.CLIPModel(T.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                           image_size=32, patch_size=8), projection_dim=16))


def test_clip_pair_matches_transformers(tmp_path: Path) -> None:
    ref = perturb(_clip()).eval()
    out = _convert(_save(ref, tmp_path / "hf"), tmp_path / "pair")
    pair = load_pair(out)
    assert load_pair(out, which="encoders_init").modalities == pair.modalities  # the random-init twin
    assert pair.logit_scale == pytest.approx(float(ref.logit_scale.detach().exp()), rel=1e-6)
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    ids = torch.tensor([[49406, 10, 20, 30, 49407, 0, 0], [49406, 5, 49407, 0, 0, 0, 0]])
    lens = torch.tensor([5, 3])
    with torch.no_grad():
        vi = ref.vision_model(pixel_values=(img - mean) / std, output_hidden_states=True)
        ti = ref.text_model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
        fi = ref.visual_projection(vi.pooler_output)
        ft = ref.text_projection(ti.pooler_output)
        oi = pair.encoders["image"]({"image": img}, return_layers=True)
        ot = pair.encoders["text"]({"text": ids, "text_len": lens}, return_layers=True)
        diffs = [max_diff(oi.layers[i], vi.hidden_states[i + 1][:, 1:]) for i in range(2)]
        diffs += [max_diff(ot.layers[i][b, :n], ti.hidden_states[i + 1][b, :n]) for i in range(2) for b, n in enumerate(lens)]
        diffs += [max_diff(ot.last[b, :n], ti.last_hidden_state[b, :n]) for b, n in enumerate(lens)]
        diffs += [max_diff(pair.embed("image", {"image": img}), torch.nn.functional.normalize(fi, dim=-1)),
                  max_diff(pair.embed("text", {"text": ids, "text_len": lens}), torch.nn.functional.normalize(ft, dim=-1))]
    assert report("HF CLIPModel (towers, projections)", diffs) < TOL


# -- load_encoder on a directory, bad input ----------------------------------------------------------------
def test_load_encoder_reads_hf_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = perturb(SPEECH_CASES["hubert_group_postnorm"]()).eval()
    d = _save(ref, tmp_path / "hf")
    capsys.readouterr()  # transformers' own progress bars
    enc = load_encoder(d)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Hugging Face HubertModel" in err[0]
    wav = torch.randn(1, 4000, generator=torch.Generator().manual_seed(12))
    assert max(_speech_diffs(ref, enc, wav)) < TOL
    clip = _save(perturb(_clip()), tmp_path / "clip")
    with pytest.raises(MmsslError, match="modality= one of: image, text"):
        load_encoder(clip)
    assert load_encoder(clip, modality="text").modality == "text"


def test_bad_directories_are_one_line(tmp_path: Path) -> None:
    d = _save(T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, vocab_size=50)), tmp_path / "bert")
    with pytest.raises(MmsslError, match="model_type 'bert'.*these convert: HubertModel"):
        _convert(d, tmp_path / "o1")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(MmsslError, match="pickle"):
        _convert(d, tmp_path / "o2")
    s = _save(T.HubertModel(T.HubertConfig(**SPEECH, conv_kernel=(10, 3, 3, 3, 3, 2, 3))), tmp_path / "k")
    with pytest.raises(MmsslError, match="conv_kernel"):
        _convert(s, tmp_path / "o3")
    v = _save(T.ViTModel(T.ViTConfig(**VISION, hidden_act="relu")), tmp_path / "relu")
    with pytest.raises(MmsslError, match="hidden_act='relu'"):
        _convert(v, tmp_path / "o4")
    # a dropped key is named, not silently left at its initial value
    sd = load_file(str(v / "model.safetensors"))
    sd.pop("encoder.layer.1.output.dense.bias")
    save_file(sd, str(v / "model.safetensors"))
    cfg = json.loads((v / "config.json").read_text())
    (v / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.bias"):
        _convert(v, tmp_path / "o5")


def test_cli_convert_hf(tmp_path: Path) -> None:
    from mmssl.cli import main

    d = _save(perturb(T.ViTModel(T.ViTConfig(**VISION))), tmp_path / "hf")
    assert main(["convert", "hf", str(d), str(tmp_path / "out")]) == 0
    assert load_encoder(tmp_path / "out").config["converted_from"] == "transformers.ViTModel"
