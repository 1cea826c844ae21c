"""The embedded speech preset: generated once into shards, read back through the real pipeline, and
learnable but not trivial for a randomly initialised micro encoder."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmssl.config import compose
from mmssl.data.loader import TrainStream, iter_split, resolve_source
from mmssl.eval.features import encoder_fn, extract
from mmssl.eval.probe_fit import linear_probe
from mmssl.factory import build_encoder, encoder_config


def test_preset_shards_and_stream(cache_dir: Path) -> None:
    src = resolve_source({"name": "default"}, ["speech"], "speech-synth", cache_dir)
    assert [src.meta["splits"][s]["count"] for s in ("train", "val", "test")] == [2000, 400, 1000]
    assert len(src.meta["splits"]["train"]["shards"]) >= 8  # >= 2 x ranks x workers for 2 x 2
    # a second resolve finds the finished set (no rebuild)
    assert resolve_source({"name": "default"}, ["speech"], "speech-synth", cache_dir).root == src.root
    # the training stream reads the same shards: whole batches, ids from the train split only
    b = next(iter(TrainStream(src, 16, 250000, seed=0, rank=0, num_roles=1)))
    assert b["speech"].shape[0] == 16 and int(b["sample_id"].max()) < 2000 and int(b["_bad"]) == 0
    assert sum(x["speech"].shape[0] for x in iter_split(src, "val", 64)) == 400


@pytest.mark.slow  # 3,400 utterances through the encoder: about 25 s on 2 cores
def test_random_init_micro_probe_is_between_chance_and_easy(cache_dir: Path) -> None:
    t0 = time.perf_counter()
    cfg = compose([])
    src = resolve_source({"name": "default"}, ["speech"], "speech-synth", cache_dir)
    torch.manual_seed(0)
    enc = build_encoder(encoder_config("speech", "micro", OmegaConf.to_container(cfg.modality.speech)))
    bad: Counter = Counter()
    dev = torch.device("cpu")
    (xtr, ytr, _), (xva, yva, _), (xte, yte, ids) = (extract(encoder_fn(enc), src, s, dev, 32, bad)
                                                     for s in ("train", "val", "test"))
    assert not bad and len(ids) == 1000 and len(set(ids.tolist())) == 1000
    r = linear_probe(xtr, ytr, xva, yva, xte, yte, [0.01, 0.1, 1.0])
    print(f"random-init micro probe {r.test_accuracy:.3f} in {time.perf_counter() - t0:.0f}s")
    assert 0.2 < r.test_accuracy < 0.8
