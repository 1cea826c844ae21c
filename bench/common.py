"""Measurement helpers shared by the benchmark scripts in bench/ (HuBERT, MAE).

Each script runs mmssl and a reference on the same device; these helpers make the source tree
importable, time steps with device synchronisation, count model FLOPs with ``FlopCounterMode``,
measure the bf16 matmul peak the MFU figures divide by, and write the results JSON atomically."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

# Dense bf16 tensor-core peaks from vendor data sheets, for a second MFU figure (the primary one uses
# the matmul peak measured in the run).
SPEC_PEAK_BF16 = {"H100 80GB HBM3": 989.4e12, "H100 SXM": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12,
                  "H200": 989.4e12, "A100": 312e12}


def use_source_tree() -> None:
    """Make mmssl importable from this checkout when it is not installed (the GPU machine runs the
    copied tree with PYTHONPATH=$PWD): pyproject.toml maps mmssl.modalities, mmssl.eval and
    mmssl.configs to the top-level folders modalities/, eval/ and configs/."""
    import importlib.util
    from pathlib import Path

    try:
        import mmssl.configs
        import mmssl.modalities
        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import mmssl

    for sub in ("configs", "modalities", "eval"):
        name, folder = f"mmssl.{sub}", root / sub
        if name in sys.modules or not (folder / "__init__.py").exists():
            continue
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        setattr(mmssl, sub, mod)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]


def spec_peak(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a device, by name; None when unknown."""
    return next((v for key, v in SPEC_PEAK_BF16.items() if key in device_name), None)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, n: int, iters: int, repeats: int = 3) -> dict[str, Any]:
    """Best-of-``repeats`` throughput of ``iters`` back-to-back n x n x n bf16 matmuls."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    del a, b, c
    return {"matmul_n": n, "iters": iters, "repeats": repeats, "flops_per_s": best}


def count_flops(fwd_bwd: Callable[[], None], context: AbstractContextManager | None = None) -> dict[str, Any]:
    """FLOPs of one call of ``fwd_bwd`` (a forward + backward, no optimiser step), counted per op by
    ``FlopCounterMode`` inside ``context`` (e.g. one that switches layer drop off)."""
    from torch.utils.flop_counter import FlopCounterMode

    with context if context is not None else contextlib.nullcontext():
        fc = FlopCounterMode(display=False)
        with fc:
            fwd_bwd()
    # (Per-module attribution of backward FLOPs is unreliable across nn.Module hooks; per op it is exact.)
    by_op = {str(op): int(v) for op, v in fc.get_flop_counts().get("Global", {}).items()}
    return {"total": int(fc.get_total_flops()), "by_op": by_op}


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """``warmup`` untimed then ``steps`` timed calls of ``step``, each between device synchronisations;
    the peak memory covers the timed steps."""
    warm = []
    for _ in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        warm.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync(device)  # both trainers synchronise every step anyway (finite checks)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    times_sorted = sorted(times)
    out = {"warmup_s": warm, "step_s": times, "step_s_median": times_sorted[len(times) // 2],
           "step_s_mean": sum(times) / len(times), "step_s_min": times_sorted[0]}
    if device.type == "cuda":
        out["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (the loss checks compare true fp32)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def write_json(path: str, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` through a temporary file, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)


SIDES = ("mmssl", "ref", "ref_compiled", "mmssl_compiled")


def add_run_args(p: Any) -> None:
    """The options every benchmark shares (argparse parser ``p``)."""
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled sides")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (default 8192; smoke 256)")
    p.add_argument("--peak-iters", type=int, default=None, help="matmuls per peak timing (default 50; smoke 2)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the loss-equivalence check")
    p.add_argument("--check-only", action="store_true", help="run only the loss-equivalence check")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results JSON here")


def finish_run_args(p: Any, a: Any) -> Any:
    """Smoke/full defaults of the shared options, and the list of sides to run."""
    sm = a.smoke
    a.shape = "smoke" if sm else "base"
    a.warmup = a.warmup if a.warmup is not None else (1 if sm else 5)
    a.steps = a.steps or (2 if sm else 20)
    small = sm or a.device == "cpu"
    a.peak_n = a.peak_n or (256 if sm else 1024 if small else 8192)
    a.peak_iters = a.peak_iters or (2 if small else 50)
    if a.sides is None:
        a.sides = "mmssl,ref" if (sm or a.no_compile) else ",".join(SIDES)
    a.sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    bad = set(a.sides) - set(SIDES)
    if bad:
        p.error(f"unknown sides: {sorted(bad)}")
    if a.no_compile:
        a.sides = [s for s in a.sides if not s.endswith("_compiled")]
    return a


def start(args: Any, argv: list[str] | None, script: str) -> tuple[torch.device, str]:
    """The device (refusing CUDA where there is none), thread count, and the command line to record."""
    import shlex

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --smoke)")
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    words = [sys.executable, *sys.argv] if argv is None else ["python", script, *argv]
    return device, " ".join(shlex.quote(x) for x in words)
