"""torchaudio HuBERT Base -> mmssl conversion: every layer's output must match torchaudio's."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torchaudio

import mmssl
from mmssl.cli import main
from mmssl.convert.hubert import convert_hubert_state_dict, infer_config
from mmssl.encoder import Encoder
from mmssl.factory import build_encoder

torch.set_num_threads(2)
TOL = 1e-4  # fp32; the measured gap is ~5e-6
POS = "encoder.transformer.pos_conv_embed.conv"


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every tensor off its initial value (LayerNorm ones, zero biases, weight-norm gains) so a
    key that is dropped, swapped or left at its mmssl init shows up as a difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.state_dict().values():
            std = float(v.std()) if v.numel() > 1 else 0.0
            v.add_(torch.randn(v.shape, generator=g) * (std if std > 0 else 0.02))


def _max_diff(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    assert len(ref) == len(out) == 12
    return max(float((a - b).abs().max()) for a, b in zip(ref, out))


@pytest.fixture(scope="module")
def hubert() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchaudio.models.hubert_base()
    _perturb(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def converted(hubert, tmp_path_factory) -> tuple[Encoder, Path]:
    """`mmssl convert hubert SRC OUT` on a state dict saved with torch.save, loaded back."""
    root = tmp_path_factory.mktemp("hubert")
    src, out = root / "hubert_base.pt", root / "export"
    torch.save(hubert.state_dict(), src)
    assert main(["convert", "hubert", str(src), str(out)]) == 0
    src.unlink()  # 380 MB
    enc = mmssl.load_encoder(out)
    # ModalityAdapter's class-level `content_position = None` shadows the ConvPosition submodule that
    # nn.Module keeps in _modules; if it is None here, the Encoder silently skips HuBERT's position conv.
    assert enc.adapter.content_position is not None, "speech adapter lost its content_position module"
    return enc, out


def _wav(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    wav = 0.1 * torch.randn(len(lengths), max(lengths), generator=g)
    wav = wav * (torch.arange(wav.shape[1])[None] < lens[:, None])  # zero padding, as a collate does
    return wav, lens


def test_export_config(converted) -> None:
    _, out = converted
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["converted_from"] == "torchaudio.hubert" and cfg["modality"] == "speech"
    assert {k: cfg["backbone"][k] for k in ("dim", "depth", "heads", "ffn_dim", "norm_first")} == \
        {"dim": 768, "depth": 12, "heads": 12, "ffn_dim": 3072, "norm_first": False}
    a = cfg["adapter"]
    assert (a["frontend_norm"], a["frontend_channels"], a["pos_conv_kernel"], a["pos_conv_groups"]) == \
        ("group_norm", 512, 128, 16)


def test_matches_torchaudio_unpadded(hubert, converted) -> None:
    enc, _ = converted
    wav, _ = _wav([16000, 16000], seed=2)
    with torch.no_grad():
        ref, _ = hubert.extract_features(wav)
        out = enc({"speech": wav}, return_layers=True).layers
    assert _max_diff(ref, out) < TOL


def test_matches_torchaudio_padded(hubert, converted) -> None:
    """A padded batch, on the real frames. torchaudio's first-layer GroupNorm takes its statistics over
    the padded length, so torchaudio's features of a padded utterance depend on the padding; mmssl's
    takes them over the real samples only (the utterance gets what it gets alone). So the full-length
    utterance is compared with torchaudio's padded batch and the short one with torchaudio run on it
    alone, which is what both models compute for an unpadded input."""
    enc, _ = converted
    wav, lens = _wav([24000, 13000], seed=3)
    with torch.no_grad():
        ref, ref_len = hubert.extract_features(wav, lens)
        o = enc({"speech": wav, "speech_len": lens}, return_layers=True)
        alone, _ = hubert.extract_features(wav[1:, :13000])
    assert torch.equal(ref_len, (~o.pad).sum(1))
    n = int(ref_len[1])
    assert _max_diff([r[0] for r in ref], [h[0] for h in o.layers]) < TOL
    assert _max_diff([r[0] for r in alone], [h[1, :n] for h in o.layers]) < TOL


def test_unknown_or_missing_key_is_named(hubert) -> None:
    sd = dict(hubert.state_dict())
    with pytest.raises(ValueError, match=r"encoder\.transformer\.layers\.0\.attention\.extra\.weight"):
        convert_hubert_state_dict({**sd, "encoder.transformer.layers.0.attention.extra.weight": torch.zeros(1)})
    missing = "encoder.transformer.layers.3.attention.k_proj.bias"
    with pytest.raises(ValueError, match=r"backbone\.blocks\.3\.attn\.qkv\.bias.*" + missing.replace(".", r"\.")):
        convert_hubert_state_dict({k: v for k, v in sd.items() if k != missing})


def test_pretrain_model_keys(hubert, converted) -> None:
    """hubert_pretrain_base(): the encoder under ``wav2vec2.``, its mask embedding, heads skipped."""
    emb = torch.randn(768)
    sd = {f"wav2vec2.{k}": v for k, v in hubert.state_dict().items()}
    sd.update({"mask_generator.mask_embedding": emb, "logit_generator.label_embeddings": torch.randn(100, 256),
               "logit_generator.final_proj.weight": torch.randn(256, 768),
               "logit_generator.final_proj.bias": torch.randn(256)})
    _, state = convert_hubert_state_dict(sd)
    assert torch.equal(state["mask_embedding"], emb)
    plain = converted[0].state_dict()
    assert state.keys() == plain.keys()
    assert all(torch.equal(state[k], plain[k]) for k in plain if k != "mask_embedding")


def test_legacy_weight_norm_keys(hubert) -> None:
    """torch.nn.utils.weight_norm's weight_g / weight_v (older torchaudio) convert to the same model."""
    pos = hubert.encoder.transformer.pos_conv_embed.conv
    conv = torch.nn.Conv1d(768, 768, 128, padding=64, groups=16)
    with torch.no_grad():
        conv.weight.copy_(pos.weight)  # the effective weight g * v / |v|
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # legacy weight_norm is deprecated
        torch.nn.utils.weight_norm(conv, name="weight", dim=2)  # new g = |w|, v = w: other tensors
    sd = {k: v for k, v in hubert.state_dict().items() if ".parametrizations." not in k}
    sd[f"{POS}.weight_g"], sd[f"{POS}.weight_v"] = conv.weight_g.detach(), conv.weight_v.detach()
    assert not torch.equal(sd[f"{POS}.weight_g"], hubert.state_dict()[f"{POS}.parametrizations.weight.original0"])
    cfg, state = convert_hubert_state_dict(sd)
    assert cfg == infer_config(dict(hubert.state_dict()))
    enc = build_encoder(cfg)
    enc.load_state_dict(state, strict=True)
    wav, _ = _wav([8000], seed=4)
    with torch.no_grad():
        ref, _ = hubert.extract_features(wav)
        out = enc.eval()({"speech": wav}, return_layers=True).layers
    assert _max_diff(ref, out) < TOL


def test_small_prenorm_layer_norm_model() -> None:
    """The other torchaudio family (large / xlarge): layer_norm feature extractor, pre-norm blocks, here
    tiny, with conv biases and uneven conv widths. No GroupNorm, so padded batches match directly."""
    widths = [32, 32, 48, 48, 48, 48, 64]
    shapes = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2
    torch.manual_seed(5)
    ref_model = torchaudio.models.wav2vec2_model(
        extractor_mode="layer_norm", extractor_conv_layer_config=[(c, k, s) for c, (k, s) in zip(widths, shapes)],
        extractor_conv_bias=True, encoder_embed_dim=64, encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=12, encoder_num_heads=4,
        encoder_attention_dropout=0.0, encoder_ff_interm_features=96, encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0, encoder_layer_norm_first=True, encoder_layer_drop=0.0, aux_num_out=None)
    _perturb(ref_model, seed=6)
    ref_model.eval()
    cfg, state = convert_hubert_state_dict(ref_model.state_dict(), heads=4)
    assert cfg["backbone"]["norm_first"] and cfg["adapter"]["frontend_channels"] == widths
    assert (cfg["adapter"]["frontend_norm"], cfg["adapter"]["frontend_bias"]) == ("layer_norm", True)
    enc = build_encoder(cfg)
    enc.load_state_dict(state, strict=True)
    wav, lens = _wav([16000, 9000], seed=7)
    with torch.no_grad():
        ref, ref_len = ref_model.extract_features(wav, lens)
        o = enc.eval()({"speech": wav, "speech_len": lens}, return_layers=True)
    assert torch.equal(ref_len, (~o.pad).sum(1))
    real = ~o.pad
    assert max(float((a - b).abs()[real].max()) for a, b in zip(ref, o.layers)) < TOL
