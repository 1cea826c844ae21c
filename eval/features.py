"""Feature extraction for evaluators: pooled encoder features and the adapter's classical baseline."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from mmssl.data.loader import DataSource, iter_split
from mmssl.encoder import Encoder
from mmssl.export import load_encoder, resolve_encoder_dir
from mmssl.factory import build_encoder
from mmssl.types import Batch


@torch.no_grad()
def extract(fn: Callable[[Batch], torch.Tensor], source: DataSource, split: str, device: torch.device,
            batch_size: int = 32, bad: Counter | None = None,
            max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fn(batch) -> [B, F] over a whole split -> (features [n, F] float32 cpu, labels [n], sample ids [n]).
    ``max_len``: the encoder's expected input size (``input_size``), applied by the codec."""
    feats, labels, ids = [], [], []
    for batch in iter_split(source, split, batch_size, bad, max_len=max_len):
        b = {k: v.to(device) for k, v in batch.items()}
        feats.append(fn(b).float().cpu())
        labels.append(batch.get("label", torch.full_like(batch["sample_id"], -1)))
        ids.append(batch["sample_id"])
    if not feats:
        raise ValueError(f"split {split!r} of {source.root} has no usable samples")
    return torch.cat(feats), torch.cat(labels), torch.cat(ids)


def input_size(encoder: Encoder) -> int | None:
    """The input size an encoder was trained on (its preprocessing ``max_len``: an image side, a text
    context), so evaluation feeds it the same; None where inputs are taken whole (speech)."""
    v = encoder.config.get("preprocessing", {}).get("max_len")
    return None if v is None else int(v)


def encoder_fn(encoder: Encoder, layer: int = -1) -> Callable[[Batch], torch.Tensor]:
    encoder.eval()
    return lambda b: encoder.embed(b, layer=layer)


def baseline_fn(encoder: Encoder) -> Callable[[Batch], torch.Tensor]:
    return lambda b: encoder.adapter.baseline_features(b)


def baseline_name(encoder: Encoder) -> str:
    """What the adapter's classical features are: the first line of its ``baseline_features`` doc."""
    doc = type(encoder.adapter).baseline_features.__doc__
    return doc.strip().splitlines()[0] if doc else "baseline_features"


def init_encoder(path: str | Path, trained: Encoder, seed: int = 0) -> tuple[Encoder, str]:
    """The random-init baseline every evaluator reports: the run's own step-0 weights when the run kept
    them (``encoders_init/``), else the same architecture freshly initialised with ``seed``."""
    try:
        d = resolve_encoder_dir(Path(path), trained.adapter.name, which="encoders_init")
    except (FileNotFoundError, ValueError):  # an import, or a run without step-0 weights
        torch.manual_seed(seed)
        return build_encoder(trained.config).eval(), f"fresh_init_seed{seed}"
    init = load_encoder(d)  # weights that do not fit are an error, not a silent fallback
    return init, step0_label(init)


def step0_label(encoder: Encoder) -> str:
    """"step0", or what the step-0 weights really are when they came from a file (an open_clip tower
    built from a weights file is not a random initialisation)."""
    src = (encoder.config.get("open_clip") or {}).get("initialised_from")
    return f"step0 (loaded from {src}: not random)" if src else "step0"
