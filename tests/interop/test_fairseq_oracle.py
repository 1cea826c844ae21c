"""fairseq itself as the oracle: tiny HuBERT, wav2vec 2.0 and data2vec-audio models are built with
fairseq's own task/model classes from fairseq's own command-line parser, every tensor perturbed away
from its initial value, and written by fairseq's own ``Trainer.save_checkpoint`` (what
``checkpoint_utils.save_checkpoint`` calls during training: ``cfg`` as a plain dict, optimizer history,
last optimizer state, task state with HuBERT's ``Dictionary``). ``mmssl convert SRC OUT format=fairseq``
converts the file, ``mmssl.load_encoder`` loads it, and fairseq's own ``extract_features`` at every
layer (``output_layer`` / ``layer``) is compared with mmssl's ``return_layers`` in fp32: max abs
difference < 1e-4. Waveforms for ``task.normalize`` models go through fairseq's own
``RawAudioDataset.postprocess`` (per-utterance layer norm) on the fairseq side only.

Run with ``make test-interop`` (``.venv-interop``: fairseq-fixed 0.12.3.1, transformers 5.25)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

fairseq = pytest.importorskip("fairseq")
pytestmark = pytest.mark.interop

import mmssl
from mmssl.cli import main

TOL = 1e-4
C, D, H, F, LAYERS, K_POS, G_POS = 32, 64, 4, 128, 2, 16, 4
CONV = f"[({C}, 10, 5)] + [({C}, 3, 2)] * 4 + [({C}, 2, 2)] * 2"
K_UNITS, FINAL = 12, 16


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every tensor moved off its initial value (LayerNorm ones, zero biases, weight-norm gains)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                std = float(v.std()) if v.numel() > 1 else 0.0
                v.add_(torch.randn(v.shape, generator=g) * (std if std > 0 else 0.1))


def fairseq_run(tmp: Path, task: str, arch: str, criterion: str, extra: list[str], seed: int
                ) -> tuple[torch.nn.Module, Any, Path]:
    """(model, task, checkpoint path): built as ``fairseq-train DATA --task ... --arch ...`` builds it
    (fairseq's parser -> ``convert_namespace_to_omegaconf`` -> ``setup_task`` / ``build_model``), then
    written by fairseq's Trainer."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    if arch == "data2vec_audio":
        import fairseq.examples.data2vec.models.data2vec_audio  # noqa: F401  (registers the model)
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    (data / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(K_UNITS)))
    argv = [str(data), "--task", task, "--arch", arch, "--criterion", criterion, "--cpu", "--seed", str(seed),
            "--optimizer", "adam", "--lr-scheduler", "polynomial_decay", "--lr", "0.0005",
            "--total-num-update", "100", "--max-update", "100", "--max-tokens", "100000",
            "--encoder-layers", str(LAYERS), "--encoder-embed-dim", str(D), "--encoder-ffn-embed-dim", str(F),
            "--encoder-attention-heads", str(H), "--conv-feature-layers", CONV, "--conv-pos-groups", str(G_POS),
            "--save-dir", str(tmp / "ckpt"), *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(seed)
    t = tasks.setup_task(cfg.task)
    model = t.build_model(cfg.model)
    perturb(model, seed + 1)
    trainer = Trainer(cfg, t, model, t.build_criterion(cfg.criterion))
    path = tmp / f"{arch}.pt"
    trainer.consolidate_optimizer()  # as checkpoint_utils.save_checkpoint does before writing
    trainer.save_checkpoint(str(path), {"epoch": 1, "val_loss": None})
    return model.eval(), t, path


def convert(src: Path, out: Path) -> dict[str, Any]:
    assert main(["convert", str(src), str(out), "format=fairseq"]) == 0
    return json.loads((out / "config.json").read_text())


def fairseq_input(wavs: list[torch.Tensor], normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded batch as fairseq's collater makes it: each utterance through its dataset's
    ``postprocess`` (per-utterance layer norm when task.normalize), then padding (True at pads)."""
    from fairseq.data.audio.raw_audio_dataset import RawAudioDataset

    ds = RawAudioDataset(sample_rate=16000, normalize=normalize)
    feats = [ds.postprocess(w, 16000) for w in wavs]
    n = max(len(w) for w in wavs)
    x = torch.zeros(len(wavs), n)
    pad = torch.ones(len(wavs), n, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, : len(f)] = f
        pad[i, : len(f)] = False
    return x, pad


def mmssl_input(wavs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The raw waveforms as mmssl takes them: zero-padded with lengths (no normalisation here)."""
    n = max(len(w) for w in wavs)
    x = torch.zeros(len(wavs), n)
    for i, w in enumerate(wavs):
        x[i, : len(w)] = w
    return {"speech": x, "speech_len": torch.tensor([len(w) for w in wavs])}


def waves(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # an offset and a gain unlike unit variance, so a missing per-utterance normalisation shows
    return [0.3 * torch.randn(n, generator=g) + 0.05 for n in lengths]


def compare(name: str, fairseq_layers: list[torch.Tensor], fairseq_final: torch.Tensor, out: Any,
            frames: torch.Tensor) -> float:
    """Max abs difference over every layer and the final output, real frames only."""
    assert len(fairseq_layers) == len(out.layers) == LAYERS
    real = torch.arange(out.last.shape[1])[None] < frames[:, None]
    diffs = [float((a - b)[real].abs().max()) for a, b in zip(fairseq_layers, out.layers)]
    diffs.append(float((fairseq_final - out.last)[real].abs().max()))
    diff = max(diffs)
    print(f"\n{name}: max|diff| over {LAYERS} layers + final = {diff:.2e} (per layer {[f'{d:.1e}' for d in diffs]})")
    return diff


def frames_of(lengths: list[int]) -> torch.Tensor:
    from mmssl.modalities.speech.adapter import num_frames

    return num_frames(torch.tensor(lengths))


# -- HuBERT Base layout: group-norm front-end, post-norm, heads -----------------------------------------
def test_hubert_from_fairseq_trainer(tmp_path) -> None:
    model, task, src = fairseq_run(tmp_path, "hubert_pretraining", "hubert", "hubert",
                                   ["--labels", '["km"]', "--label-rate", "50", "--final-dim", str(FINAL),
                                    "--conv-pos", str(K_POS), "--pred-masked-weight", "1.0"], seed=0)
    cfg = convert(src, tmp_path / "out")
    assert cfg["converted_from"] == "fairseq.hubert" and cfg["adapter"]["frontend_norm"] == "group_norm"
    enc = mmssl.load_encoder(tmp_path / "out")
    lengths = [8000]  # group norm over the utterance: fairseq counts padding, so one utterance a batch
    wavs = waves(lengths, seed=2)
    x, _ = fairseq_input(wavs, normalize=False)
    with torch.no_grad():
        ref = [model.extract_features(x, padding_mask=None, mask=False, output_layer=l + 1)[0] for l in range(LAYERS)]
        final, _ = model.extract_features(x, padding_mask=None, mask=False)
        out = enc(mmssl_input(wavs), return_layers=True)
    assert compare("fairseq HubertModel (Trainer.save_checkpoint, cfg dict)", ref, final, out, frames_of(lengths)) < TOL
    # the heads are fairseq's: final_proj and label_embs_concat (len(dictionary) = K + 4 specials rows)
    from safetensors.torch import load_file

    heads = load_file(str(tmp_path / "out" / "heads" / "hubert.safetensors"))
    sd = model.state_dict()
    assert torch.equal(heads["final_proj.weight"], sd["final_proj.weight"])
    assert torch.equal(heads["final_proj.bias"], sd["final_proj.bias"])
    meta = json.loads((tmp_path / "out" / "heads" / "hubert.json").read_text())
    d = task.dictionaries[0]
    rows = [d.index(str(u)) for u in range(K_UNITS)]
    assert meta["k"] == K_UNITS and torch.equal(heads["label_embeddings"], sd["label_embs_concat"][rows])


def check_layers(name: str, model: torch.nn.Module, enc: Any, lengths: list[int], seed: int) -> None:
    """A padded batch of a task.normalize model: fairseq's whole pipeline (each waveform layer-normed by
    its dataset, then padded, then the model) against mmssl on the raw padded waveforms (its adapter's
    ``waveform_normalize``)."""
    wavs = waves(lengths, seed)
    x, pad = fairseq_input(wavs, normalize=True)
    with torch.no_grad():
        ref = [model.extract_features(x, pad, mask=False, layer=l)["x"] for l in range(LAYERS)]
        final = model.extract_features(x, pad, mask=False)["x"]
        out = enc(mmssl_input(wavs), return_layers=True)
    assert compare(name, ref, final, out, frames_of(lengths)) < TOL


# -- wav2vec 2.0 Large layout: layer-norm front-end with conv bias, pre-norm, task.normalize ----------
def test_wav2vec2_large_style_normalize_padded(tmp_path) -> None:
    model, _, src = fairseq_run(tmp_path, "audio_pretraining", "wav2vec2", "wav2vec",
                                ["--extractor-mode", "layer_norm", "--layer-norm-first", "--conv-bias", "--normalize",
                                 "--conv-pos", str(K_POS), "--final-dim", str(FINAL), "--latent-vars", "8",
                                 "--latent-groups", "2", "--infonce", "--log-keys", '["prob_perplexity"]'], seed=3)
    cfg = convert(src, tmp_path / "out")
    assert cfg["adapter"]["waveform_normalize"] is True and cfg["source_waveform_normalize"] is True
    enc = mmssl.load_encoder(tmp_path / "out")
    assert enc.adapter.waveform_normalize
    check_layers("fairseq pipeline, Wav2Vec2Model Large-style, normalize=True, padded batch, vs mmssl on raw "
                 "waveforms", model, enc, [8000, 5123], seed=4)


# -- data2vec audio: position stack, layer-norm front-end, task.normalize ------------------------------
def test_data2vec_audio_normalize_padded(tmp_path) -> None:
    model, _, src = fairseq_run(tmp_path, "audio_pretraining", "data2vec_audio", "model",
                                ["--extractor-mode", "layer_norm", "--conv-bias", "--normalize", "--conv-pos", "10",
                                 "--pos-conv-depth", "2", "--average-top-k-layers", "2", "--log-keys",
                                 '["ema_decay","target_var","pred_var"]'], seed=5)
    cfg = convert(src, tmp_path / "out")
    assert cfg["converted_from"] == "fairseq.data2vec_audio" and cfg["adapter"]["pos_conv_depth"] == 2
    assert cfg["adapter"]["waveform_normalize"] is True
    enc = mmssl.load_encoder(tmp_path / "out")
    check_layers("fairseq Data2VecAudioModel, normalize=True, equal lengths", model, enc, [8000, 8000], seed=6)
    # padded: fairseq zeroes padding once, before its stack of position convs, so its second conv reads
    # values the first computed from padding; mmssl re-zeroes before each conv (a padded utterance gets
    # the features it has alone). The unpadded utterance of the batch agrees; the padded one differs
    # near its end, and through attention a little everywhere (printed, not asserted).
    lengths = [8000, 6001]
    wavs = waves(lengths, seed=7)
    x, pad = fairseq_input(wavs, normalize=True)
    with torch.no_grad():
        ref = [model.extract_features(x, pad, mask=False, layer=l)["x"] for l in range(LAYERS)]
        out = enc(mmssl_input(wavs), return_layers=True)
    n = int(frames_of(lengths)[1])
    full = max(float((a[0] - b[0]).abs().max()) for a, b in zip(ref, out.layers))
    padded = max(float((a[1, :n] - b[1, :n]).abs().max()) for a, b in zip(ref, out.layers))
    print(f"fairseq Data2VecAudioModel, padded batch: unpadded utterance max|diff| {full:.2e}, "
          f"padded utterance {padded:.2e} (fairseq's position stack reads its padding)")
    assert full < TOL
