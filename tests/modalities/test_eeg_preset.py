"""The embedded EEG presets: a deterministic simulation over varying montages, shards read back through
the real pipeline, a held-out montage, and learnable but not trivial for a random-init micro encoder."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

import mmssl.modalities.eeg  # noqa: F401  (registers the presets before the lead lists them in _BUILTINS)
from mmssl.config import compose
from mmssl.data.loader import DataSource, TrainStream, iter_split
from mmssl.data.shards import load_meta
from mmssl.eval.probe_fit import linear_probe
from mmssl.factory import build_encoder, encoder_config
from mmssl.modalities.eeg import montage, synth
from mmssl.modalities.eeg.data import EEGCodec
from mmssl.registry import PRESETS

# Prefixes of the splits: generating and embedding ~1,000 recordings costs most of this test.
PROBE = {"train": 320, "val": 120, "test": 320}


def test_generator_is_deterministic_balanced_and_varies_the_montage() -> None:
    a = list(synth.generate("val", n=12, seed=3))
    b = list(synth.generate("val", n=6, seed=3))  # a prefix of the longer run
    for x, y in zip(a[:6], b, strict=True):
        assert np.array_equal(x.data, y.data) and x.ch_names == y.ch_names and x.label == y.label
    assert not np.array_equal(a[0].data, next(synth.generate("val", n=1, seed=4)).data)
    assert a[0].data.shape == (len(a[0].ch_names), int(synth.SECONDS * synth.RATE)) and a[0].data.dtype == np.float32
    labels = [r.label for r in synth.generate("val", seed=0)]
    assert np.bincount(labels).tolist() == [synth.SPLITS["val"] // 4] * 4
    recs = list(synth.generate("train", n=200))
    kinds = Counter(r.montage for r in recs)
    assert set(kinds) == {"1020-19", "1010-32", "1010-64", "subset"} and min(kinds.values()) >= 15
    sizes = {len(r.ch_names) for r in recs}
    assert {19, 32, 64} <= sizes and len(sizes) > 10
    assert len({tuple(r.ch_names) for r in recs if r.montage == "1020-19"}) > 1  # shuffled channel order


def test_unseen_montage_is_never_in_training_montages() -> None:
    seen = {n for r in synth.generate("train", n=300) for n in r.ch_names}
    unseen_recs = list(synth.generate("test", n=50, family="unseen"))
    used = {n for r in unseen_recs for n in r.ch_names}
    assert seen <= set(montage.names_of("1010")) and not used & seen
    p_used, p_seen = montage.positions(sorted(used)), montage.positions(montage.names_of("1010"))
    assert np.degrees(np.arccos(np.clip(p_used @ p_seen.T, -1, 1))).min() > 5  # not near any 10-10 position
    assert {len(r.ch_names) for r in unseen_recs} <= set(range(32, 39))
    # a different stream from the training family's split of the same name
    assert not np.array_equal(unseen_recs[0].data[:1], next(synth.generate("test", n=1)).data[:1])


def test_preset_shards_read_back_through_the_pipeline(tmp_path: Path) -> None:
    preset = PRESETS.get(compose(["modality=eeg"]).modality.eeg.preset)()
    assert PRESETS.get("eeg-synth-unseen-montage")().family == "unseen"
    preset.build(tmp_path, seed=0, sizes={"train": 48, "val": 8})
    meta = load_meta(tmp_path)
    assert meta["classes"] == list(synth.CLASSES) and meta["generator_version"] == synth.GENERATOR_VERSION
    assert len(meta["splits"]["train"]["shards"]) == 8 and meta["splits"]["val"]["count"] == 8
    src = DataSource(tmp_path, meta, ["eeg"])
    bad: Counter = Counter()
    batches = list(iter_split(src, "val", batch_size=8, bad=bad, max_len=2000))
    assert not bad and sum(len(b["label"]) for b in batches) == 8
    ref = list(synth.generate("val", n=8))
    codec = EEGCodec()
    for b in batches:
        for j, i in enumerate(b["sample_id"].tolist()):
            r = ref[i]
            want = codec.collate([{"eeg": torch.from_numpy(r.data.astype(np.float16).astype(np.float32)),
                                   "eeg_pos": torch.from_numpy(montage.positions(r.ch_names)), "eeg_rate": r.rate}],
                                 2000, None)
            C = len(r.ch_names)
            assert int(b["label"][j]) == r.label and int(b["eeg_chan_mask"][j].sum()) == C
            assert torch.allclose(b["eeg"][j, :C], want["eeg"][0], atol=1e-5)
            assert torch.allclose(b["eeg_pos"][j, :C], want["eeg_pos"][0], atol=1e-6)
    # the training stream: 2 s crops at 128 Hz, every batch one rate
    tb = next(iter(TrainStream(src, 6, 2000, seed=0, rank=0, num_roles=1)))
    assert tb["eeg"].shape[0] == 6 and tb["eeg"].shape[2] == 256 and (tb["eeg_len"] == 256).all()


@torch.no_grad()
def test_random_init_micro_probe_is_between_chance_and_easy() -> None:
    t0 = time.perf_counter()
    cfg = compose(["modality=eeg"])
    torch.manual_seed(0)
    enc = build_encoder(encoder_config("eeg", "micro", OmegaConf.to_container(cfg.modality.eeg, resolve=True))).eval()
    codec = EEGCodec()
    feats = {}
    for split, n in PROBE.items():
        items = [{"eeg": r.data, "eeg_pos": montage.positions(r.ch_names), "eeg_rate": r.rate, "label": r.label}
                 for r in synth.generate(split, n=n)]
        items.sort(key=codec.length)  # as iter_split does: batches of similar montage size
        xs, ys = [], []
        for i in range(0, n, 80):
            chunk = items[i:i + 80]
            xs.append(enc.embed(codec.collate(chunk, cfg.modality.eeg.max_len, None)))
            ys.append(torch.tensor([it["label"] for it in chunk]))
        feats[split] = (torch.cat(xs), torch.cat(ys))
    r = linear_probe(*feats["train"], *feats["val"], *feats["test"], [0.01, 0.1, 1.0])
    print(f"random-init micro probe {r.test_accuracy:.3f} in {time.perf_counter() - t0:.0f}s")
    assert 0.2 < r.test_accuracy < 0.8
