"""MRI data: cases of co-registered contrasts with a presence mask; NIfTI reading and writing (nibabel);
shards with one ``<contrast>.npy`` field per present contrast; the embedded preset ``mri-synth``.

A case is a FOLDER holding one NIfTI file per contrast (``<case>/<contrast>.nii.gz`` or ``.nii``).
File names match the configured contrast names case-insensitively, either whole (``T1ce.nii.gz``) or by
their last ``-``/``_``-separated part (BraTS: ``BraTS2021_00000_t1ce.nii.gz``,
``BraTS-GLI-00000-000-t2f.nii.gz``), through common aliases (``ALIASES``: t1c/t1gd -> t1ce,
t2f/t2flair -> flair, t1n/t1w -> t1, t2w -> t2). Other NIfTI files in the folder (``seg``, masks) are
ignored and listed in the case's ``CaseGeometry.ignored``.

``read_case`` brings a case onto the model's cubic grid: every volume reoriented to the closest
canonical (RAS+) orientation, the contrasts required to share one voxel grid (co-registered, as
BraTS ships them), cropped to the bounding box of the head (the union of the contrasts' foregrounds),
resized with trilinear interpolation so the longest physical side fills ``side`` voxels (aspect kept),
padded with zeros to ``side``^3 at the centre, and z-scored per contrast within the head mask, with 0
outside it (nnU-Net's MRI normalisation). ``CaseGeometry`` records every step, so ``from_grid`` maps a
grid volume (a reconstruction) back to the case's own voxels and ``write_nifti`` saves it beside it."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmssl.data.pool import pooled
from mmssl.data.shards import BadSample, build_atomically, write_labelled_splits
from mmssl.registry import PRESETS
from mmssl.types import Batch

DEFAULT_CONTRASTS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: other spellings of the default contrasts (lower case) -> the configured name
ALIASES: dict[str, str] = {
    "t1n": "t1", "t1w": "t1", "t1native": "t1", "t1pre": "t1", "native": "t1",
    "t1c": "t1ce", "t1gd": "t1ce", "t1post": "t1ce", "t1wce": "t1ce", "t1ce": "t1ce", "t1contrast": "t1ce",
    "t2w": "t2", "t2f": "flair", "t2flair": "flair", "t2fl": "flair", "flair": "flair",
}
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
#: grid side ``read_case`` resamples packed cases to (BM-MAE's 128^3); the model's max_len resizes further
PACK_SIDE = 128
#: a voxel is foreground where it exceeds this fraction of its contrast's 99th percentile
FOREGROUND_FRACTION = 0.01


def nifti_stem(name: str) -> str | None:
    """``T1ce.nii.gz`` -> ``T1ce``; None for a name that is not NIfTI."""
    low = name.lower()
    for suf in (".nii.gz", ".nii"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return None


def match_contrast(name: str, contrasts: tuple[str, ...]) -> str | None:
    """The configured contrast a file name stands for (case-insensitive, whole stem or its last part,
    directly or through ``ALIASES``), or None."""
    stem = nifti_stem(name)
    if stem is None:
        return None
    names = {c.lower(): c for c in contrasts}
    stem = stem.lower()
    parts = [p for p in re.split(r"[-_.\s]+", stem) if p]
    for cand in (stem, stem.replace("-", "").replace("_", ""), *(parts[-1:])):
        if cand in names:
            return names[cand]
        alias = ALIASES.get(cand)
        if alias is not None and alias in names:
            return names[alias]
    return None


def case_folders(root: str | Path) -> list[Path]:
    """Every folder under ``root`` (itself included) that directly holds a NIfTI file: one case each,
    sorted. How ``mmssl data pack modality=mri`` enumerates items."""
    root = Path(root)
    dirs = {p.parent for p in root.rglob("*") if p.is_file() and nifti_stem(p.name) is not None}
    return sorted(dirs)


@dataclass
class CaseGeometry:
    """How a case's canonical voxels map to the model grid (``read_case``), and back (``from_grid``).

    affine: [4, 4] canonical (RAS+) voxel -> world; shape: canonical voxel shape; bbox: (start, stop) per
    axis of the head's bounding box; inner: its resized shape on the grid; offset: where it sits in the
    cube; mask: the head mask in canonical voxels; files: contrast -> file read."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    bbox: tuple[tuple[int, int], ...]
    inner: tuple[int, int, int]
    offset: tuple[int, int, int]
    side: int
    mask: np.ndarray
    files: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


#: the largest voxel edge a scan may claim, in mm (clinical scans: under 10)
MAX_VOXEL_MM = 1000.0


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A NIfTI file -> (float32 [X, Y, Z] canonical, affine, voxel sizes); raises BadSample."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors, ...
        raise BadSample(f"unreadable: {path.name}: {type(e).__name__}: {e}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadSample(f"not_3d: {path.name}: volume of shape {data.shape}")
    if min(data.shape) < 1:
        raise BadSample(f"empty: {path.name}: volume of shape {data.shape}")
    if np.isinf(data).any():  # an overflowed or corrupt volume: z-scoring would zero every other voxel
        raise BadSample(f"non_finite: {path.name}: infinite voxels")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    affine = np.asarray(img.affine, dtype=np.float64)
    if not all(np.isfinite(z) and 0 < z < MAX_VOXEL_MM for z in zooms) or not np.isfinite(affine).all():
        raise BadSample(f"bad_header: {path.name}: voxel sizes {zooms} mm (pixdim must be finite, > 0 and "
                        f"< {MAX_VOXEL_MM:g})")
    # NaN is background (some pipelines write NaN outside the brain mask): 0, like every other background
    return np.nan_to_num(data), affine, zooms


def _resize(vol: torch.Tensor, shape: tuple[int, ...], mode: str = "trilinear") -> torch.Tensor:
    """[C, X, Y, Z] -> [C, *shape] (trilinear, align_corners=False; nearest for masks)."""
    if tuple(vol.shape[1:]) == tuple(shape):
        return vol
    kw = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(vol[None], size=tuple(shape), mode=mode, **kw)[0]


def zscore(vol: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """z-score within ``mask`` ([X, Y, Z] bool), 0 outside (a constant volume becomes 0)."""
    vals = vol[mask]
    if vals.size == 0:
        return np.zeros_like(vol)
    return np.where(mask, (vol - vals.mean()) / max(float(vals.std()), 1e-6), 0.0).astype(np.float32)


def read_case(folder: str | Path, contrasts: tuple[str, ...] = DEFAULT_CONTRASTS, side: int | None = PACK_SIDE,
              return_geometry: bool = False) -> dict[str, Any] | tuple[dict[str, Any], CaseGeometry]:
    """A case folder -> item ``{"mri": float32 [M, S, S, S], "mri_present": bool [M]}`` in the order of
    ``contrasts`` (see the module docstring for the steps); ``side=None`` keeps the head's bounding box
    at its native voxels (no resizing or padding). Raises BadSample: ``no_contrast`` (no file matches),
    ``ambiguous_contrast`` (two files for one contrast), ``shape_mismatch`` (not co-registered),
    ``empty`` (no foreground), ``unreadable``."""
    folder = Path(folder)
    contrasts = tuple(contrasts)
    files: dict[str, Path] = {}
    ignored: list[str] = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not p.is_file() or nifti_stem(p.name) is None:
            continue
        c = match_contrast(p.name, contrasts)
        if c is None:
            ignored.append(p.name)
        elif c in files:
            raise BadSample(f"ambiguous_contrast: {folder.name}: {files[c].name} and {p.name} are both {c}")
        else:
            files[c] = p
    if not folder.is_dir():
        raise BadSample(f"unreadable: {folder.name}: not a folder")
    if not files:
        raise BadSample(f"no_contrast: {folder.name}: no NIfTI file named after {', '.join(contrasts)} "
                        f"(or an alias); found {ignored or 'none'}")
    vols: dict[str, np.ndarray] = {}
    affine, zooms = None, None
    for c, p in files.items():
        v, a, z = _load(p)
        if affine is None:
            affine, zooms, shape = a, z, v.shape
        elif v.shape != shape or not np.allclose(a, affine, atol=1e-3):
            raise BadSample(f"shape_mismatch: {folder.name}: {p.name} has shape {v.shape} and another grid than "
                            f"{files[next(iter(vols))].name} {shape}: contrasts must be co-registered")
        vols[c] = v
    assert affine is not None and zooms is not None
    fg = np.zeros(shape, dtype=bool)
    for v in vols.values():
        hi = float(np.percentile(v, 99))
        fg |= v > max(hi * FOREGROUND_FRACTION, 0.0) if hi > 0 else v > 0
    if not fg.any():
        raise BadSample(f"empty: {folder.name}: no foreground voxel in any contrast")
    idx = np.nonzero(fg)
    bbox = tuple((int(i.min()), int(i.max()) + 1) for i in idx)
    crop = tuple(slice(a, b) for a, b in bbox)
    box = tuple(b - a for a, b in bbox)
    if side is None:
        inner, offset, S = box, (0, 0, 0), None
    else:
        S = int(side)
        extent = [n * z for n, z in zip(box, zooms)]
        scale = S / max(extent)
        inner = tuple(max(1, min(S, round(e * scale))) for e in extent)
        offset = tuple((S - n) // 2 for n in inner)
    M = len(contrasts)
    grid = box if S is None else (S, S, S)
    mask_t = _resize(torch.from_numpy(fg[crop].astype(np.float32))[None], inner)[0] > 0.5
    out = np.zeros((M, *grid), dtype=np.float32)
    present = np.zeros(M, dtype=bool)
    mask = np.zeros(grid, dtype=bool)
    sl = tuple(slice(o, o + n) for o, n in zip(offset, inner))
    mask[sl] = mask_t.numpy()
    for c, v in vols.items():
        m = contrasts.index(c)
        r = _resize(torch.from_numpy(np.ascontiguousarray(v[crop]))[None], inner)[0].numpy()
        cube = np.zeros(grid, dtype=np.float32)
        cube[sl] = r
        out[m] = zscore(cube, mask)
        present[m] = True
    item = {"mri": out, "mri_present": present}
    if not return_geometry:
        return item
    geo = CaseGeometry(affine=affine, shape=tuple(shape), bbox=bbox, inner=tuple(inner), offset=tuple(offset),
                       side=S if S is not None else 0, mask=fg, files={c: str(p) for c, p in files.items()},
                       ignored=ignored)
    return item, geo


def from_grid(vol: np.ndarray | torch.Tensor, geo: CaseGeometry) -> np.ndarray:
    """A volume on the model grid [S, S, S] -> the case's canonical voxels [X, Y, Z] (``read_case``
    undone: un-padded, resized back to the head's bounding box, 0 outside the head mask)."""
    v = torch.as_tensor(np.asarray(vol, dtype=np.float32))
    sl = tuple(slice(o, o + n) for o, n in zip(geo.offset, geo.inner))
    box = tuple(b - a for a, b in geo.bbox)
    inner = _resize(v[sl][None], box)[0].numpy()
    out = np.zeros(geo.shape, dtype=np.float32)
    out[tuple(slice(a, b) for a, b in geo.bbox)] = inner
    out[~geo.mask] = 0.0
    return out


def write_nifti(volume: np.ndarray | torch.Tensor, path: str | Path, affine: np.ndarray | None = None) -> Path:
    """Save a 3D volume [D, H, W] as NIfTI (``.nii`` or ``.nii.gz`` by the name), float32, with
    ``affine`` (voxel -> world, default identity: 1 mm voxels)."""
    import nibabel as nib

    v = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    if v.ndim != 3:
        raise ValueError(f"write_nifti takes a 3D volume, got shape {v.shape}")
    path = Path(path)
    if nifti_stem(path.name) is None:
        raise ValueError(f"{path.name}: a NIfTI file name ends in .nii or .nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(v, np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def fit_cube(vol: torch.Tensor, side: int, generator: torch.Generator | None) -> torch.Tensor:
    """[M, D, H, W] -> [M, side, side, side]: resized (trilinear) so the longest side is ``side`` when
    it differs, then zero-padded to the cube, centred, or at a random offset drawn with ``generator``."""
    shape = tuple(vol.shape[1:])
    if shape == (side, side, side):
        return vol
    if max(shape) != side:
        s = side / max(shape)
        vol = _resize(vol.float(), tuple(max(1, min(side, round(n * s))) for n in shape))
    out = vol.new_zeros((vol.shape[0], side, side, side))
    off = []
    for n in vol.shape[1:]:
        room = side - n
        off.append(int(torch.randint(room + 1, (1,), generator=generator)) if generator is not None else room // 2)
    out[:, off[0]:off[0] + vol.shape[1], off[1]:off[1] + vol.shape[2], off[2]:off[2] + vol.shape[3]] = vol
    return out


class MRICodec:
    """Items hold ``mri``: float [M, D, H, W] (z-scored; zeros where absent) and ``mri_present``: bool
    [M], in the order of ``contrasts``. Shards hold one ``<contrast>.npy`` field per present contrast
    (``np.save``, ``allow_pickle=False``, float16 by default: z-scores keep ~3 significant digits);
    presence is which fields exist. Batches: ``mri`` float32 [B, M, S, S, S], ``mri_present`` [B, M].

    One process reads one contrast list: the MRI adapter calls ``configure`` with its configured
    ``contrasts`` when they differ from the defaults, and a shard field naming no configured contrast
    is a bad sample (``unknown_contrast``), so a mismatch is loud."""

    modality = "mri"
    suffixes = NIFTI_SUFFIXES
    #: ``mmssl data pack``: an item is a folder of NIfTI files (``case_folders``), not one file
    case_dirs = True

    def __init__(self, contrasts: tuple[str, ...] = DEFAULT_CONTRASTS, side: int = PACK_SIDE,
                 dtype: str = "float16") -> None:
        self.contrasts = tuple(contrasts)
        self.side = int(side)
        self.dtype = np.dtype(dtype)

    def configure(self, contrasts: tuple[str, ...] | list[str], side: int | None = None) -> None:
        names = tuple(str(c) for c in contrasts)
        if not names or len(set(n.lower() for n in names)) != len(names):
            raise ValueError(f"MRI contrasts must be distinct names, got {list(names)}")
        self.contrasts = names
        if side is not None:
            self.side = int(side)

    case_folders = staticmethod(case_folders)

    def read_file(self, path: str) -> dict[str, Any]:
        """A case folder -> an item (``read_case`` at ``side``)."""
        return read_case(path, self.contrasts, self.side)  # type: ignore[return-value]

    def encode(self, item: dict[str, Any]) -> dict[str, Any]:
        vol = np.asarray(item["mri"])
        present = np.asarray(item["mri_present"], dtype=bool)
        if vol.shape[0] != len(self.contrasts) or present.shape != (len(self.contrasts),):
            raise ValueError(f"an MRI item needs {len(self.contrasts)} contrast slots, got {vol.shape[0]}")
        out = {}
        for m, name in enumerate(self.contrasts):
            if present[m]:
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(vol[m], dtype=self.dtype), allow_pickle=False)
                out[f"{name.lower()}.npy"] = buf.getvalue()
        if not out:
            raise ValueError("an MRI item needs at least one present contrast")
        return out

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = raw.get("__key__", "?")
        names = [c.lower() for c in self.contrasts]
        fields = {k[:-4]: v for k, v in raw.items() if k.endswith(".npy")}
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise BadSample(f"unknown_contrast: {key}: fields {unknown} name no configured contrast ({', '.join(names)})")
        if not fields:
            raise BadSample(f"missing_field: {key}: no contrast field (<contrast>.npy for one of {', '.join(names)})")
        vols: dict[int, np.ndarray] = {}
        for name, data in fields.items():
            try:
                v = np.load(io.BytesIO(data), allow_pickle=False)
            except Exception as e:
                raise BadSample(f"unreadable: {key}: {name}.npy: {type(e).__name__}: {e}") from None
            if v.ndim != 3 or min(v.shape) < 1:
                raise BadSample(f"not_3d: {key}: {name}.npy has shape {v.shape}")
            vols[names.index(name)] = v
        shapes = {v.shape for v in vols.values()}
        if len(shapes) > 1:
            raise BadSample(f"shape_mismatch: {key}: contrasts of shapes {sorted(shapes)}")
        shape = shapes.pop()
        # numpy, then one tensor: small torch fills cost a thread-pool round trip each
        mri = np.zeros((len(names), *shape), dtype=np.float32)
        present = np.zeros(len(names), dtype=bool)
        for m, v in vols.items():
            mri[m] = v
            present[m] = True
        return {"mri": torch.from_numpy(mri), "mri_present": torch.from_numpy(present)}

    def length(self, item: dict[str, Any]) -> int:
        """Present contrasts: batches of cases with as many contrasts carry the least padding (absent
        contrasts give no tokens)."""
        return int(np.asarray(item["mri_present"]).sum())

    def collate(self, items: list[dict[str, Any]], max_len: int | None, generator: torch.Generator | None,
                keep_frame_labels: bool = True) -> Batch:
        """Cubes of side ``max_len`` (default: the largest side among the items): volumes already that
        size pass through; others are resized so their longest side fits and zero-padded (centred, or at
        a random offset with ``generator``). Volumes of one data set share a shape, so nothing is
        resized for the embedded preset."""
        side = int(max_len) if max_len is not None else max(max(torch.as_tensor(it["mri"]).shape[1:]) for it in items)
        vols = [fit_cube(torch.as_tensor(it["mri"]).float(), side, generator) for it in items]
        present = torch.stack([torch.as_tensor(it["mri_present"]).bool() for it in items])
        return {"mri": torch.stack(vols), "mri_present": present}


# -------------------------------------------------------------------------------------------------
# The embedded preset.
# -------------------------------------------------------------------------------------------------
@PRESETS.register("mri-synth")
class MRISynthPreset:
    """Synthetic brain phantoms, 4 contrasts on a 24^3 grid, 4 lesion classes, random missing
    contrasts (modalities/mri/synth.py). Generated on first use; the generator version is frozen."""

    modality = "mri"
    version = 1

    def build(self, out: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> None:
        """``sizes``: split -> count (default ``synth.SPLITS``); smaller ones give a prefix of each split."""
        from mmssl.modalities.mri import synth

        codec = MRICodec(synth.CONTRASTS)
        sizes = dict(sizes or synth.SPLITS)
        meta: dict[str, Any] = {"name": "mri-synth", "modality": "mri", "generator_version": synth.GENERATOR_VERSION,
                                "seed": seed, "classes": list(synth.CLASSES), "contrasts": list(synth.CONTRASTS),
                                "volume_size": synth.SIZE, "splits": {}, "bad_samples": {}}
        write_labelled_splits(out, sizes, lambda split, n: pooled(
            synth.generate, split, n, seed=seed,
            then=lambda c: (codec.encode({"mri": c.volumes, "mri_present": c.present}), c.label)), meta)

    def ensure(self, cache_dir: Path, seed: int = 0) -> Path:
        root = Path(cache_dir) / "data" / f"mri-synth-v{self.version}-seed{seed}"
        return build_atomically(root, lambda tmp: self.build(tmp, seed))
