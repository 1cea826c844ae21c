"""The embedded point cloud preset: generated once into shards, read back through the real pipeline,
and learnable but not trivial for a randomly initialised micro encoder."""
from __future__ import annotations

import time
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import mmssl.modalities.point  # noqa: F401  (registers the adapter and preset before the lead adds it)
from mmssl.config import compose
from mmssl.data.loader import DataSource, TrainStream, iter_split, resolve_source
from mmssl.eval.probe_fit import linear_probe
from mmssl.factory import build_encoder, encoder_config
from mmssl.modalities.point import synth

# Prefixes of the train and val splits (the test split is used whole), to keep the test short.
PROBE_TRAIN, PROBE_VAL = 1000, 250
BATCH = 250


@torch.no_grad()
def _features(enc: torch.nn.Module, src: DataSource, split: str, limit: int | None, bad: Counter,
              max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, labels, ids = [], [], []
    batches = iter_split(src, split, batch_size=BATCH, bad=bad, buffer=500, max_len=max_len)
    for b in islice(batches, None if limit is None else -(-limit // BATCH)):
        feats.append(enc.embed(b))
        labels.append(b["label"])
        ids.append(b["sample_id"])
    return torch.cat(feats), torch.cat(labels), torch.cat(ids)


def test_generator_is_deterministic_balanced_and_varied() -> None:
    a = list(synth.generate("val", n=20, seed=3))
    b = list(synth.generate("val", n=10, seed=3))  # a prefix of the longer run
    for x, y in zip(a[:10], b, strict=True):
        assert np.array_equal(x.points, y.points) and x.label == y.label
    assert not np.array_equal(a[0].points, next(synth.generate("val", n=1, seed=4)).points)
    assert not np.array_equal(a[0].points, next(synth.generate("test", n=1, seed=3)).points)
    sizes = [c.points.shape[0] for c in a]
    assert all(synth.POINTS[0] <= s <= synth.POINTS[1] for s in sizes) and len(set(sizes)) > 10
    assert all(c.points.dtype == np.float32 and c.points.shape[1] == 3 for c in a)
    assert all(np.isfinite(c.points).all() for c in a)
    labels = [c.label for c in synth.generate("val", seed=0)]
    assert np.bincount(labels).tolist() == [synth.SPLITS["val"] // synth.NUM_CLASSES] * synth.NUM_CLASSES


def test_canonical_shapes_lie_on_their_surfaces() -> None:
    """Spot checks of the samplers in their own frame: a unit sphere, a cube's faces, a torus."""
    rng = np.random.default_rng(0)
    s = synth.sphere(500, rng)
    assert np.allclose(np.linalg.norm(s, axis=1), 1.0)
    c = synth.cube(500, rng)
    assert np.allclose(np.abs(c).max(1), 0.6)
    t = synth.torus(500, rng)
    tube = np.hypot(np.hypot(t[:, 0], t[:, 1]) - 0.7, t[:, 2])  # distance to the core circle
    assert np.ptp(tube) < 1e-9 and 0.18 <= tube[0] <= 0.3
    for kind in synth.CLASSES:
        p = synth.SHAPES[kind](300, rng)
        assert p.shape == (300, 3) and np.linalg.norm(p, axis=1).max() < 1.3, kind


def test_preset_shards_and_stream(cache_dir: Path) -> None:
    preset = compose(["modality=point"]).modality.point.preset
    src = resolve_source({"name": "default"}, ["point"], preset, cache_dir)
    n = synth.SPLITS
    assert {s: v["count"] for s, v in src.meta["splits"].items()} == n
    assert n["test"] >= 1000 and src.meta["classes"] == list(synth.CLASSES)
    assert src.meta["generator_version"] == synth.GENERATOR_VERSION and src.meta["bad_samples"] == {}
    assert len(src.meta["splits"]["train"]["shards"]) >= 8  # >= 2 x ranks x workers for 2 x 2
    assert resolve_source({"name": "default"}, ["point"], "point-synth", cache_dir).root == src.root

    # shards hold the generator's clouds exactly (float32 .npy): the first val items, whole
    first = next(iter_split(src, "val", batch_size=8, buffer=8))
    for pts, n_pts, y, i in zip(first["point"], first["point_len"], first["label"], first["sample_id"].tolist(),
                                strict=True):
        ref = list(synth.generate("val", n=i + 1))[i]
        assert torch.equal(pts[:n_pts], torch.from_numpy(ref.points)) and int(y) == ref.label

    # the training stream: batches sampled to the micro size, train ids only
    b = next(iter(TrainStream(src, 64, 512, seed=0, rank=0, num_roles=1)))
    assert b["point"].shape[0] == 64 and b["point"].shape[1] <= 512 and int(b["_bad"]) == 0
    assert int(b["point_len"].max()) <= 512 and int(b["point_len"].min()) >= synth.POINTS[0]
    assert int(b["sample_id"].max()) < n["train"]


@pytest.mark.slow  # the whole preset through the encoder (10-12 s): the default suite keeps MRI's and EEG's
def test_random_init_micro_probe_is_between_chance_and_easy(cache_dir: Path) -> None:
    t0 = time.perf_counter()
    cfg = compose(["modality=point"])
    src = resolve_source({"name": "default"}, ["point"], cfg.modality.point.preset, cache_dir)
    n = synth.SPLITS

    torch.manual_seed(0)
    modality_cfg = OmegaConf.to_container(cfg.modality.point, resolve=True)
    enc = build_encoder(encoder_config("point", "micro", modality_cfg))
    enc.eval()
    max_len = int(enc.config["preprocessing"]["max_len"])
    bad: Counter = Counter()
    limits = {"train": PROBE_TRAIN, "val": PROBE_VAL, "test": None}
    (xtr, ytr, _), (xva, yva, _), (xte, yte, ids) = (_features(enc, src, s, n_max, bad, max_len)
                                                     for s, n_max in limits.items())
    assert not bad and len(ids) == n["test"] and len(set(ids.tolist())) == n["test"]
    assert (len(ytr), len(yva)) == (PROBE_TRAIN, PROBE_VAL)
    r = linear_probe(xtr, ytr, xva, yva, xte, yte, [0.01, 0.1, 1.0])
    total = time.perf_counter() - t0
    print(f"random-init micro probe {r.test_accuracy:.3f} in {total:.0f}s")
    assert 0.2 < r.test_accuracy < 0.8
