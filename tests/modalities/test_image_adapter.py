"""Image adapter: MAE's patchify / norm_pix / masking / loss, positions, leak-free masking, views."""
from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import torch
from mmssl.modalities.image.adapter import ImageAdapter, sincos_2d
from omegaconf import OmegaConf
from timm.layers import resample_abs_pos_embed

from mmssl.factory import build_encoder, encoder_config
from mmssl.types import Tokens

PLAIN = {"patch_size": 2, "image_size": 4, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "norm_pix": False}


def _image_cfg() -> dict:
    return OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality/image.yaml"))


# -- MAE's reference formulas (facebookresearch/mae, util/pos_embed.py and models_mae.py) ----------------
def _mae_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _mae_1d(embed_dim // 2, grid[0])
    emb_w = _mae_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def test_targets_are_maes_patchify_order() -> None:
    """A 4 x 4 image, patch 2: hand-written target of the top-right patch (row 0, col 1)."""
    ad = ImageAdapter(8, PLAIN)
    img = torch.arange(48, dtype=torch.float32).view(1, 3, 4, 4) / 100  # value = (c*16 + y*4 + x) / 100
    t = ad.targets({"image": img})
    assert t.shape == (1, 4, 12) and ad.target_dim == 12
    # order (row in patch, col in patch, channel); the patch covers y in {0, 1}, x in {2, 3}
    want = [c * 16 + y * 4 + x for y in (0, 1) for x in (2, 3) for c in range(3)]
    assert torch.allclose(t[0, 1], torch.tensor(want, dtype=torch.float32) / 100)
    # and the patches run row-major over the grid: patch 2 is (row 1, col 0), starting at y=2, x=0
    assert torch.allclose(t[0, 2, :3], torch.tensor([8.0, 24.0, 40.0]) / 100)


def test_targets_normalise_input_then_each_patch() -> None:
    cfg = dict(PLAIN, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    raw = ImageAdapter(8, cfg).targets({"image": torch.full((1, 3, 4, 4), 0.5)})
    assert torch.allclose(raw[0, 0, :3], torch.tensor([0.0, 0.4, 0.4]))  # (0.5 - mean) / std per channel
    ad = ImageAdapter(8, dict(cfg, norm_pix=True))
    img = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = ad.targets({"image": img})
    ref = ImageAdapter(8, cfg).targets({"image": img})
    # MAE: (target - mean) / (var + 1e-6) ** .5 with torch's unbiased var, per patch
    want = (ref - ref.mean(-1, keepdim=True)) / (ref.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert torch.allclose(t, want, atol=1e-6)
    # hand value: a patch [0, 1, 0, 1, ...] of 12 values has mean 0.5 and unbiased var 3/11
    flat = torch.tensor([0.0, 1.0] * 6)
    hand = (flat - 0.5) / (3 / 11 + 1e-6) ** 0.5
    img2 = flat.view(2, 2, 3).permute(2, 0, 1)[None]  # flat is in (y, x, c) order, the patch order
    t2 = ImageAdapter(8, dict(PLAIN, image_size=2, norm_pix=True)).targets({"image": img2})
    assert torch.allclose(t2[0, 0], hand, atol=1e-5)


def test_recon_loss_is_maes() -> None:
    ad = ImageAdapter(8, PLAIN)
    pred = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [3.0, 3.0]]])
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    # per-token MSE: 1, 2, 9 -> masked mean (1 + 9) / 2
    assert float(ad.recon_loss(pred, target, mask)) == pytest.approx(5.0)


def _tokens(pad: torch.Tensor) -> Tokens:
    B, N = pad.shape
    return Tokens(torch.zeros(B, N, 4), torch.zeros(B, N, 4), pad, torch.zeros(B, N, 2, dtype=torch.long))


def test_make_mask_counts_round_down_like_mae() -> None:
    ad = ImageAdapter(8, PLAIN)
    g = torch.Generator().manual_seed(0)
    for n, ratio in ((64, 0.75), (49, 0.75), (196, 0.75), (10, 0.33)):
        m = ad.make_mask(_tokens(torch.zeros(8, n, dtype=torch.bool)), ratio, g)
        keep = int(n * (1 - ratio))  # MAE: len_keep = int(L * (1 - mask_ratio))
        assert (m.sum(1) == n - keep).all()
        assert len({tuple(r.tolist()) for r in m}) == 8  # every sample draws its own mask
    # padding: counted out of the ratio, never hidden
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[1, 12:] = True
    pad[2, 4:] = True
    m = ad.make_mask(_tokens(pad), 0.75, torch.Generator().manual_seed(1))
    assert not (m & pad).any()
    assert m.sum(1).tolist() == [20 - 5, 12 - 3, 4 - 1]  # keep int(L / 4) of L real tokens
    # the generator decides: same seed, same mask
    a = ad.make_mask(_tokens(pad), 0.5, torch.Generator().manual_seed(2))
    b = ad.make_mask(_tokens(pad), 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_sincos_equals_maes_formula_and_positions_ignore_content() -> None:
    for dim, g in ((16, 3), (32, 4)):
        assert torch.allclose(sincos_2d(g, g, dim), torch.from_numpy(_mae_2d(dim, g)).float(), atol=1e-6)
    ad = ImageAdapter(32, dict(PLAIN, position="sincos"))
    a = ad.tokenize({"image": torch.rand(2, 3, 6, 8)})
    b = ad.tokenize({"image": torch.zeros(2, 3, 6, 8)})
    assert a.x.shape == (2, 12, 32) and torch.equal(a.pos, b.pos) and not torch.equal(a.x, b.x)
    assert torch.equal(a.pos[0], sincos_2d(3, 4, 32))
    assert torch.equal(ad.tokenize({"image": torch.rand(1, 3, 4, 4)}).pos[0], sincos_2d(2, 2, 32))  # cached grid
    assert a.index[0].tolist() == [[r, c] for r in range(3) for c in range(4)] and not a.pad.any()
    ad_l = ImageAdapter(32, PLAIN)
    assert torch.equal(ad_l.tokenize({"image": torch.rand(1, 3, 4, 4)}).pos,
                       ad_l.tokenize({"image": torch.ones(1, 3, 4, 4)}).pos)


def test_learned_positions_resize_like_timm() -> None:
    ad = ImageAdapter(16, {"patch_size": 4, "image_size": 16})  # a 4 x 4 learned grid
    assert ad.pos_embed.shape == (1, 16, 16)
    t = ad.tokenize({"image": torch.rand(1, 3, 24, 12)})  # a 6 x 3 grid
    want = resample_abs_pos_embed(ad.pos_embed.detach(), [6, 3], [4, 4], num_prefix_tokens=0)
    assert torch.allclose(t.pos[0], want[0], atol=1e-6)
    same = ad.tokenize({"image": torch.rand(1, 3, 16, 16)})
    assert torch.equal(same.pos[0], ad.pos_embed[0].detach())


def test_sizes_must_divide_by_the_patch() -> None:
    ad = ImageAdapter(8, {"patch_size": 4, "image_size": 8})
    for call in (ad.tokenize, ad.num_tokens, ad.targets, lambda b: ad.views(b, 1, 0)):
        with pytest.raises(ValueError, match="not divisible by the patch size 4"):
            call({"image": torch.rand(1, 3, 8, 10)})
    with pytest.raises(ValueError, match="not divisible"):
        ImageAdapter(8, {"patch_size": 4, "image_size": 10})
    assert ad.num_tokens({"image": torch.rand(2, 3, 8, 12)}).tolist() == [6, 6]


@pytest.mark.parametrize("mode", ["drop", "replace"])
def test_hidden_patches_do_not_leak(mode: str) -> None:
    torch.manual_seed(0)
    enc = build_encoder(encoder_config("image", "micro", _image_cfg())).eval()
    assert enc.prefix is not None  # the CLS prefix attends to everything: it must not leak either
    img = torch.rand(2, 3, 32, 32)
    tokens = enc.adapter.tokenize({"image": img})
    mask = enc.adapter.make_mask(tokens, 0.75, torch.Generator().manual_seed(0))
    # change the content of every hidden 4 x 4 patch only
    grid = mask.view(2, 1, 8, 1, 8, 1).expand(2, 3, 8, 4, 8, 4).reshape(2, 3, 32, 32)
    img2 = torch.where(grid, torch.rand_like(img), img)
    assert not torch.equal(img, img2)
    with torch.no_grad():
        a = enc({"image": img}, mask, mode)
        b = enc({"image": img2}, mask, mode)
    if mode == "drop":
        assert a.last.shape[1] == 16 and torch.equal(a.keep, b.keep)
    assert torch.allclose(a.last, b.last, atol=1e-6) and torch.allclose(a.prefix, b.prefix, atol=1e-6)
    with torch.no_grad():  # and the visible content does reach the output
        c = enc({"image": torch.where(grid, img, torch.rand_like(img))}, mask, mode)
    assert not torch.allclose(a.last, c.last, atol=1e-3)


def test_views_counts_sizes_and_per_sample_draws() -> None:
    ad = ImageAdapter(16, {"patch_size": 4, "image_size": 32, "views": {"jitter_p": 1.0, "grayscale_p": 0.0}})
    img = torch.rand(1, 3, 32, 32).expand(4, -1, -1, -1).contiguous()  # four copies of one image
    batch = {"image": img, "label": torch.arange(4)}
    torch.manual_seed(0)
    views = ad.views(batch, 2, 3)
    assert [tuple(v["image"].shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    for v in views:
        assert torch.equal(v["label"], batch["label"])
        assert 0.0 <= float(v["image"].min()) and float(v["image"].max()) <= 1.0
        # the same source image gives different views across the batch: one draw per sample
        assert not torch.allclose(v["image"][0], v["image"][1])
    ad.tokenize(views[-1])  # local views stay patch-aligned
    ad2 = ImageAdapter(16, {"patch_size": 4, "image_size": 32, "views": {"local_size": 12}})
    assert ad2.views(batch, 0, 1)[0]["image"].shape[-1] == 12
    small = ImageAdapter(16, {"patch_size": 4}).views({"image": torch.rand(1, 3, 12, 20)}, 1, 1)
    assert small[1]["image"].shape == (1, 3, 4, 4)  # half of the short side (6) rounded down to the patch
    with pytest.raises(ValueError, match="unknown image views keys"):
        ImageAdapter(16, {"views": {"flip": 0.5}})


def test_baseline_features_are_pooled_pixels() -> None:
    ad = ImageAdapter(8, PLAIN)
    img = torch.rand(2, 3, 32, 32)
    f = ad.baseline_features({"image": img})
    assert f.shape == (2, 192)
    assert float(f[1, 8 * 8 + 3 * 8 + 5]) == pytest.approx(float(img[1, 1, 12:16, 20:24].mean()), abs=1e-6)


def test_modality_config() -> None:
    from mmssl.config import compose

    cfg = compose(["modality=image"])
    assert cfg.modality.image.max_len == 32  # micro: the 32 x 32 embedded preset
    assert compose(["modality=image", "model=base"]).modality.image.max_len == 224
    micro = encoder_config("image", "micro", _image_cfg())
    assert (micro["adapter"]["patch_size"], micro["adapter"]["image_size"]) == (4, 32)
    for size, (dim, heads) in {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}.items():
        c = encoder_config("image", size, _image_cfg())
        b = c["backbone"]
        assert (b["dim"], b["heads"], b["ffn_dim"], b["depth"], b["eps"], b["norm_first"]) == \
            (dim, heads, 4 * dim, 12, 1e-6, True)
        assert (c["adapter"]["patch_size"], c["adapter"]["image_size"], c["adapter"]["position"]) == \
            (16, 224, "learned") and c["num_prefix"] == 1
    ad = build_encoder(encoder_config("image", "micro", _image_cfg())).adapter
    assert ad.preprocessing()["max_len"] == 32 and ad.preprocessing()["mean"] == [0.485, 0.456, 0.406]
