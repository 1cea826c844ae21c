"""The embedded image preset: generated once into shards, read back through the real pipeline, and
learnable but not trivial for a randomly initialised micro encoder."""
from __future__ import annotations

import time
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mmssl.config import compose
from mmssl.data.loader import DataSource, TrainStream, iter_split, resolve_source
from mmssl.eval.probe_fit import linear_probe
from mmssl.factory import build_encoder, encoder_config
from mmssl.modalities.image import synth

# Prefixes of the train and val splits (the test split is used whole): the micro encoder's features
# cost most of this test, about 90 images/s on 2 cores.
PROBE_TRAIN, PROBE_VAL = 1000, 250


@torch.no_grad()
def _features(enc: torch.nn.Module, src: DataSource, split: str, limit: int | None, bad: Counter
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, labels, ids = [], [], []
    batches = iter_split(src, split, batch_size=250, bad=bad, buffer=500, max_len=32)
    for b in islice(batches, None if limit is None else -(-limit // 250)):
        feats.append(enc.embed(b))
        labels.append(b["label"])
        ids.append(b["sample_id"])
    return torch.cat(feats), torch.cat(labels), torch.cat(ids)


def test_generator_is_deterministic_and_balanced() -> None:
    a = list(synth.generate("val", n=20, seed=3))
    b = list(synth.generate("val", n=10, seed=3))  # a prefix of the longer run
    for x, y in zip(a[:10], b, strict=True):
        assert np.array_equal(x.pixels, y.pixels) and x.label == y.label
    assert not np.array_equal(a[0].pixels, next(synth.generate("val", n=1, seed=4)).pixels)
    assert not np.array_equal(a[0].pixels, next(synth.generate("test", n=1, seed=3)).pixels)
    assert a[0].pixels.shape == (32, 32, 3) and a[0].pixels.dtype == np.uint8
    labels = [im.label for im in synth.generate("val", seed=0)]
    assert np.bincount(labels).tolist() == [synth.SPLITS["val"] // 10] * 10


def test_preset_shards_and_stream(cache_dir: Path) -> None:
    preset = compose(["modality=image"]).modality.image.preset
    src = resolve_source({"name": "default"}, ["image"], preset, cache_dir)
    n = synth.SPLITS
    assert {s: v["count"] for s, v in src.meta["splits"].items()} == n
    assert n["test"] >= 1000 and src.meta["classes"] == list(synth.CLASSES)
    assert src.meta["generator_version"] == synth.GENERATOR_VERSION and src.meta["bad_samples"] == {}
    assert len(src.meta["splits"]["train"]["shards"]) >= 8  # >= 2 x ranks x workers for 2 x 2
    # a second resolve finds the finished set (no rebuild)
    assert resolve_source({"name": "default"}, ["image"], "image-synth", cache_dir).root == src.root

    # shards hold the generator's images exactly (PNG is lossless): the first val items
    first = next(iter_split(src, "val", batch_size=8, buffer=8))
    for img, y, i in zip(first["image"], first["label"], first["sample_id"].tolist(), strict=True):
        ref = list(synth.generate("val", n=i + 1))[i]
        assert torch.equal((img * 255).round().to(torch.uint8), torch.from_numpy(ref.pixels).permute(2, 0, 1))
        assert int(y) == ref.label

    # the training stream reads the same shards: whole batches of 32x32 images, train ids only
    b = next(iter(TrainStream(src, 64, 32, seed=0, rank=0, num_roles=1)))
    assert b["image"].shape == (64, 3, 32, 32) and int(b["_bad"]) == 0
    assert int(b["sample_id"].max()) < n["train"]
    assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0


@pytest.mark.slow  # the whole preset through the encoder (10-12 s): the default suite keeps MRI's and EEG's
def test_random_init_micro_probe_is_between_chance_and_easy(cache_dir: Path) -> None:
    t0 = time.perf_counter()
    cfg = compose(["modality=image"])
    src = resolve_source({"name": "default"}, ["image"], cfg.modality.image.preset, cache_dir)
    n = synth.SPLITS

    torch.manual_seed(0)
    modality_cfg = OmegaConf.to_container(cfg.modality.image, resolve=True)
    enc = build_encoder(encoder_config("image", "micro", modality_cfg))
    enc.eval()
    bad: Counter = Counter()
    limits = {"train": PROBE_TRAIN, "val": PROBE_VAL, "test": None}
    (xtr, ytr, _), (xva, yva, _), (xte, yte, ids) = (_features(enc, src, s, n_max, bad)
                                                     for s, n_max in limits.items())
    assert not bad and len(ids) == n["test"] and len(set(ids.tolist())) == n["test"]
    assert (len(ytr), len(yva)) == (PROBE_TRAIN, PROBE_VAL)
    r = linear_probe(xtr, ytr, xva, yva, xte, yte, [0.01, 0.1, 1.0])
    total = time.perf_counter() - t0
    print(f"random-init micro probe {r.test_accuracy:.3f} in {total:.0f}s")
    assert 0.2 < r.test_accuracy < 0.8
