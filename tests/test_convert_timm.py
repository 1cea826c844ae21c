"""timm ViT -> mmssl conversion: every block's output and the final tokens must match timm's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import mmssl
from mmssl.convert.timm import convert_timm, convert_timm_state_dict, infer_config
from mmssl.encoder import Encoder

TOL = 1e-4  # fp32
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every tensor (parameters and buffers) off its initial value (LayerNorm ones, zero biases, a
    zero cls token) so a key that is dropped, swapped or left at its mmssl init shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.state_dict().values():
            std = float(v.std()) if v.numel() > 1 else 0.0
            v.add_(torch.randn(v.shape, generator=g) * (std if std > 0 else 0.02))


def _timm(name: str, seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kw)
    _perturb(model, seed + 1)
    return model.eval()


def _convert(model: torch.nn.Module, root: Path, **kw) -> tuple[Encoder, Path]:
    src, out = root / "timm.pt", root / "export"
    torch.save(model.state_dict(), src)
    convert_timm(src, out, **kw)
    return mmssl.load_encoder(out), out


def _timm_outputs(model, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """timm's forward_features on the normalised image, and every block's output (hooks)."""
    blocks: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            feats = model.forward_features((x - MEAN) / STD)
    finally:
        for h in hooks:
            h.remove()
    return feats, blocks


def _image(B: int, H: int, W: int, seed: int) -> torch.Tensor:
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _check(model, enc: Encoder, x: torch.Tensor, final_norm: bool = True) -> None:
    ref, ref_blocks = _timm_outputs(model, x)
    with torch.no_grad():
        out = enc({"image": x}, return_layers=True)
    assert len(out.layers) == len(ref_blocks) == 12
    for i, (a, b) in enumerate(zip(ref_blocks, out.layers)):
        d = float((a[:, 1:] - b).abs().max())
        assert d < TOL, f"block {i}: max abs diff {d}"
    if final_norm:
        assert float((ref[:, 1:] - out.last).abs().max()) < TOL
        assert float((ref[:, :1] - out.prefix).abs().max()) < TOL
    else:  # fc_norm model: forward_features stops before the norm, which mmssl applies per token
        with torch.no_grad():
            assert float((model.fc_norm(ref[:, 1:]) - out.last).abs().max()) < TOL


@pytest.fixture(scope="module")
def tiny():
    return _timm("vit_tiny_patch16_224", seed=0)


def test_vit_tiny_matches_timm(tiny, tmp_path: Path) -> None:
    enc, out = _convert(tiny, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["converted_from"] == "timm.vit" and cfg["size"] == "tiny" and cfg["pool"] == "cls"
    assert cfg["skipped"] == ["head"]
    assert {k: cfg["backbone"][k] for k in ("dim", "depth", "heads", "ffn_dim", "norm_first", "eps")} == \
        {"dim": 192, "depth": 12, "heads": 3, "ffn_dim": 768, "norm_first": True, "eps": 1e-6}
    assert (cfg["adapter"]["patch_size"], cfg["adapter"]["image_size"], cfg["adapter"]["position"]) == \
        (16, 224, "learned")
    _check(tiny, enc, _image(2, 224, 224, seed=3))
    # pool=cls: embed is timm's pre-logits CLS feature
    with torch.no_grad():
        ref = tiny.forward_head(tiny.forward_features((_image(2, 224, 224, 3) - MEAN) / STD), pre_logits=True)
        assert float((enc.embed({"image": _image(2, 224, 224, 3)}) - ref).abs().max()) < TOL


def test_vit_tiny_other_size_resamples_like_timm(tiny, tmp_path: Path) -> None:
    """A 160 x 128 image: mmssl resizes the learned grid like timm's dynamic_img_size models do."""
    enc, _ = _convert(tiny, tmp_path)
    dyn = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    dyn.load_state_dict(tiny.state_dict())
    _check(dyn, enc, _image(2, 160, 128, seed=4))


def test_vit_small_matches_timm(tmp_path: Path) -> None:
    model = _timm("vit_small_patch16_224", seed=5)
    enc, out = _convert(model, tmp_path, size="small")
    assert json.loads((out / "config.json").read_text())["size"] == "small"
    _check(model, enc, _image(1, 224, 224, seed=6))


def test_mae_style_fc_norm_model(tmp_path: Path) -> None:
    """global_pool='avg' (MAE's fine-tuned ViTs): fc_norm becomes the final norm, pool mean."""
    model = _timm("vit_tiny_patch16_224", seed=7, global_pool="avg")
    enc, out = _convert(model, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pool"] == "mean" and cfg["num_prefix"] == 1
    _check(model, enc, _image(2, 224, 224, seed=8), final_norm=False)


def test_mae_pretrain_checkpoint_without_head(tiny, tmp_path: Path) -> None:
    """MAE's pretraining checkpoints: no head, the encoder under ``model`` with the decoder beside it."""
    sd = {k: v for k, v in tiny.state_dict().items() if not k.startswith("head.")}
    sd["mask_token"] = torch.zeros(1, 1, 128)
    sd["decoder_embed.weight"] = torch.zeros(128, 192)
    cfg, state = convert_timm_state_dict(sd)
    assert cfg["size"] == "tiny" and torch.equal(state["backbone.norm.weight"], sd["norm.weight"])
    assert torch.equal(state["prefix"], sd["cls_token"] + sd["pos_embed"][:, :1])
    torch.save({"model": sd, "epoch": torch.tensor(799)}, tmp_path / "mae.pth")
    out = convert_timm(tmp_path / "mae.pth", tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["skipped"] == ["decoder_embed", "mask_token"]
    _check(tiny, mmssl.load_encoder(out), _image(1, 224, 224, seed=11))


def test_errors_name_the_keys(tiny) -> None:
    sd = dict(tiny.state_dict())
    bad = dict(sd, **{"blocks.0.ls1.gamma": torch.ones(192)})
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        convert_timm_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "blocks.3.norm1.weight"}
    with pytest.raises(ValueError, match=r"blocks\.3\.norm1\.weight \(needs blocks\.3\.norm1\.weight\)"):
        convert_timm_state_dict(missing)
    with pytest.raises(ValueError, match="not size 'small'"):
        infer_config(sd, size="small")
    with pytest.raises(ValueError, match="no 'patch_embed.proj.weight'"):
        convert_timm_state_dict({"foo": torch.zeros(1)})


@pytest.mark.slow
def test_vit_base_matches_timm(tmp_path: Path) -> None:
    model = _timm("vit_base_patch16_224", seed=9)
    enc, _ = _convert(model, tmp_path, size="base")
    _check(model, enc, _image(1, 224, 224, seed=10))


def test_cli_convert_timm_with_normalisation(tiny, tmp_path: Path) -> None:
    """`mmssl convert timm SRC OUT mean=... std=...`: augreg-style weights expect 0.5/0.5 inputs."""
    from mmssl.cli import main

    src = tmp_path / "vit.pt"
    torch.save(tiny.state_dict(), src)
    out = tmp_path / "export"
    assert main(["convert", "timm", str(src), str(out), "mean=0.5,0.5,0.5", "std=0.5,0.5,0.5"]) == 0
    enc = mmssl.load_encoder(out)
    assert enc.config["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    x = _image(1, 224, 224, seed=4)
    with torch.no_grad():
        ref = tiny.forward_features((x - 0.5) / 0.5)
        assert float((enc({"image": x}).last - ref[:, 1:]).abs().max()) < TOL
    assert main(["convert", "timm", str(src), str(tmp_path / "e2"), "colour=1"]) == 2
