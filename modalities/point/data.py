"""Point cloud data: readers for ``.npy``, ``.ply`` and ``.off`` files, float32 xyz in shards, padded
batches sampled to a fixed count, and the embedded preset ``point-synth``.

Items hold ``point``: float32 [P, 3] in the file's own coordinates (numpy from ``read_file``, a tensor
from ``decode``). Centring and scaling to the unit sphere happen inside the adapter, not here: shards
keep what the files held, and every view or crop is normalised the same way the model sees it.

Batches hold ``point`` float32 [B, P, 3] (zero padding after each cloud's points) and ``point_len``
int64 [B]. ``max_len`` (the modality's ``num_points``) caps the points per cloud: a cloud with more
is cut to a random subset drawn with the collate generator in training, and to a fixed subset (a
permutation seeded by ``EVAL_SEED``, the same for every call) at evaluation. A fixed random subset,
not farthest point sampling, so evaluation sees the same point density as training's random
subsets. Clouds with fewer points stay whole (padded)."""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmssl.data.pool import pooled
from mmssl.data.shards import BadSample, build_atomically, write_labelled_splits
from mmssl.registry import PRESETS
from mmssl.types import Batch

#: the webdataset field a cloud is stored under (``<key>.point.npy`` in a shard): named, so it never
#: collides with another modality's ``npy`` in a paired sample
FIELD = "point.npy"
#: points sampled on the surface of a mesh (an ``.off`` file with faces)
MESH_POINTS = 2048
#: seed of the surface sampling of meshes and of the fixed evaluation subsets: the same every time
MESH_SEED = 0
EVAL_SEED = 0

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


# --------------------------------------------------------------------------------------------------
# Geometry shared with the generator.
# --------------------------------------------------------------------------------------------------
def sample_mesh(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniformly on a triangle mesh's surface: triangles drawn with probability
    proportional to their area, then uniform barycentric coordinates (the square-root trick).

    vertices [V, 3], faces [F, 3] int -> [n, 3] float64. Raises ValueError when the area is zero."""
    tri = vertices[faces]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = float(area.sum())
    if not np.isfinite(total) or total <= 0:
        raise ValueError("the mesh has no surface area")
    f = rng.choice(len(tri), size=n, p=area / total)
    r1, r2 = np.sqrt(rng.random(n))[:, None], rng.random(n)[:, None]
    a, b, c = tri[f, 0], tri[f, 1], tri[f, 2]
    return (1 - r1) * a + r1 * (1 - r2) * b + r1 * r2 * c


# --------------------------------------------------------------------------------------------------
# Readers: bytes -> float [P, 3]; BadSample("reason: name: detail") for what cannot be used.
# --------------------------------------------------------------------------------------------------
def _check(xyz: np.ndarray, name: str) -> np.ndarray:
    """The checks every reader ends with -> float32 [P, 3]."""
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise BadSample(f"wrong_shape: {name}: expected [P, 3] coordinates, got {list(xyz.shape)}")
    if xyz.shape[0] == 0:
        raise BadSample(f"empty: {name}: no points")
    xyz = xyz.astype(np.float32)
    bad = ~np.isfinite(xyz).all(1)
    if bad.any():
        raise BadSample(f"non_finite: {name}: {int(bad.sum())} of {len(xyz)} points hold NaN or infinity")
    return np.ascontiguousarray(xyz)


def read_npy(data: bytes, name: str) -> np.ndarray:
    """An ``.npy`` array [P, C >= 3] (columns after the third ignored: normals, colours, intensity)
    or a structured array with fields x, y, z -> float32 [P, 3]. Pickled object arrays are refused."""
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # ValueError (pickled objects), EOFError, OSError, ...
        raise BadSample(f"unreadable: {name}: {type(e).__name__}: {e}") from None
    if not isinstance(a, np.ndarray):
        raise BadSample(f"unreadable: {name}: not a single .npy array")
    if a.dtype.names:
        if not {"x", "y", "z"} <= set(a.dtype.names):
            raise BadSample(f"wrong_shape: {name}: structured array without x, y, z fields")
        a = np.stack([a["x"], a["y"], a["z"]], -1).reshape(-1, 3)
    if a.dtype.kind not in "biuf":
        raise BadSample(f"wrong_shape: {name}: coordinates of dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] < 3:
        raise BadSample(f"wrong_shape: {name}: expected [P, 3] or [P, >=3], got {list(a.shape)}")
    return _check(a[:, :3], name)


def _ply_header(data: bytes, name: str) -> tuple[str, list[tuple[str, int, list[tuple[str, str | None, str]]]], int]:
    """-> (format, elements [(name, count, properties [(name, list count type or None, type)])],
    byte offset of the body)."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise BadSample(f"unreadable: {name}: not a PLY file (no 'ply' ... 'end_header' header)")
    body = data.index(b"\n", end) + 1 if b"\n" in data[end:] else len(data)
    fmt, elements = "", []
    for line in data[:end].decode("ascii", "replace").splitlines()[1:]:
        w = line.split()
        if not w or w[0] in ("comment", "obj_info"):
            continue
        if w[0] == "format" and len(w) >= 2:
            fmt = w[1]
        elif w[0] == "element" and len(w) == 3:
            if not w[2].isdigit():
                raise BadSample(f"unreadable: {name}: bad PLY element count in {line!r}")
            elements.append((w[1], int(w[2]), []))
        elif w[0] == "property" and elements:
            if w[1] == "list" and len(w) == 5:
                elements[-1][2].append((w[4], w[2], w[3]))
            elif len(w) == 3:
                elements[-1][2].append((w[2], None, w[1]))
            else:
                raise BadSample(f"unreadable: {name}: bad PLY property line {line!r}")
        else:
            raise BadSample(f"unreadable: {name}: bad PLY header line {line!r}")
    return fmt, elements, body


def read_ply(data: bytes, name: str) -> np.ndarray:
    """A PLY file's ``vertex`` x, y, z -> float32 [P, 3] (other vertex properties and faces ignored).
    Formats ``ascii``, ``binary_little_endian`` and ``binary_big_endian``; in the binary formats only
    elements with fixed-size properties may precede the vertices (as every exporter writes them)."""
    fmt, elements, offset = _ply_header(data, name)
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise BadSample(f"unreadable: {name}: unknown PLY format {fmt!r}")
    try:
        vi = [e[0] for e in elements].index("vertex")
    except ValueError:
        raise BadSample(f"wrong_shape: {name}: PLY file without a vertex element") from None
    _, count, props = elements[vi]
    names = [p[0] for p in props]
    if not {"x", "y", "z"} <= set(names):
        raise BadSample(f"wrong_shape: {name}: PLY vertices without x, y, z properties (have {names})")
    if any(p[1] is not None for p in props):
        raise BadSample(f"unreadable: {name}: PLY vertex element with list properties")
    for p in props:
        if p[2] not in _PLY_TYPES:
            raise BadSample(f"unreadable: {name}: unknown PLY type {p[2]!r}")
    cols = [names.index(c) for c in "xyz"]
    try:
        if fmt == "ascii":
            lines = data[offset:].decode("ascii").splitlines()
            skip = sum(e[1] for e in elements[:vi])  # one line per element entry, lists included
            rows = [ln.split() for ln in lines[skip:skip + count]]
            if len(rows) < count:
                raise BadSample(f"unreadable: {name}: {len(rows)} vertex lines of {count}")
            xyz = np.array([[r[c] for c in cols] for r in rows], dtype=np.float64).reshape(-1, 3)
        else:
            endian = "<" if fmt == "binary_little_endian" else ">"
            for e in elements[:vi]:
                if any(p[1] is not None for p in e[2]):
                    raise BadSample(f"unreadable: {name}: binary PLY with list element {e[0]!r} before "
                                    f"the vertices")
                offset += e[1] * sum(np.dtype(_PLY_TYPES[p[2]]).itemsize for p in e[2])
            dt = np.dtype([(p[0], endian + _PLY_TYPES[p[2]]) for p in props])
            if len(data) < offset + count * dt.itemsize:
                raise BadSample(f"unreadable: {name}: truncated binary PLY ({len(data)} bytes)")
            v = np.frombuffer(data, dtype=dt, count=count, offset=offset)
            xyz = np.stack([v["x"], v["y"], v["z"]], -1).astype(np.float64)
    except BadSample:
        raise
    except Exception as e:  # UnicodeDecodeError, IndexError, ValueError on a bad number
        raise BadSample(f"unreadable: {name}: {type(e).__name__}: {e}") from None
    return _check(xyz, name)


def read_off(data: bytes, name: str, mesh_points: int = MESH_POINTS) -> np.ndarray:
    """An ASCII OFF file -> float32 [P, 3]: ``mesh_points`` points sampled uniformly on the surface
    (area-weighted, seed ``MESH_SEED``: the same points every time) when it has faces of non-zero
    area, else its vertices. Polygons are fan-triangulated; '#' comments are ignored; the header may
    share its line with the counts (``OFF490 518 0``, as in ModelNet40)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise BadSample(f"unreadable: {name}: not an ASCII OFF file") from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not re.match(r"^[A-Z]*OFF", lines[0]):
        raise BadSample(f"unreadable: {name}: no OFF header")
    head = re.sub(r"^[A-Z]*OFF", "", lines[0]).split()
    rest = lines[1:]
    if not head:
        if not rest:
            raise BadSample(f"unreadable: {name}: no vertex and face counts")
        head, rest = rest[0].split(), rest[1:]
    try:
        nv, nf = int(head[0]), int(head[1])
        if nv < 0 or nf < 0:
            raise ValueError("negative counts")
        if len(rest) < nv + nf:
            raise ValueError(f"{len(rest)} lines for {nv} vertices and {nf} faces")
        xyz = np.array([ln.split()[:3] for ln in rest[:nv]], dtype=np.float64).reshape(-1, 3)
        tris: list[tuple[int, int, int]] = []
        for ln in rest[nv:nv + nf]:
            w = ln.split()
            k = int(w[0])
            idx = [int(i) for i in w[1:1 + k]]
            if len(idx) != k or k < 3 or min(idx) < 0 or max(idx) >= nv:
                raise ValueError(f"bad face {ln!r}")
            tris += [(idx[0], idx[j], idx[j + 1]) for j in range(1, k - 1)]
    except (ValueError, IndexError) as e:
        raise BadSample(f"unreadable: {name}: {e}") from None
    xyz = _check(xyz, name).astype(np.float64)
    if tris:
        try:
            return sample_mesh(xyz, np.asarray(tris), mesh_points, np.random.default_rng(MESH_SEED)).astype(np.float32)
        except ValueError:  # degenerate faces only: the vertices are still a point cloud
            pass
    return xyz.astype(np.float32)


READERS = {".npy": read_npy, ".ply": read_ply, ".off": read_off}


# --------------------------------------------------------------------------------------------------
# Codec.
# --------------------------------------------------------------------------------------------------
def subsample(xyz: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """[P, 3] -> [min(P, n), 3]: a random subset drawn with ``generator``, or without one the fixed
    subset of a permutation seeded by ``EVAL_SEED`` (deterministic, order of the file kept)."""
    P = xyz.shape[0]
    if P <= n:
        return xyz
    g = generator if generator is not None else torch.Generator().manual_seed(EVAL_SEED)
    idx = torch.randperm(P, generator=g)[:n]
    return xyz[idx if generator is not None else idx.sort().values]


class PointCodec:
    """Items hold ``point``: float32 [P, 3]; batches ``point`` [B, P, 3] padded and ``point_len`` [B]."""

    modality = "point"
    suffixes = (".npy", ".ply", ".off")

    def read_file(self, path: str) -> dict[str, Any]:
        p = Path(path)
        reader = READERS.get(p.suffix.lower())
        if reader is None:
            raise BadSample(f"unsupported_type: {p.name}: not one of {', '.join(self.suffixes)}")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise BadSample(f"unreadable: {p.name}: {e}") from None
        if not data:
            raise BadSample(f"empty: {p.name}: zero-byte file")
        return {"point": reader(data, p.name)}

    def encode(self, item: dict[str, Any]) -> dict[str, Any]:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(np.asarray(item["point"], dtype=np.float32)), allow_pickle=False)
        return {FIELD: buf.getvalue()}

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = str(raw.get("__key__", "?"))
        if FIELD not in raw:
            raise BadSample(f"missing_field: {key}: no {FIELD} field")
        xyz = read_npy(raw[FIELD], key)
        return {"point": torch.from_numpy(xyz)}

    def length(self, item: dict[str, Any]) -> int:
        return int(item["point"].shape[0])

    def collate(self, items: list[dict[str, Any]], max_len: int | None, generator: torch.Generator | None,
                keep_frame_labels: bool = True) -> Batch:
        """Clouds cut to at most ``max_len`` points (see the module docstring), zero-padded to the
        batch's largest."""
        if max_len is not None and int(max_len) < 1:
            raise ValueError(f"point max_len (num_points) must be positive, not {max_len}")
        clouds = [torch.as_tensor(it["point"], dtype=torch.float32) for it in items]
        if max_len is not None:
            clouds = [subsample(c, int(max_len), generator) for c in clouds]
        lens = torch.tensor([c.shape[0] for c in clouds], dtype=torch.long)
        out = torch.zeros(len(clouds), int(lens.max()), 3)
        for i, c in enumerate(clouds):
            out[i, :c.shape[0]] = c
        return {"point": out, "point_len": lens}


# --------------------------------------------------------------------------------------------------
# Preset.
# --------------------------------------------------------------------------------------------------
@PRESETS.register("point-synth")
class PointSynthPreset:
    """Procedural shapes as noisy surface samples in random poses (modalities/point/synth.py), labelled
    by shape. Generated on first use; the generator version is frozen once shipped."""

    modality = "point"
    version = 1

    def build(self, out: Path, seed: int = 0) -> None:
        from mmssl.modalities.point import synth

        codec = PointCodec()
        meta: dict[str, Any] = {"name": "point-synth", "modality": "point",
                                "generator_version": synth.GENERATOR_VERSION, "seed": seed,
                                "classes": list(synth.CLASSES), "points": list(synth.POINTS), "splits": {},
                                "bad_samples": {}}
        write_labelled_splits(out, synth.SPLITS, lambda split, n: pooled(
            synth.generate, split, n, seed=seed, then=lambda c: (codec.encode({"point": c.points}), c.label)), meta)

    def ensure(self, cache_dir: Path, seed: int = 0) -> Path:
        root = Path(cache_dir) / "data" / f"point-synth-v{self.version}-seed{seed}"
        return build_atomically(root, lambda tmp: self.build(tmp, seed))
