"""What every evaluator's result file shares: the header naming what was measured, and the write."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmssl.atomic import write_text
from mmssl.data.loader import DataSource
from mmssl.encoder import Encoder


def header(evaluator: str, enc: Encoder, encoder_path: str | Path, source: DataSource,
           init_source: str) -> dict[str, Any]:
    """The keys ``mmssl report`` reads to name a result: evaluator, modality, encoder, data, baseline."""
    return {"evaluator": evaluator, "modality": enc.adapter.name,
            "encoder": str(getattr(enc, "source", encoder_path)), "data": str(source.root),
            "random_init_source": init_source}


def write_result(out: str | Path, name: str, result: dict[str, Any],
                 plot: Callable[[dict[str, Any], Path], None]) -> Path:
    """``out/<name>.json`` (atomic) and ``out/<name>.png``; returns the JSON's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    write_text(path, json.dumps(result, indent=2))
    plot(result, out / f"{name}.png")
    return path


def pair_init_label(init: Any) -> str:
    """What a contrastive run's step-0 pair is: "step0", unless a tower started from a weights file."""
    from mmssl.eval.features import step0_label

    labels = {step0_label(e) for e in getattr(init, "encoders", {}).values()} - {"step0"}
    return "; ".join(sorted(labels)) or "step0"
