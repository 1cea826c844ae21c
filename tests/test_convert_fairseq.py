"""fairseq checkpoints (HuBERT, wav2vec 2.0, data2vec audio) -> mmssl, without fairseq.

The peers' models are built with random weights, every tensor perturbed away from its initial value,
and written in fairseq's layout: the key names are torchaudio's own ``import_fairseq`` mapping inverted
(HuBERT, wav2vec 2.0) and transformers' data2vec-audio conversion map inverted (data2vec), inside a
dict that pickles an ``argparse.Namespace`` (``args``, older releases), an OmegaConf ``DictConfig`` or
a plain dict ``cfg`` (newer), optimizer history, extra state and a HuBERT task state holding a
``fairseq.data.dictionary.Dictionary`` object. Each is converted with ``mmssl convert SRC OUT`` and
every layer's hidden states are compared with the peer's own forward in fp32."""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torchaudio
from omegaconf import OmegaConf
from torchaudio.models.wav2vec2.utils.import_fairseq import _map_key

import mmssl
from mmssl.cli import main

TOL = 1e-4
C, D, H, F, K_POS, G_POS, LAYERS = 32, 64, 4, 128, 16, 4, 2   # tiny: fast, every code path kept
CONV = [(C, 10, 5)] + [(C, 3, 2)] * 4 + [(C, 2, 2)] * 2
CONV_TEXT = f"[({C}, 10, 5)] + [({C}, 3, 2)] * 4 + [({C}, 2, 2)] * 2"


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every tensor moved off its initial value (LayerNorm ones, zero biases, weight-norm gains), so a
    dropped or swapped key shows as a difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.state_dict().values():
            std = float(v.std()) if v.numel() > 1 else 0.0
            v.add_(torch.randn(v.shape, generator=g) * (std if std > 0 else 0.1))


def fairseq_keys(mode: str, bias: bool) -> list[str]:
    """The encoder's fairseq key names (fairseq Wav2Vec2Model / HubertModel modules)."""
    fe = "feature_extractor.conv_layers"
    keys = []
    for i in range(len(CONV)):
        keys += [f"{fe}.{i}.0.weight"] + ([f"{fe}.{i}.0.bias"] if bias else [])
        if mode == "group_norm" and i == 0:
            keys += [f"{fe}.0.2.weight", f"{fe}.0.2.bias"]
        if mode == "layer_norm":
            keys += [f"{fe}.{i}.2.1.weight", f"{fe}.{i}.2.1.bias"]
    keys += [f"{m}.{p}" for m in ("layer_norm", "post_extract_proj", "encoder.layer_norm") for p in ("weight", "bias")]
    keys += ["encoder.pos_conv.0.bias", "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v"]
    for layer in range(LAYERS):
        s = f"encoder.layers.{layer}"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            keys += [f"{s}.{m}.weight", f"{s}.{m}.bias"]
    return keys


def to_fairseq(ta: dict[str, torch.Tensor], mode: str, bias: bool, weight_norm: str) -> dict[str, torch.Tensor]:
    """A torchaudio Wav2Vec2Model state dict in fairseq's names, by torchaudio's own ``_map_key``
    inverted; checks every torchaudio tensor got a fairseq name. ``weight_norm``: ``legacy``
    (weight_g / weight_v) or ``parametrizations`` (original0 / original1) for the position conv."""
    new = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    out: dict[str, torch.Tensor] = OrderedDict()
    for fk in fairseq_keys(mode, bias):
        tk = _map_key(fk)
        last = tk.rsplit(".", 1)[-1]
        if last in new:  # torchaudio's model keeps its weight norm as parametrizations
            tk = tk[: -len(last)] + new[last]
            if weight_norm == "parametrizations":
                fk = fk[: -len(last)] + new[last]
        out[fk] = ta[tk].detach().clone()
    assert len(out) == len(ta), sorted(set(ta) - {_map_key(k) for k in fairseq_keys(mode, bias)})
    return out


def builder_args(mode: str, bias: bool, norm_first: bool) -> dict[str, Any]:
    return dict(extractor_mode=mode, extractor_conv_layer_config=CONV, extractor_conv_bias=bias,
                encoder_embed_dim=D, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=K_POS,
                encoder_pos_conv_groups=G_POS, encoder_num_layers=LAYERS, encoder_num_heads=H,
                encoder_attention_dropout=0.0, encoder_ff_interm_features=F, encoder_ff_interm_dropout=0.0,
                encoder_dropout=0.0, encoder_layer_norm_first=norm_first, encoder_layer_drop=0.0)


def model_cfg(name: str, mode: str, bias: bool, norm_first: bool, **more: Any) -> dict[str, Any]:
    """fairseq's model config keys for the tiny architecture."""
    return {"_name": name, "extractor_mode": "default" if mode == "group_norm" else "layer_norm",
            "encoder_layers": LAYERS, "encoder_embed_dim": D, "encoder_ffn_embed_dim": F,
            "encoder_attention_heads": H, "activation_fn": "gelu", "conv_feature_layers": CONV_TEXT,
            "conv_bias": bias, "conv_pos": K_POS, "conv_pos_groups": G_POS, "layer_norm_first": norm_first,
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.0,
            "dropout_input": 0.0, **more}


def history() -> dict[str, Any]:
    """What a training run leaves beside the model: optimizer history, extra state, optimizer state."""
    return {"optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": 3.25}, "num_updates": 400000}],
            "extra_state": {"epoch": 3, "train_iterator": {"epoch": 3, "iterations_in_epoch": 17},
                            "previous_training_time": 1234.5, "metrics": OrderedDict(train=OrderedDict())},
            "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 5e-4}]}}


class Dictionary:
    """Pickled under fairseq's name (fairseq.data.dictionary.Dictionary): HuBERT's task_state holds its
    label dictionaries as such objects."""

    def __init__(self, n: int, order: list[int] | None = None) -> None:
        # dict.km.txt's order (a frequency-sorted one need not be 0..n-1) after the 4 special symbols
        self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in (order or range(n))]
        self.count = [1] * len(self.symbols)
        self.indices = {s: i for i, s in enumerate(self.symbols)}
        self.bos_index, self.pad_index, self.eos_index, self.unk_index, self.nspecial = 0, 1, 2, 3, 4


def save_with_fairseq_names(obj: Any, path: Path) -> None:
    """torch.save with the stand-in Dictionary pickled as fairseq.data.dictionary.Dictionary."""
    names = ["fairseq", "fairseq.data", "fairseq.data.dictionary"]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType("fairseq.data.dictionary")
    mod.Dictionary = Dictionary
    old = Dictionary.__module__
    try:
        for n in names[:-1]:
            sys.modules[n] = types.ModuleType(n)
        sys.modules[names[-1]] = mod
        Dictionary.__module__ = "fairseq.data.dictionary"
        torch.save(obj, path)
    finally:
        Dictionary.__module__ = old
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def wav(n: int, seed: int, batch: int = 2) -> torch.Tensor:
    return 0.1 * torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))


def fairseq_normalize(x: torch.Tensor) -> torch.Tensor:
    """What fairseq's ``RawAudioDataset.postprocess`` does with ``task.normalize``: each utterance
    through ``F.layer_norm(wav, wav.shape)`` (rows here are whole utterances)."""
    return torch.stack([torch.nn.functional.layer_norm(w, w.shape) for w in x])


def max_diff(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    assert len(ref) == len(out) == LAYERS
    return max(float((a - b).abs().max()) for a, b in zip(ref, out))


def convert(src: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main(["convert", str(src), str(out), *extra]) == 0
    return capsys.readouterr().err


# -- HuBERT Base layout: cfg as an OmegaConf DictConfig, heads, task state ------------------------------
K_UNITS, FINAL = 12, 16
#: the label dictionary's unit order: fairseq's num_classes = len(dictionary) = 4 specials + K_UNITS
ORDER = [3, 0, 11, 5, 1, 2, 4, 10, 6, 9, 7, 8]


def write_hubert_checkpoint(src: Path, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A perturbed torchaudio HuBERT (K_UNITS units + 4 special rows, final_dim FINAL) written at ``src``
    in fairseq's layout: cfg as an OmegaConf DictConfig, the label Dictionary (unit order ORDER) in
    task_state. -> (the torchaudio model in eval mode, the fairseq state dict)."""
    torch.manual_seed(0)
    ta = torchaudio.models.hubert_pretrain_model(
        **builder_args("group_norm", False, False), mask_prob=0.0, mask_selection="static", mask_other=0.0,
        mask_length=10, no_mask_overlap=False, mask_min_space=1, mask_channel_prob=0.0,
        mask_channel_selection="static", mask_channel_other=0.0, mask_channel_length=10,
        no_mask_channel_overlap=False, mask_channel_min_space=1, skip_masked=False, skip_nomask=False,
        num_classes=K_UNITS + 4, final_dim=FINAL, feature_grad_mult=None)
    perturb(ta, seed=seed)
    ta.eval()
    sd = to_fairseq(ta.wav2vec2.state_dict(), "group_norm", False, "legacy")
    sd["mask_emb"] = ta.mask_generator.mask_embedding.detach().clone()
    sd["label_embs_concat"] = ta.logit_generator.label_embeddings.detach().clone()
    sd["final_proj.weight"] = ta.logit_generator.final_proj.weight.detach().clone()
    sd["final_proj.bias"] = ta.logit_generator.final_proj.bias.detach().clone()
    cfg = OmegaConf.create({"model": model_cfg("hubert", "group_norm", False, False, final_dim=FINAL,
                                               logit_temp=0.1, label_rate=50.0),
                            "task": {"_name": "hubert_pretraining", "labels": ["km"], "normalize": False,
                                     "sample_rate": 16000}, "common": {"seed": 1}})
    save_with_fairseq_names({"args": None, "cfg": cfg, "model": sd, **history(),
                             "task_state": {"dictionaries": [Dictionary(K_UNITS, ORDER)]}}, src)
    return ta, sd


@pytest.fixture(scope="module")
def hubert(tmp_path_factory) -> tuple[torch.nn.Module, Path, dict[str, torch.Tensor]]:
    src = tmp_path_factory.mktemp("fairseq") / "hubert_base_tiny.pt"
    ta, sd = write_hubert_checkpoint(src, seed=1)
    return ta, src, sd


def test_hubert_cfg_dictconfig_converts_and_matches(hubert, tmp_path, capsys) -> None:
    ta, src, sd = hubert
    err = convert(src, tmp_path / "out", capsys)
    assert "is a fairseq checkpoint (model + cfg): converting with format=fairseq" in err
    assert "fairseq HuBERT (config from cfg): 2 layers x 64, 4 heads, FFN 128, group_norm front-end, post-norm" in err
    enc = mmssl.load_encoder(tmp_path / "out")
    x = wav(8000, seed=2)
    with torch.no_grad():
        ref, _ = ta.wav2vec2.extract_features(x)
        out = enc({"speech": x}, return_layers=True).layers
    diff = max_diff(ref, out)
    print(f"fairseq-layout HuBERT (DictConfig cfg): max |mmssl - torchaudio| over {LAYERS} layers = {diff:.2e}")
    assert diff < TOL
    assert torch.equal(enc.mask_embedding.detach(), sd["mask_emb"])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["converted_from"] == "fairseq.hubert" and cfg["backbone"]["norm_first"] is False
    assert cfg["adapter"]["frontend_norm"] == "group_norm" and cfg["adapter"]["pos_conv_kernel"] == K_POS


def test_hubert_heads_are_the_checkpoints(hubert, tmp_path, capsys) -> None:
    """heads/hubert.safetensors holds final_proj and label_embs_concat, named as the hubert objective's;
    row u of label_embeddings is unit u's row of label_embs_concat through the label Dictionary (its 4
    special symbols dropped, its unit order undone)."""
    from safetensors.torch import load_file

    _, src, sd = hubert
    err = convert(src, tmp_path / "out", capsys, "format=fairseq", "modality=speech")
    assert "12 unit embeddings: 4 special symbols dropped, rows in unit-id order" in err
    heads = load_file(str(tmp_path / "out" / "heads" / "hubert.safetensors"))
    assert set(heads) == {"final_proj.weight", "final_proj.bias", "label_embeddings"}
    assert sd["label_embs_concat"].shape[0] == K_UNITS + 4 and heads["label_embeddings"].shape[0] == K_UNITS
    rows = [4 + ORDER.index(u) for u in range(K_UNITS)]
    assert torch.equal(heads["label_embeddings"], sd["label_embs_concat"][rows])
    assert not torch.equal(heads["label_embeddings"], sd["label_embs_concat"][4:])  # the order matters here
    assert torch.equal(heads["final_proj.weight"], sd["final_proj.weight"])
    assert torch.equal(heads["final_proj.bias"], sd["final_proj.bias"])
    meta = json.loads((tmp_path / "out" / "heads" / "hubert.json").read_text())
    assert meta["k"] == K_UNITS and meta["final_dim"] == FINAL and meta["logit_temp"] == 0.1


# -- wav2vec 2.0 Large layout: args Namespace, layer_norm front-end with conv bias, pre-norm -------------
@pytest.mark.parametrize("weight_norm", ["legacy", "parametrizations"])
def test_wav2vec2_args_namespace_converts_and_matches(weight_norm, tmp_path, capsys) -> None:
    torch.manual_seed(3)
    ta = torchaudio.models.wav2vec2_model(**builder_args("layer_norm", True, True), aux_num_out=None)
    perturb(ta, seed=4)
    ta.eval()
    sd = to_fairseq(ta.state_dict(), "layer_norm", True, weight_norm)
    g = torch.Generator().manual_seed(5)
    sd["mask_emb"] = torch.rand(D, generator=g)
    # the pretraining heads a release carries, left out on purpose
    sd.update({"quantizer.vars": torch.randn(1, 8, 8, generator=g), "quantizer.weight_proj.weight": torch.randn(8, C),
               "quantizer.weight_proj.bias": torch.randn(8), "project_q.weight": torch.randn(8, 8),
               "project_q.bias": torch.randn(8), "final_proj.weight": torch.randn(8, D), "final_proj.bias": torch.randn(8)})
    args = argparse.Namespace(arch="wav2vec2", task="audio_pretraining", normalize=True, sample_rate=16000,
                              **{k: v for k, v in model_cfg("wav2vec2", "layer_norm", True, True).items() if k != "_name"})
    src = tmp_path / "wav2vec_large_tiny.pt"
    torch.save({"args": args, "model": sd, **history()}, src)
    err = convert(src, tmp_path / "out", capsys)
    assert "fairseq checkpoint (model + args)" in err and "fairseq wav2vec 2.0 (config from args)" in err
    assert "layer_norm front-end with conv bias, pre-norm" in err
    assert "left out: final_proj, project_q, quantizer" in err
    assert "the encoder applies it (adapter.waveform_normalize)" in err
    enc = mmssl.load_encoder(tmp_path / "out")
    # task.normalize: the reference sees fairseq's normalised waveforms, mmssl the raw ones (an offset
    # and a gain, so a missing normalisation shows)
    x = 0.3 * wav(8000, seed=6) + 0.05
    with torch.no_grad():
        ref, _ = ta.extract_features(fairseq_normalize(x))
        out = enc({"speech": x}, return_layers=True).layers
        final_ref, _ = ta(fairseq_normalize(x))
        final = enc({"speech": x}).last
    diff = max(max_diff(ref, out), float((final_ref - final).abs().max()))
    print(f"fairseq-layout wav2vec 2.0 Large-style ({weight_norm} weight norm, args Namespace): max diff {diff:.2e}")
    assert diff < TOL
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["source_waveform_normalize"] is True
    assert cfg["skipped"] == ["final_proj", "project_q", "quantizer"]
    assert not (tmp_path / "out" / "heads").exists()


# -- data2vec audio: cfg as a plain dict, a stack of position convs ---------------------------------------
def test_data2vec_audio_converts_and_matches(tmp_path, capsys) -> None:
    from transformers import Data2VecAudioConfig, Data2VecAudioModel

    depth, kernel = 2, 5  # fairseq: pos_conv_depth 2, conv_pos 10 -> kernel max(3, 10 // 2) = 5
    hf = Data2VecAudioModel(Data2VecAudioConfig(
        hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H, intermediate_size=F, conv_dim=[C] * 7,
        conv_bias=True, num_conv_pos_embeddings=depth, conv_pos_kernel_size=kernel,
        num_conv_pos_embedding_groups=G_POS, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.05)).eval()
    perturb(hf, seed=7)
    # transformers' data2vec-audio conversion map, inverted: transformers name -> fairseq name
    hs = hf.state_dict()
    sd: dict[str, torch.Tensor] = {"mask_emb": hs["masked_spec_embed"]}
    for i in range(7):
        for p in ("weight", "bias"):
            sd[f"feature_extractor.conv_layers.{i}.0.{p}"] = hs[f"feature_extractor.conv_layers.{i}.conv.{p}"]
            sd[f"feature_extractor.conv_layers.{i}.2.1.{p}"] = hs[f"feature_extractor.conv_layers.{i}.layer_norm.{p}"]
    for p in ("weight", "bias"):
        sd[f"layer_norm.{p}"] = hs[f"feature_projection.layer_norm.{p}"]
        sd[f"post_extract_proj.{p}"] = hs[f"feature_projection.projection.{p}"]
        sd[f"encoder.layer_norm.{p}"] = hs[f"encoder.layer_norm.{p}"]
        for j in range(depth):
            sd[f"encoder.pos_conv.{j}.0.{p}"] = hs[f"encoder.pos_conv_embed.layers.{j}.conv.{p}"]
        for layer in range(LAYERS):
            s, t = f"encoder.layers.{layer}", f"encoder.layers.{layer}"
            for a, b in (("self_attn.q_proj", "attention.q_proj"), ("self_attn.k_proj", "attention.k_proj"),
                         ("self_attn.v_proj", "attention.v_proj"), ("self_attn.out_proj", "attention.out_proj"),
                         ("self_attn_layer_norm", "layer_norm"), ("fc1", "feed_forward.intermediate_dense"),
                         ("fc2", "feed_forward.output_dense"), ("final_layer_norm", "final_layer_norm")):
                sd[f"{s}.{a}.{p}"] = hs[f"{t}.{b}.{p}"]
    assert len(sd) == len(hs)  # every transformers tensor placed
    g = torch.Generator().manual_seed(8)
    head_w, head_b = torch.randn(D, D, generator=g), torch.randn(D, generator=g)
    sd.update({"final_proj.weight": head_w, "final_proj.bias": head_b,
               "_ema": torch.randn(3, generator=g)})
    cfg = {"model": model_cfg("data2vec_audio", "layer_norm", True, False, conv_pos=10, pos_conv_depth=depth,
                              average_top_k_layers=8), "task": {"_name": "audio_pretraining", "normalize": True}}
    src = tmp_path / "data2vec_tiny.pt"
    torch.save({"args": None, "cfg": cfg, "model": {k: v.clone() for k, v in sd.items()}, **history()}, src)
    err = convert(src, tmp_path / "out", capsys)
    assert "fairseq data2vec audio (config from cfg)" in err and "position conv 5/4 x2" in err
    enc = mmssl.load_encoder(tmp_path / "out")
    x = 0.3 * wav(8000, seed=9) + 0.05  # raw for mmssl; normalised (task.normalize) for the reference
    with torch.no_grad():
        ref = hf(fairseq_normalize(x), output_hidden_states=True).hidden_states[1:]  # each block's output
        out = enc({"speech": x}, return_layers=True).layers
    diff = max_diff(list(ref), out)
    print(f"fairseq-layout data2vec audio (plain dict cfg): max |mmssl - transformers| = {diff:.2e}")
    assert diff < TOL
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "out" / "heads" / "data2vec_head.safetensors"))
    assert torch.equal(head["weight"], head_w) and torch.equal(head["bias"], head_b)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["skipped"] == ["_ema"]


# -- refusals -----------------------------------------------------------------------------------------------
class WritesAFile:
    """A pickle payload that writes a file when unpickled by an unrestricted loader."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def test_code_running_pickle_is_refused_and_nothing_runs(hubert, tmp_path, capsys) -> None:
    _, _, sd = hubert
    marker = tmp_path / "ran.txt"
    pickle.loads(pickle.dumps(WritesAFile(str(tmp_path / "live.txt"))))  # the payload is live...
    assert (tmp_path / "live.txt").read_text() == "ran"
    src = tmp_path / "evil.pt"
    cfg = {"model": model_cfg("hubert", "group_norm", False, False), "task": {}}
    torch.save({"args": None, "cfg": cfg, "model": sd, "extra_state": {"hook": WritesAFile(str(marker))}}, src)
    for extra in ([], ["format=fairseq"]):
        assert main(["convert", str(src), str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(src) in err and "refused to unpickle exec" in err, err
        assert not marker.exists()  # ...and nothing in the file ran
        assert not (tmp_path / "out").exists()


def test_unknown_model_and_bad_config_are_one_line(hubert, tmp_path, capsys) -> None:
    _, _, sd = hubert
    src = tmp_path / "other.pt"
    torch.save({"args": None, "cfg": {"model": {"_name": "transformer_lm"}}, "model": {"w": torch.zeros(1)}}, src)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the detection note, then the one-line error
    assert len(err) == 2 and "'transformer_lm' has no mmssl converter" in err[1] and "Traceback" not in err[1]
    # the config disagrees with the tensors: named, not silently believed
    cfg = {"model": model_cfg("hubert", "group_norm", False, False, encoder_layers=3), "task": {}}
    torch.save({"args": None, "cfg": cfg, "model": sd}, src)
    assert main(["convert", str(src), str(tmp_path / "out"), "format=fairseq"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoder_layers=3 but its tensors have 2" in err
    assert main(["convert", str(src), str(tmp_path / "out"), "format=fairseq", "modality=image"]) == 2
    assert "format=fairseq makes speech encoders, not modality=image" in capsys.readouterr().err


def test_old_spelling_and_alias_still_work(hubert, tmp_path, capsys) -> None:
    """`mmssl convert hubert SRC OUT` (torchaudio) and `convert fairseq SRC OUT` keep working."""
    ta, src, _ = hubert
    ta_src = tmp_path / "ta.pt"
    torch.save(ta.wav2vec2.state_dict(), ta_src)
    assert main(["convert", "hubert", str(ta_src), str(tmp_path / "a"), f"heads={H}"]) == 0
    assert main(["convert", str(ta_src), str(tmp_path / "b"), f"heads={H}"]) == 0
    assert "a torchaudio state dict: converting with format=torchaudio" in capsys.readouterr().err
    assert main(["convert", "fairseq", str(src), str(tmp_path / "c")]) == 0
    a, b, c = (mmssl.load_encoder(tmp_path / n) for n in "abc")
    x = wav(4000, seed=10, batch=1)
    with torch.no_grad():
        ya, yb, yc = (e({"speech": x}).last for e in (a, b, c))
    assert torch.equal(ya, yb) and float((ya - yc).abs().max()) < TOL
