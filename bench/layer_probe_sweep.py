"""Quick per-layer linear probes of one or more speech runs (used to choose the CPU defaults).

    python bench/layer_probe_sweep.py RUN [RUN:init ...]

RUN:init probes the run's step-0 weights. Probes train on the first 1,000 training items (iter_split
order), choose C in {0.01, 0.1, 1, 10} on 400 validation items and report accuracy on 1,000 test
items, for the tokens, every block and the final output (mean pooling)."""
from __future__ import annotations

import sys

import torch
from mmssl.eval.probe_fit import linear_probe

from mmssl.config import cache_dir, compose
from mmssl.data.loader import iter_split, resolve_source
from mmssl.encoder import masked_mean
from mmssl.export import load_encoder


def layer_features(enc, src, split: str, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    ys = []
    with torch.no_grad():
        for i, b in enumerate(iter_split(src, split, 32)):
            if i * 32 >= n:
                break
            tok = enc.adapter.tokenize(b)
            o = enc.encode(tok, return_layers=True)
            hs = {"tok": tok.x, **{f"L{j}": h for j, h in enumerate(o.layers)}, "last": o.last}
            for k, h in hs.items():
                out.setdefault(k, []).append(masked_mean(h, o.pad))
            ys.append(b["label"])
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(ys)


def main(paths: list[str]) -> None:
    torch.set_num_threads(2)
    src = resolve_source({"name": "default"}, ["speech"], "speech-synth", cache_dir(compose([])))
    for path in paths:
        run, _, tag = path.partition(":")
        enc = load_encoder(run, which="encoders_init" if tag == "init" else "encoders")
        tr, ytr = layer_features(enc, src, "train", 1000)
        va, yva = layer_features(enc, src, "val", 400)
        te, yte = layer_features(enc, src, "test", 1000)
        accs = {k: round(linear_probe(tr[k], ytr, va[k], yva, te[k], yte, [0.01, 0.1, 1.0, 10.0]).test_accuracy, 3)
                for k in tr}
        print(path, accs, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
