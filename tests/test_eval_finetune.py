"""Fine-tuning evaluator (eval/finetune.py) and LoRA (mmssl/lora.py): layer-wise learning-rate decay
against hand-computed scales, LoRA identities, trainable sets of each mode, losses and scores against
their formulas, a multi-label run on synthetic tensors and an end-to-end run on packed images."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mmssl.encoder import Encoder
from mmssl.eval import finetune as ft
from mmssl.factory import build_encoder, encoder_config
from mmssl.lora import LoRALinear, apply_lora, count_trainable, mark_only_lora_trainable, merge_lora

IMAGE = {"pool": "cls", "num_prefix": 1, "backbone": {"norm_first": True},
         "adapter": {"patch_size": 8, "image_size": 32, "position": "sincos"}}
SPEECH = {"backbone": {"norm_first": False},
          "adapter": {"frontend_channels": [16, 32, 32, 32, 32, 32, 32], "frontend_norm": "group_norm",
                      "pos_conv_kernel": 16, "pos_conv_groups": 4}}
TINY = {"dim": 64, "depth": 2, "heads": 2, "ffn_dim": 128}


def tiny(modality: str = "image", seed: int = 0, **model: Any) -> Encoder:
    torch.manual_seed(seed)
    return build_encoder(encoder_config(modality, "micro", IMAGE if modality == "image" else SPEECH,
                                        {**TINY, **model})).eval()


# -- layer-wise learning-rate decay --------------------------------------------------------------------
def test_llrd_scales_and_weight_decay_by_hand() -> None:
    model = ft.Classifier(tiny(), 5)
    ft.configure_trainable(model, {"mode": "full"})
    groups = ft.param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    # depth 2, decay 0.5: head and final norm 1, block 1 0.5, block 0 0.25, below the blocks 0.125
    expect = {"head.weight": 1.0, "head.bias": 1.0, "encoder.backbone.norm.weight": 1.0,
              "encoder.backbone.blocks.1.attn.qkv.weight": 0.5, "encoder.backbone.blocks.1.norm2.bias": 0.5,
              "encoder.backbone.blocks.0.ffn.fc1.weight": 0.25, "encoder.adapter.patch_embed.weight": 0.125,
              "encoder.prefix": 0.125}
    for n, s in expect.items():
        assert scale[n] == pytest.approx(s), n
    assert wd["encoder.backbone.blocks.0.attn.qkv.weight"] == 0.05 and wd["head.weight"] == 0.05
    assert wd["encoder.adapter.patch_embed.weight"] == 0.05
    for n in ("encoder.backbone.blocks.0.attn.qkv.bias", "encoder.backbone.blocks.0.norm1.weight",
              "head.bias", "encoder.prefix", "encoder.backbone.norm.bias"):
        assert wd[n] == 0.0, n
    # every trainable parameter is in exactly one group; the unused mask embedding in none
    names = [n for g in groups for n in g["names"]]
    assert len(names) == len(set(names)) == sum(1 for _, p in model.named_parameters() if p.requires_grad)
    assert "encoder.mask_embedding" not in scale


def test_llrd_post_norm_input_norm_sits_below_the_blocks() -> None:
    model = ft.Classifier(tiny("speech"), 3)
    ft.configure_trainable(model, {"mode": "full"})
    scale = {n: g["lr_scale"] for g in ft.param_groups(model, 0.05, 0.5) for n in g["names"]}
    assert scale["encoder.backbone.norm.weight"] == pytest.approx(0.125)  # HuBERT's input norm
    assert scale["encoder.backbone.blocks.1.norm2.weight"] == pytest.approx(0.5)
    assert scale["encoder.adapter.feature_proj.weight"] == pytest.approx(0.125)


def test_run_length_stretches_small_subsets() -> None:
    ecfg = {"epochs": 3, "min_steps": 64, "batch_size": 32, "warmup_epochs": 1}
    # 100 items: batches 32 + 32 + 32 + 4 -> 16 epochs for 64 steps, warm-up a third of them (21.3),
    # validation every 6 epochs (6, 12, 16)
    assert ft.run_length(100, ecfg) == (16, 4, 21, 6)
    assert ft.run_length(1000, ecfg) == (3, 32, 32, 1)  # 7 pools of 4 batches + 104 items in 4


def test_drop_path_rises_linearly() -> None:
    enc = tiny(depth=3)
    assert ft.set_drop_path(enc, 0.2) == pytest.approx([0.0, 0.1, 0.2])
    assert [b.drop_path for b in enc.backbone.blocks] == pytest.approx([0.0, 0.1, 0.2])


# -- LoRA ----------------------------------------------------------------------------------------------
def test_lora_identity_at_init_merge_and_trainable() -> None:
    enc = tiny()
    x = {"image": torch.rand(3, 3, 32, 32)}
    with torch.no_grad():
        ref = enc.embed(x)
    keys = sorted(enc.state_dict())
    wrapped = apply_lora(enc.backbone, ("qkv", "proj"), rank=4, alpha=8)
    assert wrapped == [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")]
    with torch.no_grad():
        assert torch.equal(enc.embed(x), ref)  # B = 0: exactly the base model
    mark_only_lora_trainable(enc)
    # per block: qkv A [4, 64] + B [192, 4], proj A [4, 64] + B [64, 4]
    assert count_trainable(enc) == 2 * (4 * 64 + 192 * 4 + 4 * 64 + 64 * 4)
    assert all(("lora_" in n) == p.requires_grad for n, p in enc.named_parameters())
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)
        adapted = enc.embed(x)
    assert (adapted - ref).abs().max() > 1e-2  # the update matters...
    assert merge_lora(enc.backbone) == wrapped
    with torch.no_grad():
        assert torch.allclose(enc.embed(x), adapted, atol=1e-5)  # ...and survives merging
    assert not any(isinstance(m, LoRALinear) for m in enc.modules())
    assert type(enc.backbone.blocks[0].attn.qkv) is nn.Linear and sorted(enc.state_dict()) == keys
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(enc.backbone, ("nothing",))


# -- trainable sets of the modes -----------------------------------------------------------------------
def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_first_tune_last_and_lora_trainable_sets() -> None:
    model = ft.Classifier(tiny(), 4)
    c = ft.configure_trainable(model, {"mode": "full", "freeze_first": 1})
    on = _trainable(model)
    assert not any(n.startswith(("encoder.adapter.", "encoder.backbone.blocks.0.")) for n in on)
    assert "encoder.prefix" not in on and "encoder.mask_embedding" not in on
    assert {"encoder.backbone.blocks.1.attn.qkv.weight", "encoder.backbone.norm.weight", "head.weight"} <= on
    assert c["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in on)

    model = ft.Classifier(tiny(), 4)
    c = ft.configure_trainable(model, {"mode": "full", "tune_last": 1})
    expect = {n for n, _ in model.named_parameters()
              if n.startswith(("encoder.backbone.blocks.1.", "encoder.backbone.norm.", "head."))}
    assert _trainable(model) == expect
    block = sum(p.numel() for p in model.encoder.backbone.blocks[1].parameters())
    assert c["trainable_params"] == block + 2 * 64 + (64 * 4 + 4) and c["head_params"] == 64 * 4 + 4

    model = ft.Classifier(tiny(), 4)
    c = ft.configure_trainable(model, {"mode": "lora", "lora_rank": 2, "lora_alpha": 4})
    assert _trainable(model) == {n for n, _ in model.named_parameters()
                                 if "lora_" in n or n.startswith("head.")}
    assert c["lora_layers"] == 4
    assert c["trainable_params"] == 2 * (2 * 64 + 192 * 2 + 2 * 64 + 64 * 2) + 64 * 4 + 4
    with pytest.raises(ValueError, match="not both"):
        ft.configure_trainable(ft.Classifier(tiny(), 4), {"freeze_first": 1, "tune_last": 1})


# -- losses and scores ---------------------------------------------------------------------------------
def test_losses_and_scores_against_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [1.0, 1.0, -1.0]])
    multi = torch.tensor([[1, 0, 1], [1, 0, 0]])
    s = 0.1
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in logits.tolist()]
    bce = 0.0
    for row, yrow in zip(sig, multi.tolist()):
        for p, y in zip(row, yrow):
            t = y * (1 - s) + s / 2
            bce -= t * math.log(p) + (1 - t) * math.log(1 - p)
    assert float(ft.finetune_loss(logits, multi, s)) == pytest.approx(bce / 6, rel=1e-5)
    assert ft.item_scores(logits, multi).tolist() == [1.0, 0.0]  # row 2 predicts label 1 wrongly
    assert ft.micro_f1(logits, multi) == pytest.approx(2 * 3 / (2 * 3 + 1 + 0))  # TP 3, FP 1, FN 0

    single = torch.tensor([2, 0])
    ce = 0.0
    for row, y in zip(logits.tolist(), single.tolist()):
        logz = math.log(sum(math.exp(v) for v in row))
        nll = [logz - v for v in row]
        ce += (1 - s) * nll[y] + s * sum(nll) / 3
    assert float(ft.finetune_loss(logits, single, s)) == pytest.approx(ce / 2, rel=1e-5)
    assert ft.item_scores(logits, single).tolist() == [0.0, 1.0]  # argmax of row 2 is its first tie


class ColourSource:
    """The two methods fine-tuning asks of a DataSource, over in-memory items {"image": [3, 32, 32],
    "label": multi-hot [3] or int, "sample_id"}."""

    def length(self, item: dict[str, Any]) -> int:
        return 32

    def collate(self, items: list[dict[str, Any]], max_len: int | None, g: torch.Generator | None) -> dict:
        return {"image": torch.stack([it["image"] for it in items]),
                "label": torch.stack([torch.as_tensor(it["label"]) for it in items]),
                "sample_id": torch.tensor([it["sample_id"] for it in items])}


def colour_items(n: int, seed: int) -> list[dict[str, Any]]:
    """Flat colours plus noise; label k is on when channel k is bright: 8 label sets."""
    g = torch.Generator().manual_seed(seed)
    on = torch.randint(0, 2, (n, 3), generator=g)
    level = on.float() * 0.6 + 0.2 + 0.1 * torch.rand(n, 3, generator=g)
    img = level[:, :, None, None] + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    return [{"image": img[i].clamp(0, 1), "label": on[i], "sample_id": i} for i in range(n)]


def test_multi_label_finetune_on_synthetic_tensors() -> None:
    src = ColourSource()
    train_items = colour_items(96, 0)
    train = ft.SplitData(labels=torch.stack([it["label"] for it in train_items]), items=train_items)

    def fixed(items: list[dict[str, Any]]) -> ft.SplitData:
        batches = [src.collate(items[i:i + 32], None, None) for i in range(0, len(items), 32)]
        return ft.SplitData(labels=torch.cat([b["label"] for b in batches]), batches=batches)

    val, test = fixed(colour_items(32, 1)), fixed(colour_items(64, 2))
    ecfg = {"epochs": 4, "min_steps": 36, "batch_size": 16, "lr": 2e-3, "warmup_epochs": 1,
            "layer_decay": 0.75, "weight_decay": 0.05, "drop_path": 0.0, "label_smoothing": 0.1,
            "clip_grad": 1.0, "mode": "full"}
    r = ft.finetune_once(tiny(dim=32, ffn_dim=64), src, train, torch.arange(96), val, test, 3,
                         ecfg, torch.device("cpu"), 0, None)
    assert r.test_logits.shape == (64, 3)
    assert r.epochs == 6 and r.val_epochs == [2, 4, 6]  # 6 steps an epoch: 36 steps need 6 epochs
    assert r.best_epoch == r.val_epochs[r.val_curve.index(max(r.val_curve))]
    assert float(r.test_scores.mean()) > 0.6  # exact match on 3 labels; guessing gets 1/8
    assert ft.micro_f1(r.test_logits, test.labels) > 0.8


def test_augmented_runs_use_one_view_per_batch_and_repeat_with_the_seed() -> None:
    src = ColourSource()
    items = [dict(it, label=int(it["label"].argmax())) for it in colour_items(40, 0)]
    train = ft.SplitData(labels=torch.tensor([it["label"] for it in items]), items=items)
    held = ft.SplitData(labels=train.labels[:20], batches=[src.collate(items[:20], None, None)])
    ecfg = {"epochs": 1, "batch_size": 16, "lr": 1e-3, "augment": True, "drop_path": 0.1, "mode": "full"}
    calls: list[int] = []

    def run() -> ft.RunResult:
        enc = tiny(dim=32, ffn_dim=64)
        views = enc.adapter.views
        enc.adapter.views = lambda b, g, loc: calls.append(len(b["label"])) or views(b, g, loc)
        return ft.finetune_once(enc, src, train, torch.arange(40), held, held, 3, ecfg,
                                torch.device("cpu"), 3, None)

    a, b = run(), run()
    assert sorted(calls) == [8, 8, 16, 16, 16, 16]  # one view per training batch, 2 runs x (16 + 16 + 8)
    assert torch.equal(a.test_logits, b.test_logits)  # views and drop path follow the seed


def test_epoch_batches_cover_every_item_once_and_never_leave_one_alone() -> None:
    src = ColourSource()
    items = colour_items(33, 0)
    g = torch.Generator().manual_seed(0)
    epochs = [list(ft.epoch_batches(src, items, 16, None, g)) for _ in range(2)]
    for batches in epochs:
        assert sorted(len(b["sample_id"]) for b in batches) == [16, 17]  # 16 + 16 + 1: the 1 joins a batch
        assert sorted(torch.cat([b["sample_id"] for b in batches]).tolist()) == list(range(33))
    assert ft.batches_per_epoch(33, 16) == 2 and ft.batches_per_epoch(64 * 4 + 3, 64) == 5
    assert ft.batches_per_epoch(16 * 4 + 1, 16) == 4  # a lone 65th item joins the last batch
    lone = list(ft.epoch_batches(src, colour_items(65, 1), 16, None, g))
    assert sorted(len(b["sample_id"]) for b in lone) == [16, 16, 16, 17]
    assert not torch.equal(epochs[0][0]["sample_id"], epochs[1][0]["sample_id"])  # reshuffled each epoch


# -- end to end ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 colour classes x 32 PNG images, packed with `mmssl data pack` (train / val / test)."""
    from torchvision.io import write_png

    from mmssl.data.pack import pack

    root = tmp_path_factory.mktemp("colours")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("red", "green", "blue")):
        (root / "src" / name).mkdir(parents=True)
        for i in range(32):
            img = 0.25 * torch.rand(3, 32, 32, generator=g)
            img[c] += 0.5 + 0.2 * torch.rand(1, generator=g)
            write_png((img.clamp(0, 1) * 255).to(torch.uint8), str(root / "src" / name / f"{i:02d}.png"))
    pack("image", root / "src", root / "shards", num_shards=2, val=0.25, test=0.25)
    return root / "shards"


def test_run_finetune_end_to_end(colour_shards: Path, tmp_path: Path) -> None:
    from mmssl.data.loader import resolve_source
    from mmssl.export import save_encoder

    run = tmp_path / "run"
    save_encoder(tiny(seed=0, dim=32, ffn_dim=64), run / "encoders" / "image")
    save_encoder(tiny(seed=1, dim=32, ffn_dim=64), run / "encoders_init" / "image")
    source = resolve_source({"name": "shards", "path": str(colour_shards)}, ["image"], None, tmp_path)
    ecfg = {"split_train": "train", "split_val": "val", "split_test": "test", "label_fraction": [0.5, 1.0],
            "seeds": 2, "seed": 0, "max_train": None, "epochs": 2, "batch_size": 16, "lr": 2e-3,
            "min_lr": 1e-6, "warmup_epochs": 1, "layer_decay": 0.75, "weight_decay": 0.05, "drop_path": 0.1,
            "label_smoothing": 0.1, "clip_grad": 1.0, "mode": "full", "freeze_first": 0, "tune_last": None}
    out = tmp_path / "out"
    r = ft.run_finetune(run, out, source, ecfg, torch.device("cpu"), batch_size=32)
    saved = json.loads((out / "finetune.json").read_text())
    assert saved == json.loads(json.dumps(r)) and (out / "finetune.png").stat().st_size > 1000
    for k in ("evaluator", "modality", "encoder", "data", "random_init_source", "accuracy", "accuracy_std",
              "accuracy_ci95", "accuracy_per_seed", "random_init_accuracy", "random_init_accuracy_std",
              "random_init_accuracy_ci95", "random_init_accuracy_per_seed", "label_fractions", "seeds",
              "n_train", "n_val", "n_test", "num_classes", "skipped_samples", "seconds", "trainable_params",
              "mode"):
        assert k in saved, k
    assert saved["evaluator"] == "finetune" and saved["random_init_source"] == "step0"
    assert saved["num_classes"] == 3 and saved["seeds"] == 2
    assert saved["n_train"] == 48 and saved["n_val"] == 24 and saved["n_test"] == 24
    half, full = saved["label_fractions"]
    assert half["n_train"] == 24 and full["n_train"] == 48  # stratified: 8 of each class's 16
    assert saved["accuracy"] == full["accuracy"] and len(saved["accuracy_per_seed"]) == 2
    for row in (half, full):
        for p in ("", "random_init_"):
            lo, hi = row[f"{p}accuracy_ci95"]
            assert lo <= row[f"{p}accuracy"] <= hi
            assert all(len(c) == 2 for c in row[f"{p}val_curve"])
            assert row[f"{p}best_epoch"] == [row["val_epochs"][c.index(max(c))] for c in row[f"{p}val_curve"]]
    assert full["accuracy"] > 0.6  # colour classes; chance is 1/3
    assert saved["trainable_params"] == saved["total_params"] - 32  # all but the mask embedding
