"""Every benchmark with its reference, in one command: ``make bench-gpu`` on a GPU machine,
``python bench/run_all.py --device cpu --smoke`` anywhere (what the test suite runs).

Each benchmark runs as its own child process (one process tree: a crash or an out-of-memory in one
cannot take the others down, and each starts with a clean CUDA context and compile cache), one after
another, with its own time limit. Every child writes its JSON into ``--out``; this script then
writes ``summary.json`` (per benchmark: status, seconds, the mmssl / reference ratios, whether the
loss check passed) and ``summary.md`` (the same as a Markdown table), prints the table and exits 1
if a benchmark failed.

The plan (benchmark, arguments on a GPU, arguments in the CPU smoke mode) is ``PLAN``; benchmarks
whose script is absent from ``bench/`` are listed as such rather than silently left out. The GPU
arguments are sized so the whole plan fits in 8 minutes on an H100 including compile warm-ups
(``--no-compile`` skips the compiled sides and their warm-ups)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


@dataclass(frozen=True)
class Bench:
    name: str                              # also the JSON file's stem
    script: str                            # in bench/
    gpu: tuple[str, ...] = ()              # arguments on the device
    smoke: tuple[str, ...] = ("--smoke",)  # arguments of the CPU smoke mode
    limit_s: int = 150                     # the child's time limit on the device
    eager_only: tuple[str, ...] = ()       # arguments added by --no-compile
    ratio_keys: tuple[str, ...] = field(default=("mmssl/ref",))


PLAN: tuple[Bench, ...] = (
    # HuBERT Base, 8 x 10 s, bf16: the eager and compiled sides of mmssl and torchaudio
    Bench("hubert", "hubert_pretrain.py", ("--steps", "10", "--warmup", "3", "--compile-warmup", "5"),
          limit_s=150, eager_only=("--sides", "mmssl,ref"),
          ratio_keys=("mmssl/ref", "mmssl_compiled/ref_compiled")),
    # MAE ViT-B/16, batch 256, bf16, against MAE's models_mae on timm blocks
    Bench("mae", "mae_pretrain.py", ("--steps", "10", "--warmup", "3", "--compile-warmup", "5"),
          limit_s=120, eager_only=("--sides", "mmssl,ref"),
          ratio_keys=("mmssl/ref", "mmssl_compiled/ref_compiled")),
    # CLIP ViT-B/32 + text transformer, batch 512, against open_clip + ClipLoss
    Bench("clip", "clip_step.py", ("--steps", "10", "--warmup", "3", "--compile-warmup", "5"),
          limit_s=120, eager_only=("--sides", "mmssl,ref"),
          ratio_keys=("mmssl/ref", "mmssl_compiled/ref_compiled")),
    # k-means against scikit-learn's MiniBatchKMeans (the GPU path against sklearn on the CPU cores)
    Bench("kmeans", "kmeans.py", (), limit_s=90),
    # the linear-probe sweep on cached features against a plain per-setting loop
    Bench("probe_sweep", "probe_sweep.py", (), limit_s=60, ratio_keys=("ratio_ref_over_mmssl",)),
    # decoded, cropped, collated samples per CPU-second for six modalities' real-format files against a
    # plain Dataset + DataLoader (torchvision ImageFolder, soundfile per file, ...), 1 and 2 workers,
    # pinned memory on the device
    Bench("loader", "loader.py", (), limit_s=150),
)


def ratios(res: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    """The ratios a benchmark reports: its ``ratios`` dict (``mmssl/ref`` and friends) and top-level
    ``ratio*`` keys; ``keys`` come first and are always present (None where missing)."""
    found: dict[str, Any] = {}
    nested = res.get("ratios")
    if isinstance(nested, dict):
        found.update(nested)
    found.update({k: v for k, v in res.items() if k.startswith("ratio") and isinstance(v, (int, float))})
    out: dict[str, Any] = {k: found.get(k) for k in keys}
    out.update({k: v for k, v in found.items() if k not in out and isinstance(v, (int, float))})
    return out


def check_status(res: dict[str, Any]) -> str:
    check = res.get("check")
    if isinstance(check, dict):
        return str(check.get("status", "?"))
    return "-"


def run_one(b: Bench, device: str, smoke: bool, out: Path, no_compile: bool, scale: float) -> dict[str, Any]:
    script = BENCH / b.script
    rec: dict[str, Any] = {"bench": b.name, "script": f"bench/{b.script}"}
    if not script.exists():
        rec.update(status="absent", reason=f"bench/{b.script} is not in this checkout")
        return rec
    args = list(b.smoke if smoke else b.gpu) + (list(b.eager_only) if no_compile and not smoke else [])
    js = out / f"{b.name}.json"
    # relative to the root, so the benchmark prints the command a user types
    cmd = [sys.executable, os.path.relpath(script, ROOT), "--device", device, *args, "--out", str(js)]
    rec["command"] = "python " + " ".join([f"bench/{b.script}", "--device", device, *args, "--out", f"OUT/{js.name}"])
    limit = max(30, int(b.limit_s * scale))
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        rec.update(status="timeout", seconds=round(time.perf_counter() - t, 1), limit_s=limit)
        return rec
    rec["seconds"] = round(time.perf_counter() - t, 1)
    (out / f"{b.name}.log").write_text(proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else ""))
    if proc.returncode != 0 or not js.exists():
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
        rec.update(status="failed", returncode=proc.returncode, error=tail[0][:300])
        return rec
    res = json.loads(js.read_text())
    rec.update(status="ok", ratios=ratios(res, b.ratio_keys), check=check_status(res))
    return rec


def table(records: list[dict[str, Any]], device: str, smoke: bool) -> str:
    head = f"benchmarks on {device}" + (" (smoke mode: checks the code paths; timings mean nothing)" if smoke else "")
    lines = [head, "", "| benchmark | status | seconds | loss check | ratios (mmssl vs reference) |", "|---|---|---|---|---|"]
    for r in records:
        rs = r.get("ratios") or {}
        shown = ", ".join(f"{k} = {v:.2f}x" for k, v in rs.items() if isinstance(v, (int, float))) or "-"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason') or r.get('error') or ''}"
        lines.append(f"| {r['bench']} | {status} | {r.get('seconds', '-')} | {r.get('check', '-')} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks every path, times nothing")
    p.add_argument("--out", default="bench/out", help="folder for each benchmark's JSON and log and the summary")
    p.add_argument("--only", default=None, help="comma-separated benchmark names (default: all of PLAN)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile sides and their warm-ups")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every time limit (a slower device)")
    a = p.parse_args(argv)
    names = [b.name for b in PLAN]
    only = a.only.split(",") if a.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # the smoke mode's limits: a loaded 2-core CI machine, several seconds of imports per child
    scale = a.time_scale * (2.0 if a.smoke else 1.0)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.perf_counter()
    records = [run_one(b, a.device, a.smoke, out, a.no_compile, scale) for b in PLAN if b.name in only]
    summary = {"device": a.device, "smoke": a.smoke, "seconds": round(time.perf_counter() - t0, 1),
               "benchmarks": records}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = table(records, a.device, a.smoke) + f"\n\ntotal {summary['seconds']} s\n"
    (out / "summary.md").write_text(md)
    print(md)
    return 1 if any(r["status"] in ("failed", "timeout") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
