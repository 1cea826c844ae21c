"""Padding left in the backbone's input: padded batches against packed rows (``data.pack=true``), on the
embedded data of text, speech and EEG, through the trainer's own training stream.

For each bare command (``mmssl pretrain modality=M objective=O``: its batch size and crop) the first
``--batches`` training batches are drawn exactly as the trainer draws them (``TrainStream``, length
buckets on or off), each item's token count is the adapter's ``num_tokens`` (no network), and

- padded: 1 - tokens / (B x the longest item's tokens), the share of backbone slots that are padding;
- packed: 1 - tokens / (R x the longest item's tokens), R the first-fit-decreasing rows of
  ``mmssl.packing`` (rows as long as the padded batch's).

Both before masking (MAE's drop masking then shortens every item the same way)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import use_source_tree, write_json  # noqa: E402

use_source_tree()

from mmssl.config import cache_dir, resolve, to_dict  # noqa: E402
from mmssl.data.loader import TrainStream, resolve_source  # noqa: E402
from mmssl.factory import build_encoder  # noqa: E402
from mmssl.packing import first_fit  # noqa: E402

CASES = {"text": "mae", "speech": "hubert", "eeg": "mae"}


def measure(modality: str, objective: str, batches: int, bucket: bool) -> dict[str, float]:
    spec = resolve([f"modality={modality}", f"objective={objective}"])
    encoders = {m: build_encoder(c) for m, c in spec.encoder_configs(Path("/nonexistent")).items()}
    adapter = encoders[modality].adapter
    max_len = spec.input_sizes(encoders)[modality]
    cfg = spec.cfg
    source = resolve_source(to_dict(cfg.data), [modality], cfg.modality[modality].get("preset"), cache_dir(cfg))
    bs = int(cfg.trainer.batch_size)
    stream = iter(TrainStream(source, bs, max_len, int(cfg.trainer.seed), 0, 1, bucket=bucket))
    tokens = padded_slots = packed_slots = 0
    for _ in range(batches):
        n = adapter.num_tokens(next(stream)).tolist()
        longest = max(n)
        tokens += sum(n)
        padded_slots += len(n) * longest
        packed_slots += len(first_fit(n, longest)) * longest
    return {"batch_size": bs, "padded": 1 - tokens / padded_slots, "packed": 1 - tokens / packed_slots,
            "slots_saved": 1 - packed_slots / padded_slots}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--modalities", default=",".join(CASES))
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    rows = []
    print("| command | length buckets | batch | padded: padding share | packed: padding share | backbone slots saved |")
    print("|---|---|---|---|---|---|")
    for m in args.modalities.split(","):
        for bucket in (True, False):
            r = measure(m, CASES[m], args.batches, bucket)
            rows.append({"modality": m, "objective": CASES[m], "bucket": bucket, **r})
            print(f"| `modality={m} objective={CASES[m]}` | {'on' if bucket else 'off'} | {r['batch_size']} | "
                  f"{r['padded']:.3f} | {r['packed']:.3f} | {r['slots_saved']:.3f} |", flush=True)
    if args.out:
        write_json(args.out, {"batches": args.batches, "rows": rows})


if __name__ == "__main__":
    main()
