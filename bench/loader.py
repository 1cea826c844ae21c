"""Data-loader throughput: decoded, cropped, collated training samples per second per CPU core, mmssl's
shard stream against the plain Dataset + DataLoader a user would otherwise write over the same files.

For every case the benchmark first writes real-format files from the embedded generators (nothing is
downloaded): 16 kHz FLAC and WAV recordings (several synthetic words joined to ``--speech-s``
seconds), JPEG images (the synthetic shapes upscaled to 320 x 256 with sensor-like noise), ``.txt``
documents, ``.npy`` point clouds, ``.npz`` EEG recordings (data, ch_names, sfreq) and NIfTI MRI case
folders (four ``.nii.gz`` contrasts). ``mmssl data pack`` (``mmssl.data.pack.pack``) turns each tree
into 4 train shards; then both sides read one epoch with the same worker count, batch size and crop:

- ``mmssl``: ``TrainStream`` + ``train_loader`` exactly as the trainer builds them (shards dealt to the
  workers, decode in the workers, shuffle, length buckets, the codec's collate), stopped after epoch 0;
- ``ref``: speech, a soundfile-per-file Dataset (random 320-sample-aligned crop, padded collate);
  images, torchvision ``ImageFolder`` with ``Resize(side)`` + ``RandomCrop(side)`` + ``ToTensor``; text,
  a file Dataset with ``open_clip.tokenize`` (77 ids); points, ``np.load`` + a random subset; EEG,
  ``np.load`` of the ``.npz`` + a random window + per-channel z-score, channels padded; MRI, nibabel
  loads of the four contrasts + z-score in the head. ``DataLoader(shuffle=True, drop_last=True)``.

Cost is CPU time, not wall time: the main process's own CPU time plus that of its reaped worker
processes (``getrusage``), so ``samples_per_core_s`` = samples / CPU-seconds holds on a shared
machine. ``cores_needed`` divides the GPU step rate of the pretraining benchmarks (bench/RESULTS.md:
the issue's claims, GPU pending) by it. ``--device cuda`` pins memory on both sides (the trainer
moves batches with ``non_blocking=True``)."""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import use_source_tree, write_json  # noqa: E402

use_source_tree()

from mmssl.data.loader import DataSource, TrainStream, train_loader  # noqa: E402
from mmssl.data.pack import pack  # noqa: E402
from mmssl.data.shards import load_meta  # noqa: E402
from mmssl.registry import MODALITIES  # noqa: E402

SHARDS = 4
HOP = 320


@dataclass(frozen=True)
class Case:
    name: str
    modality: str
    fmt: str
    batch: int
    files: int          # full size (a multiple of SHARDS x batch)
    smoke_files: int
    crop: str           # what max_len means, for the table
    #: GPU consumption of this modality in the pretraining benchmarks: (samples/s, source) or None
    gpu: tuple[float, str] | None


# claimed, GPU pending: bench/RESULTS.md, from the issue (no session has measured them)
HUBERT_UTT_PER_S = (64.0, "HuBERT Base ref claim 640 audio-s/s = 64 x 10 s utterances/s (bench/hubert_pretrain.py; "
                          "claimed, GPU pending; mmssl's 3x target would need 192/s)")
CASES: tuple[Case, ...] = (
    Case("speech-flac", "speech", "FLAC 16 kHz", 8, 128, 8, "10 s (160,000 samples)", HUBERT_UTT_PER_S),
    Case("speech-wav", "speech", "WAV 16 kHz PCM16", 8, 128, 8, "10 s (160,000 samples)", HUBERT_UTT_PER_S),
    Case("image-jpeg", "image", "JPEG 320x256 q90", 32, 512, 8, "224 x 224",
         (3200.0, "MAE ViT-B/16 ref claim 3,200 images/s (bench/mae_pretrain.py; claimed, GPU pending)")),
    Case("text", "text", ".txt", 32, 1024, 8, "77 ids",
         (3900.0, "CLIP ViT-B/32 ref claim 3,900 pairs/s (bench/clip_step.py; claimed, GPU pending)")),
    Case("point", "point", ".npy [P, 3]", 32, 512, 8, "512 points", None),
    Case("eeg", "eeg", ".npz 128 Hz", 32, 512, 8, "2,000 ms", None),
    Case("mri", "mri", "NIfTI .nii.gz x 4", 4, 32, 8, "48^3 grid (packed side)", None),
)
CROP = {"speech": 160000, "image": 224, "text": 77, "point": 512, "eeg": 2000, "mri": 48}
SMOKE_CROP = {"speech": 16000, "image": 32, "text": 77, "point": 256, "eeg": 2000, "mri": 16}


# -- the files ------------------------------------------------------------------------------------------
def write_files(case: Case, root: Path, n: int, smoke: bool, seed: int = 0) -> None:
    """``n`` files of ``case`` in class sub-folders ``c<label>/`` under ``root``."""
    m = case.modality
    rng = np.random.default_rng(seed)

    def out(label: int, stem: str, suffix: str) -> Path:
        d = root / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{stem}{suffix}"

    if m == "speech":
        import soundfile as sf

        from mmssl.modalities.speech import synth
        want = int(SMOKE_CROP["speech"] * 1.5 if smoke else CROP["speech"] * 1.2)
        gen = synth.generate("train", seed=seed)
        for i in range(n):
            parts, total, label = [], 0, None
            while total < want:
                u = next(gen)
                label = u.label if label is None else label
                parts.append(u.wav)
                total += u.wav.size
            wav = np.clip(np.concatenate(parts)[:want], -1, 1)
            flac = case.name.endswith("flac")
            sf.write(out(label, f"{i:06d}", ".flac" if flac else ".wav"), wav, 16000,
                     format="FLAC" if flac else "WAV", subtype="PCM_16")
    elif m == "image":
        from PIL import Image

        from mmssl.modalities.image import synth
        size = (48, 40) if smoke else (320, 256)
        for i, im in enumerate(synth.generate("train", n=n, seed=seed)):
            big = np.asarray(Image.fromarray(im.pixels).resize(size, Image.BICUBIC), dtype=np.float32)
            big = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
            Image.fromarray(big).save(out(im.label, f"{i:06d}", ".jpg"), format="JPEG", quality=90)
    elif m == "text":
        from mmssl.modalities.text import synth
        gen = synth.generate("train", n=4 * n, seed=seed)
        for i in range(n):
            s = [next(gen) for _ in range(4)]
            out(s[0].label, f"{i:06d}", ".txt").write_text(" ".join(x.text for x in s))
    elif m == "point":
        from mmssl.modalities.point import synth
        for i, c in enumerate(synth.generate("train", n=n, seed=seed)):
            np.save(out(c.label, f"{i:06d}", ".npy"), c.points.astype(np.float32))
    elif m == "eeg":
        from mmssl.modalities.eeg import synth
        for i, r in enumerate(synth.generate("train", n=n, seed=seed)):
            np.savez(out(r.label, f"{i:06d}", ".npz"), data=r.data.astype(np.float32),
                     ch_names=np.array(r.ch_names, dtype="U"), sfreq=np.float64(r.rate))
    elif m == "mri":
        import nibabel as nib

        from mmssl.modalities.mri import synth
        side = 20 if smoke else 64
        for i, c in enumerate(synth.generate("train", n=n, seed=seed)):
            d = out(c.label, f"case{i:05d}", "")
            d.mkdir(parents=True, exist_ok=True)
            vols = torch.nn.functional.interpolate(torch.from_numpy(c.volumes)[None], size=(side,) * 3,
                                                   mode="trilinear", align_corners=False)[0].numpy()
            for k, name in enumerate(("t1", "t1ce", "t2", "flair")):
                if c.present[k]:
                    # scanner-like positive intensities (the generator's are z-scores)
                    v = np.clip(vols[k] * 150 + 400, 0, None) * (np.abs(vols[k]) > 1e-6)
                    nib.save(nib.Nifti1Image(v.astype(np.float32), np.eye(4)), str(d / f"{name}.nii.gz"))
    else:
        raise ValueError(m)


def pack_files(case: Case, src: Path, out: Path, crop: int) -> Path:
    codec = MODALITIES.get(case.modality).codec
    saved = getattr(codec, "side", None)
    if case.modality == "mri":
        codec.configure(codec.contrasts, side=crop)  # pack straight to the training grid
    try:
        pack(case.modality, src, out, num_shards=SHARDS, val=0.0, test=0.0, seed=0)
    finally:
        if saved is not None:
            codec.side = saved
    return out


# -- the reference side -----------------------------------------------------------------------------------
def files_of(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file())


class SpeechFiles(Dataset):
    def __init__(self, root: Path, crop: int) -> None:
        self.paths, self.crop = files_of(root, "*.*"), crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        import soundfile as sf
        wav, _ = sf.read(self.paths[i], dtype="float32")
        w = torch.from_numpy(wav)
        if w.numel() > self.crop:
            off = int(torch.randint((w.numel() - self.crop) // HOP + 1, (1,))) * HOP
            w = w[off:off + self.crop]
        return w


def pad_collate(ws: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    lens = torch.tensor([w.numel() for w in ws])
    return {"speech": torch.nn.utils.rnn.pad_sequence(ws, batch_first=True), "speech_len": lens}


class TextFiles(Dataset):
    def __init__(self, root: Path) -> None:
        self.paths = files_of(root, "*.txt")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        import open_clip
        return open_clip.tokenize([self.paths[i].read_text()], context_length=77)[0]


class PointFiles(Dataset):
    def __init__(self, root: Path, n: int) -> None:
        self.paths, self.n = files_of(root, "*.npy"), n

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        xyz = torch.from_numpy(np.load(self.paths[i]))
        return xyz[torch.randperm(xyz.shape[0])[: self.n]] if xyz.shape[0] > self.n else xyz


def point_collate(cs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"point": torch.nn.utils.rnn.pad_sequence(cs, batch_first=True),
            "point_len": torch.tensor([c.shape[0] for c in cs])}


class EEGFiles(Dataset):
    def __init__(self, root: Path, window_ms: int) -> None:
        self.paths, self.ms = files_of(root, "*.npz"), window_ms

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with np.load(self.paths[i]) as z:
            x, rate = torch.from_numpy(z["data"].astype(np.float32)), float(z["sfreq"])
        L = int(round(self.ms * rate / 1000))
        if x.shape[1] > L:
            off = int(torch.randint(x.shape[1] - L + 1, (1,)))
            x = x[:, off:off + L]
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-6)


def eeg_collate(xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    C, T = max(x.shape[0] for x in xs), max(x.shape[1] for x in xs)
    out = torch.zeros(len(xs), C, T)
    for i, x in enumerate(xs):
        out[i, :x.shape[0], :x.shape[1]] = x
    return {"eeg": out}


class MRIFiles(Dataset):
    NAMES = ("t1", "t1ce", "t2", "flair")

    def __init__(self, root: Path) -> None:
        self.cases = sorted({p.parent for p in files_of(root, "*.nii.gz")})

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> torch.Tensor:
        import nibabel as nib
        vols = []
        shape = None
        for name in self.NAMES:
            p = self.cases[i] / f"{name}.nii.gz"
            if p.exists():
                v = np.asarray(nib.load(str(p)).get_fdata(dtype=np.float32))
                mask = v > 0
                v = np.where(mask, (v - v[mask].mean()) / max(float(v[mask].std()), 1e-6), 0).astype(np.float32)
                shape = v.shape
                vols.append(v)
            else:
                vols.append(None)
        return torch.from_numpy(np.stack([v if v is not None else np.zeros(shape, np.float32) for v in vols]))


def ref_dataset(case: Case, src: Path, crop: int) -> tuple[Dataset, Callable | None]:
    m = case.modality
    if m == "speech":
        return SpeechFiles(src, crop), pad_collate
    if m == "image":
        from torchvision import datasets, transforms
        t = transforms.Compose([transforms.Resize(crop), transforms.RandomCrop(crop), transforms.ToTensor()])
        return datasets.ImageFolder(str(src), transform=t), None
    if m == "text":
        return TextFiles(src), None
    if m == "point":
        return PointFiles(src, crop), point_collate
    if m == "eeg":
        return EEGFiles(src, crop), eeg_collate
    if m == "mri":
        return MRIFiles(src), None
    raise ValueError(m)


# -- the mmssl side -------------------------------------------------------------------------------------
class OneEpoch(TrainStream):
    """The trainer's stream, each worker stopping after its epoch-0 rounds (all shards hold the same
    number of samples, a multiple of the batch size: SHARDS / workers shards per worker)."""

    per_role = 0

    def __iter__(self):  # type: ignore[override]
        return itertools.islice(super().__iter__(), self.per_role)


# -- timing ---------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def first_tensor(b: Any) -> torch.Tensor:
    if isinstance(b, dict):
        return next(v for k, v in b.items() if isinstance(v, torch.Tensor) and not k.startswith("_"))
    if isinstance(b, (list, tuple)):
        return b[0]
    return b


def measure(make: Callable[[], DataLoader]) -> dict[str, Any]:
    """One epoch of the loader ``make()`` builds -> samples, batches, wall and CPU seconds."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    loader = make()
    samples = batches = 0
    for b in loader:
        samples += int(first_tensor(b).shape[0])
        batches += 1
    wall = time.perf_counter() - t0
    del loader  # workers joined (and their CPU time reaped) once the epoch ended
    cpu = cpu_seconds() - c0
    return {"samples": samples, "batches": batches, "wall_s": round(wall, 6), "cpu_s": round(cpu, 6),
            "samples_per_s": round(samples / wall, 2), "samples_per_core_s": round(samples / max(cpu, 1e-9), 2)}


def run_case(case: Case, work: Path, workers: list[int], smoke: bool, device: str, repeats: int) -> dict[str, Any]:
    n = case.smoke_files if smoke else case.files
    bs = min(case.batch, n // SHARDS) if smoke else case.batch
    assert n % (SHARDS * bs) == 0, (case.name, n, bs)
    crop = (SMOKE_CROP if smoke else CROP)[case.modality]
    src, shards = work / case.name / "files", work / case.name / "shards"
    t0 = time.perf_counter()
    write_files(case, src, n, smoke)
    t_files = time.perf_counter() - t0
    pack_files(case, src, shards, crop)
    t_pack = time.perf_counter() - t0 - t_files
    source = DataSource(shards, load_meta(shards), [case.modality])
    assert int(source.meta["splits"]["train"]["count"]) == n, source.meta.get("bad_samples")
    pin = device == "cuda"
    ds, collate = ref_dataset(case, src, crop)
    assert len(ds) == n
    runs = []
    for w in workers:
        roles = max(w, 1)
        if SHARDS % roles:
            raise ValueError(f"--workers {w}: {SHARDS} shards must split evenly over the workers")

        def mm() -> DataLoader:
            s = OneEpoch(source, bs, crop, seed=0, rank=0, num_roles=roles, world=1,
                         bucket=True)
            s.per_role = (SHARDS // roles) * (n // SHARDS // bs)
            return train_loader(s, w, pin_memory=pin)

        def ref() -> DataLoader:
            return DataLoader(ds, batch_size=bs, shuffle=True, num_workers=w, drop_last=True, collate_fn=collate,
                              pin_memory=pin, prefetch_factor=2 if w else None,
                              generator=torch.Generator().manual_seed(0))

        best: dict[str, dict[str, Any]] = {}
        for _ in range(repeats):  # alternate the sides; keep each side's cheapest epoch
            for side, make in (("mmssl", mm), ("ref", ref)):
                r = measure(make)
                if side not in best or r["cpu_s"] < best[side]["cpu_s"]:
                    best[side] = r
        row = {"workers": w, **best,
               "ratio": round(best["mmssl"]["samples_per_core_s"] / best["ref"]["samples_per_core_s"], 3)}
        if case.gpu:
            row["cores_needed"] = {s: round(case.gpu[0] / best[s]["samples_per_core_s"], 2) for s in ("mmssl", "ref")}
        runs.append(row)
    return {"modality": case.modality, "format": case.fmt, "files": n, "batch_size": bs, "crop": crop,
            "crop_means": case.crop if not smoke else f"smoke crop {crop}", "write_files_s": round(t_files, 2),
            "pack_s": round(t_pack, 2), "gpu_rate": None if case.gpu is None else
            {"samples_per_s": case.gpu[0], "source": case.gpu[1], "status": "claimed, GPU pending"},
            "runs": runs}


def table(res: dict[str, Any]) -> str:
    lines = ["| case | format | batch | crop | workers | mmssl samples/s/core | ref samples/s/core | mmssl / ref "
             "| cores to feed the GPU (mmssl / ref) |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for name, c in res["cases"].items():
        for r in c["runs"]:
            need = r.get("cores_needed")
            feed = (f"{need['mmssl']:.1f} / {need['ref']:.1f} at {c['gpu_rate']['samples_per_s']:,.0f}/s (claimed, GPU pending)"
                    if need else "no GPU step-rate benchmark")
            lines.append(f"| {name} | {c['format']} | {c['batch_size']} | {c['crop_means']} | {r['workers']} | "
                         f"{r['mmssl']['samples_per_core_s']:,.1f} | {r['ref']['samples_per_core_s']:,.1f} | "
                         f"{r['ratio']:.2f}x | {feed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: pinned memory on both sides")
    p.add_argument("--smoke", action="store_true", help="tiny files, in-process loading (0 workers): checks the paths in seconds")
    p.add_argument("--workers", default=None, help="comma-separated loader worker counts (default 1,2; smoke 0)")
    p.add_argument("--cases", default=None, help=f"comma-separated, from {','.join(c.name for c in CASES)}")
    p.add_argument("--repeats", type=int, default=None, help="epochs per side and worker count (best kept; default 2, smoke 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    p.add_argument("--work", default=None, help="folder for the generated files and shards (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    workers = [int(x) for x in (a.workers or ("0" if a.smoke else "1,2")).split(",")]
    names = a.cases.split(",") if a.cases else [c.name for c in CASES]
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}")
    repeats = a.repeats or (1 if a.smoke else 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="mmssl-loader-bench-"))
    res: dict[str, Any] = {"bench": "loader", "smoke": a.smoke, "device": a.device, "workers": workers,
                           "threads": a.threads, "cpu_count": os.cpu_count(), "repeats": repeats,
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                           "command": "python bench/loader.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                           "cases": {}}
    try:
        for c in CASES:
            if c.name in names:
                res["cases"][c.name] = run_case(c, work, workers, a.smoke, a.device, repeats)
                if a.out:
                    write_json(a.out, res)
    finally:
        torch.set_num_threads(threads)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    last = {n: c["runs"][-1]["ratio"] for n, c in res["cases"].items()}
    res["ratios"] = {"mmssl/ref": round(math.exp(sum(math.log(v) for v in last.values()) / len(last)), 3),
                     **{f"mmssl/ref:{n}": v for n, v in last.items()}}
    res["check"] = {"status": "passed" if all(r["mmssl"]["samples"] == r["ref"]["samples"] > 0
                                              for c in res["cases"].values() for r in c["runs"]) else "failed",
                    "what": "both sides yielded the same number of samples in every run"}
    if a.out:
        write_json(a.out, res)
    print(table(res))
    print(f"\nmmssl/ref (geometric mean over cases, {workers[-1]} workers): {res['ratios']['mmssl/ref']:.2f}x")
    return 0 if res["check"]["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
