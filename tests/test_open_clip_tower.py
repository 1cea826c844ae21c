"""open_clip towers behind the Encoder contract (mmssl/towers/open_clip.py): the pooled outputs equal
open_clip's own ``encode_image`` / ``encode_text`` on the same inputs, weights load from a whole-model
file in both of open_clip's layouts, exports round-trip, and the contrastive objective trains over them.

A small open_clip architecture (``model_cfg``) keeps this fast; every weight is perturbed away from its
initial value so that dropped or misplaced tensors change the outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from open_clip.model import CLIP, CustomTextCLIP
from safetensors.torch import save_file

from mmssl.encoder import Encoder
from mmssl.export import load_encoder, save_encoder
from mmssl.factory import build_encoder, build_objective, encoder_config
from mmssl.modalities.text.data import TextCodec, encode_text
from mmssl.towers.open_clip import OpenClipTower

MODEL_CFG = {"embed_dim": 24,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
STRINGS = ["a photo of a cat.", "wow!! it's 2024 -- <b>bold</b> claims", "x",
           " ".join(["many words"] * 60)]  # longer than the context: both truncate to [sot, 75 ids, eot]


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[CLIP, Path]:
    """A perturbed small open_clip CLIP and its state dict saved as safetensors."""
    torch.manual_seed(0)
    model = _perturbed(CLIP(**MODEL_CFG), 1)
    path = tmp_path_factory.mktemp("oc") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _cfg(modality: str, weights: Path | None = None, **extra) -> dict:
    return {"format_version": 1, "modality": modality, "size": "micro",
            "open_clip": {"model_cfg": MODEL_CFG, "weights": None if weights is None else str(weights), **extra}}


def _text_batch(strings: list[str]) -> dict[str, torch.Tensor]:
    """mmssl's text pipeline: open_clip BPE through mmssl's tokenizer, cropped and padded by the codec."""
    return TextCodec().collate([{"text": encode_text(s)} for s in strings], 77, None)


def _openai_normalise(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def test_text_tower_equals_encode_text(ref) -> None:
    model, path = ref
    tower = build_encoder(_cfg("text", path)).eval()
    assert isinstance(tower, OpenClipTower) and tower.dim == 24 and tower.depth == 2
    batch = _text_batch(STRINGS)
    tokens = open_clip.tokenize(STRINGS)
    assert torch.equal(batch["text"], tokens)  # mmssl's ids are open_clip's, truncation included
    want = model.encode_text(tokens)
    torch.testing.assert_close(tower.embed(batch), want, rtol=1e-5, atol=1e-6)
    # a batch without text_len, cut to its longest text: the same ids, so the same output
    short = _text_batch(STRINGS[:3])
    assert short["text"].shape[1] < 77
    torch.testing.assert_close(tower.embed({"text": short["text"]}), want[:3], rtol=1e-5, atol=1e-6)

    out = tower(batch, return_layers=True)
    torch.testing.assert_close(out.prefix[:, 0], want)
    assert out.last.shape == (4, 77, 32) and len(out.layers) == 2
    assert out.pad.sum(1).tolist() == [77 - int(n) for n in batch["text_len"]]
    # block i's mean over each text's own tokens (sot .. eot), from open_clip's intermediates by hand
    inter = model.forward_intermediates(text=open_clip.tokenize(STRINGS), text_indices=None,
                                        intermediates_only=True)["text_intermediates"]
    for i in range(2):
        hand = torch.stack([inter[i][b, :int(n)].mean(0) for b, n in enumerate(batch["text_len"])])
        torch.testing.assert_close(tower.embed(batch, layer=i), hand, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer must be"):
        tower.embed(batch, layer=2)
    with pytest.raises(ValueError, match="exceeds the open_clip context length 77"):
        tower.embed({"text": torch.ones(1, 78, dtype=torch.long)})


@torch.no_grad()
def test_image_tower_equals_encode_image(ref) -> None:
    model, path = ref
    tower = build_encoder(_cfg("image", path)).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    want = model.encode_image(_openai_normalise(x))
    torch.testing.assert_close(tower.embed({"image": x}), want, rtol=1e-5, atol=1e-6)
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(tower.embed({"image": u8}), tower.embed({"image": u8.float() / 255}))
    out = tower({"image": x}, return_layers=True)
    torch.testing.assert_close(out.prefix[:, 0], want)
    assert out.last.shape == (3, 16, 32) and not out.pad.any() and out.index[0, 5].tolist() == [1, 1]
    # patch tokens only (the class token is the pooled one): block 0's mean, by hand
    inter = model.visual.forward_intermediates(_openai_normalise(x), indices=None, output_fmt="NLC",
                                               intermediates_only=True)["image_intermediates"]
    torch.testing.assert_close(tower.embed({"image": x}, layer=0), inter[0].mean(1), rtol=1e-5, atol=1e-6)
    p = tower.config["preprocessing"]
    assert (p["max_len"], p["image_size"], p["patch_size"]) == (32, 32, 8)
    assert p["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    with pytest.raises(ValueError, match=r"crop to its preprocessing max_len \(32\)"):
        tower.embed({"image": torch.rand(1, 3, 48, 48)})


def test_weights_layouts_and_mismatch(ref, tmp_path: Path) -> None:
    """A CustomTextCLIP (``text.*``) training checkpoint read with torch.load(weights_only=True): its
    ``state_dict`` entry with DDP's ``module.`` prefix. A model of another width: a one-line error."""
    torch.manual_seed(3)
    custom = _perturbed(CustomTextCLIP(**MODEL_CFG), 4)
    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in custom.state_dict().items()}}, ckpt)
    tower = build_encoder(_cfg("text", ckpt)).eval()
    strings = STRINGS[:2]
    with torch.no_grad():
        torch.testing.assert_close(tower.embed(_text_batch(strings)), custom.encode_text(open_clip.tokenize(strings)),
                                   rtol=1e-5, atol=1e-6)
    # untouched towers differ: the weights did load
    assert not torch.allclose(build_encoder(_cfg("text")).eval().embed(_text_batch(strings)).detach(),
                              tower.embed(_text_batch(strings)).detach())

    wide = {**MODEL_CFG, "vision_cfg": {**MODEL_CFG["vision_cfg"], "width": 48}}
    other = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in CLIP(**wide).state_dict().items()}, str(other))
    with pytest.raises(ValueError, match="do not fit the image tower") as e:
        build_encoder(_cfg("image", other))
    assert "\n" not in str(e.value) and "conv1.weight" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_encoder(_cfg("image", tmp_path / "absent.safetensors"))


def test_export_round_trip(ref, tmp_path: Path) -> None:
    """save_encoder / load_encoder rebuild the tower from config.json (the resolved model config, no
    weights file: the copy used for initialisation may be gone) and load model.safetensors."""
    model, path = ref
    copy = tmp_path / "init.safetensors"
    copy.write_bytes(path.read_bytes())
    towers = {m: build_encoder(_cfg(m, copy)).eval() for m in ("image", "text")}
    for m, t in towers.items():
        save_encoder(t, tmp_path / "run" / "encoders" / m)
    copy.unlink()
    x = torch.rand(2, 3, 32, 32)
    batch = {"image": x, **_text_batch(STRINGS[:2])}
    for m, t in towers.items():
        cfg = json.loads((tmp_path / "run" / "encoders" / m / "config.json").read_text())
        assert cfg["open_clip"]["weights"] is None and cfg["open_clip"]["initialised_from"] == str(copy)
        assert cfg["open_clip"]["model_cfg"] == MODEL_CFG and cfg["pool"] == "cls"
        back = load_encoder(tmp_path / "run", modality=m)
        assert isinstance(back, OpenClipTower)
        assert all(k.startswith("visual." if m == "image" else "text.") for k in back.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(back.embed(batch), t.embed(batch))
    with torch.no_grad():
        torch.testing.assert_close(towers["image"].embed(batch), model.encode_image(_openai_normalise(x)))


def test_config_dispatch_and_named_model() -> None:
    """The modality config's ``open_clip`` entry reaches the encoder config and picks the tower; without
    one the mmssl Encoder is built and the key is absent. A named model has open_clip's shapes
    (built on the meta device: no memory, no init time)."""
    mcfg = {"pool": "mean", "adapter": {"patch_size": 8, "image_size": 32}}
    plain = encoder_config("image", "micro", mcfg)
    assert "open_clip" not in plain and isinstance(build_encoder(plain), Encoder)
    assert "open_clip" not in encoder_config("image", "micro", {**mcfg, "open_clip": {"model": None, "weights": None}})
    cfg = encoder_config("image", "micro", {**mcfg, "open_clip": {"model_cfg": MODEL_CFG, "weights": None}})
    assert cfg["open_clip"]["model_cfg"] == MODEL_CFG and isinstance(build_encoder(cfg), OpenClipTower)

    with torch.device("meta"):
        ref = open_clip.create_model("ViT-B-32", pretrained=None, device="meta")
        towers = {m: build_encoder({"modality": m, "open_clip": {"model": "ViT-B-32"}}) for m in ("image", "text")}
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "logit_scale"}
    have = {**{k: tuple(v.shape) for k, v in towers["image"].state_dict().items()},
            **{k[len("text."):]: tuple(v.shape) for k, v in towers["text"].state_dict().items()}}
    assert have == want
    assert towers["image"].config["preprocessing"]["max_len"] == 224
    assert towers["text"].config["preprocessing"]["max_len"] == 77
    assert (towers["image"].dim, towers["text"].dim, towers["image"].config["backbone"]["dim"]) == (512, 512, 768)
    assert towers["image"].config["adapter"]["patch_size"] == 32  # the tower's, not the image yaml's 16
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        build_encoder({"modality": "image", "open_clip": {"model": "ViT-Nope"}})
    with pytest.raises(ValueError, match="open_clip towers exist for image, text"):
        build_encoder({"modality": "speech", "open_clip": {"model_cfg": MODEL_CFG}})


def test_contract_and_contrastive_objective(ref) -> None:
    """What evaluators read (adapter baseline and name, prefix, backbone_cfg) and a CLIP step of the
    lead's contrastive objective over two open_clip towers; masking is refused."""
    _, path = ref
    towers = {m: build_encoder(_cfg(m, path)) for m in ("image", "text")}
    x = torch.rand(4, 3, 32, 32)
    batch = {"image": x, **_text_batch(STRINGS)}
    img, txt = towers["image"], towers["text"]
    assert (img.adapter.name, txt.adapter.name) == ("image", "text")
    pixels = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
    torch.testing.assert_close(img.adapter.baseline_features(batch), pixels)
    bow = txt.adapter.baseline_features(batch)
    assert bow.shape == (4, 512) and torch.allclose(bow.sum(1), torch.ones(4))
    assert img.prefix is img.visual.class_embedding and txt.prefix is not None
    # multi-crop views at the tower's patch size: global 32 x 32, local half the side (16)
    views = img.adapter.views(batch, 1, 1)
    assert views[0]["image"].shape == (4, 3, 32, 32) and views[1]["image"].shape == (4, 3, 16, 16)
    assert img.backbone_cfg.layer_drop == 0 and img.backbone_cfg.depth == 2
    assert not any(k.startswith("adapter") or "marker" in k for k in img.state_dict())
    with pytest.raises(TypeError, match="eval finetune"):  # not silently wrong layer-wise lr decay
        _ = img.backbone
    with pytest.raises(ValueError, match="take no token mask"):
        img(batch, token_mask=torch.zeros(4, 16, dtype=torch.bool))

    pytest.importorskip("mmssl.objectives.contrastive")
    obj = build_objective("clip", {"embed_dim": 16}, towers)
    out = obj(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert img.visual.conv1.weight.grad.abs().sum() > 0 and txt.text.token_embedding.weight.grad.abs().sum() > 0
