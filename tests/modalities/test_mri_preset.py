"""The embedded MRI preset: deterministic phantoms with missing contrasts, shards read back through the
real pipeline, and learnable but not trivial for a randomly initialised micro encoder."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mmssl.config import compose
from mmssl.data.loader import DataSource, TrainStream, iter_split
from mmssl.data.shards import load_meta
from mmssl.eval.probe_fit import linear_probe
from mmssl.factory import build_encoder, encoder_config
from mmssl.modalities.mri import synth
from mmssl.modalities.mri.data import MRICodec, MRISynthPreset

# Prefixes of the splits: generating and encoding cost most of this test (about 150 cases/s each).
PROBE = {"train": 300, "val": 100, "test": 300}


def test_generator_is_deterministic_balanced_and_never_empty() -> None:
    a = list(synth.generate("val", n=12, seed=3))
    b = list(synth.generate("val", n=6, seed=3))  # a prefix of the longer run
    for x, y in zip(a[:6], b, strict=True):
        assert np.array_equal(x.volumes, y.volumes) and x.label == y.label and np.array_equal(x.present, y.present)
    assert not np.array_equal(a[0].volumes, next(synth.generate("val", n=1, seed=4)).volumes)
    assert not np.array_equal(a[0].volumes, next(synth.generate("test", n=1, seed=3)).volumes)
    c = a[0]
    assert c.volumes.shape == (4, synth.SIZE, synth.SIZE, synth.SIZE) and c.volumes.dtype == np.float32
    for case in a:
        assert case.present.any() and (case.volumes[~case.present] == 0).all()
        for m in np.flatnonzero(case.present):
            head = case.volumes[m][case.volumes[m] != 0]
            assert abs(head.mean()) < 1e-3 and abs(head.std() - 1) < 1e-3  # z-scored inside the head
    labels = synth.balanced_labels(synth.GENERATOR_VERSION, 0, "test", synth.SPLITS["test"], synth.NUM_CLASSES)
    assert np.bincount(labels).tolist() == [synth.SPLITS["test"] // 4] * 4
    assert synth.SPLITS["test"] >= 1000
    # presence: every subset size occurs, none empty, independent of the label (no shortcut)
    cases = list(synth.generate("train", n=120))
    counts = np.bincount([int(x.present.sum()) for x in cases], minlength=5)
    assert counts[0] == 0 and (counts[1:] > 0).all()
    by_label = [np.mean([x.present.sum() for x in cases if x.label == y]) for y in range(4)]
    assert max(by_label) - min(by_label) < 0.6


def test_preset_shards_and_stream(tmp_path: Path) -> None:
    MRISynthPreset().build(tmp_path, seed=0, sizes={"train": 24, "val": 6, "test": 6})
    meta = load_meta(tmp_path)
    assert meta["classes"] == list(synth.CLASSES) and meta["contrasts"] == list(synth.CONTRASTS)
    assert {s: v["count"] for s, v in meta["splits"].items()} == {"train": 24, "val": 6, "test": 6}
    src = DataSource(tmp_path, meta, ["mri"])
    ref = list(synth.generate("val", n=6))
    seen = 0
    for b in iter_split(src, "val", batch_size=4, max_len=24):
        for vol, present, y, i in zip(b["mri"], b["mri_present"], b["label"], b["sample_id"].tolist(), strict=True):
            assert torch.equal(present, torch.from_numpy(ref[i].present)) and int(y) == ref[i].label
            assert torch.allclose(vol, torch.from_numpy(ref[i].volumes), atol=2e-3)  # float16 storage
            seen += 1
    assert seen == 6
    b = next(iter(TrainStream(src, 3, 24, seed=0, rank=0, num_roles=1)))
    assert b["mri"].shape == (3, 4, 24, 24, 24) and int(b["_bad"]) == 0 and int(b["sample_id"].max()) < 24


@torch.no_grad()
def test_random_init_micro_probe_is_between_chance_and_easy() -> None:
    t0 = time.perf_counter()
    cfg = compose(["modality=mri"])
    torch.manual_seed(0)
    enc = build_encoder(encoder_config("mri", "micro", OmegaConf.to_container(cfg.modality.mri, resolve=True))).eval()
    codec = MRICodec()
    feats, labels = {}, {}
    for split, n in PROBE.items():
        items, ys = [], []
        for c in synth.generate(split, n=n):  # through the codec: what the shards hold (float16)
            items.append(codec.decode(codec.encode({"mri": c.volumes, "mri_present": c.present})))
            ys.append(c.label)
        order = sorted(range(n), key=lambda i: codec.length(items[i]))  # as iter_split: little padding
        out = []
        for i in range(0, n, 100):
            out.append(enc.embed(codec.collate([items[j] for j in order[i:i + 100]], 24, None)))
        feats[split], labels[split] = torch.cat(out), torch.tensor(ys)[order]
    r = linear_probe(feats["train"], labels["train"], feats["val"], labels["val"], feats["test"], labels["test"],
                     [0.01, 0.1, 1.0])
    print(f"random-init micro probe {r.test_accuracy:.3f} in {time.perf_counter() - t0:.0f}s")
    assert 0.2 < r.test_accuracy < 0.8
