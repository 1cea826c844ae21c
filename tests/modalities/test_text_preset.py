"""The embedded text preset: generated once into shards, read back through the real pipeline, and
learnable but not trivial for a randomly initialised micro encoder."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch
from mmssl.eval.features import encoder_fn, extract
from mmssl.eval.probe_fit import linear_probe
from mmssl.modalities.text.data import EOT, SOT
from omegaconf import OmegaConf

from mmssl.config import compose
from mmssl.data.loader import TrainStream, iter_split, resolve_source
from mmssl.factory import build_encoder, encoder_config

# The probe's training and validation items (the first ones of the fixed-order splits): a subset keeps
# this test's feature extraction to ~2,200 sentences; the whole test split is scored.
PROBE_TRAIN, PROBE_VAL = 1000, 200


def first_items(enc: torch.nn.Module, src, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    with torch.no_grad():
        for b in iter_split(src, split, 64):
            xs.append(enc.embed(b))
            ys.append(b["label"])
            if sum(len(y) for y in ys) >= n:
                break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def test_random_init_micro_probe_is_between_chance_and_easy(cache_dir: Path) -> None:
    t0 = time.perf_counter()
    cfg = compose(["modality=text"])
    src = resolve_source({"name": "default"}, ["text"], "text-synth", cache_dir)
    assert [src.meta["splits"][s]["count"] for s in ("train", "val", "test")] == [8000, 1000, 1000]
    assert len(src.meta["splits"]["train"]["shards"]) >= 8  # >= 2 x ranks x workers for 2 x 2
    assert len(src.meta["classes"]) == 6 and src.meta["tokenizer"].startswith("open_clip SimpleTokenizer")
    t_build = time.perf_counter() - t0
    # a second resolve finds the finished set (no rebuild)
    assert resolve_source({"name": "default"}, ["text"], "text-synth", cache_dir).root == src.root

    torch.manual_seed(0)
    enc = build_encoder(encoder_config("text", "micro", OmegaConf.to_container(cfg.modality.text))).eval()
    bad: Counter = Counter()
    xtr, ytr = first_items(enc, src, "train", PROBE_TRAIN)
    xva, yva = first_items(enc, src, "val", PROBE_VAL)
    xte, yte, ids = extract(encoder_fn(enc), src, "test", torch.device("cpu"), 64, bad)
    assert not bad and len(ids) == 1000 and len(set(ids.tolist())) == 1000
    assert sorted(Counter(yte.tolist()).values()) == [166, 166, 167, 167, 167, 167]  # balanced topics
    r = linear_probe(xtr, ytr, xva, yva, xte, yte, [0.1], max_iter=100)
    print(f"random-init micro probe {r.test_accuracy:.3f} (build {t_build:.0f}s, all {time.perf_counter() - t0:.0f}s)")
    assert 0.2 < r.test_accuracy < 0.8

    # the training stream reads the same shards: whole batches of wrapped ids from the train split only
    b = next(iter(TrainStream(src, 16, 77, seed=0, rank=0, num_roles=1)))
    assert b["text"].shape[0] == 16 and int(b["sample_id"].max()) < 8000 and int(b["_bad"]) == 0
    assert (b["text"][:, 0] == SOT).all() and (b["text"][torch.arange(16), b["text_len"] - 1] == EOT).all()
    assert 10 <= int(b["text_len"].min()) and int(b["text_len"].max()) <= 77
