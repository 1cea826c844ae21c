"""Synthetic brain MRI phantoms with four contrasts and lesions: the embedded default MRI data set.

Every case is one head on a ``SIZE``^3 grid seen through four co-registered contrasts (T1, T1ce, T2,
FLAIR) that share one anatomy, numpy only, deterministic given a seed:

* Anatomy (tissue fractions with soft, partial-volume edges): a skull-stripped head-like ellipsoid of
  random size, elongation and tilt; a cortical grey-matter ribbon of wavy (gyri-like) thickness, with
  sulcal CSF at its outer edge; white matter inside; two deep grey-matter nuclei; two lateral
  ventricles of random size (atrophy varies between heads).
* Tissue intensities per contrast follow the textbook appearance: CSF dark on T1 and FLAIR, bright on
  T2; white matter brighter than grey matter on T1, darker on T2 (``TISSUES``).
* Lesions, the label (``CLASSES``): ``none``; ``solitary`` (one non-enhancing lesion: bright on T2 and
  FLAIR, a little dark on T1); ``enhancing`` (a necrotic core, an enhancing rim that only T1ce shows
  brightly, surrounding oedema bright on FLAIR); ``multiple`` (3-6 small ovoid lesions, bright on
  FLAIR and T2, often near the ventricles as in multiple sclerosis). Sizes, positions, elongations and
  lesion contrast vary within every class, so the classes overlap at the small end.
* Acquisition: a smooth multiplicative bias field per contrast, a random gain, Gaussian noise inside
  the head; then each contrast is z-scored within the head mask and the background set to 0 (what
  ``data.read_case`` does to real scans).
* Missing contrasts: each contrast is present with probability ``PRESENT_P``, independently of the
  label, drawn again until at least one is present; absent volumes are zeros with a False presence.

A randomly initialised micro encoder probes at roughly 0.5 (chance 0.25): learnable, far from solved.
The output is a pure function of ``(GENERATOR_VERSION, split, seed, index)``. ``GENERATOR_VERSION`` is
frozen once shipped: any change that alters a single voxel must bump it."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mmssl.data.synth_splits import balanced_labels, split_code, split_count

GENERATOR_VERSION: int = 1

SIZE = 24
SPLITS = {"train": 3000, "val": 500, "test": 1000}
CONTRASTS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
CLASSES: tuple[str, ...] = ("none", "solitary", "enhancing", "multiple")
NUM_CLASSES = len(CLASSES)
PRESENT_P = 0.7

#: tissue -> intensity per contrast (t1, t1ce, t2, flair), relative units before gain and bias
TISSUES: dict[str, tuple[float, float, float, float]] = {
    "csf": (0.25, 0.27, 1.00, 0.10),
    "gm": (0.55, 0.57, 0.62, 0.58),
    "wm": (0.80, 0.82, 0.42, 0.48),
    "deep": (0.62, 0.64, 0.55, 0.55),
    "lesion": (0.42, 0.44, 0.88, 0.95),  # non-enhancing lesion / MS plaque
    "oedema": (0.55, 0.56, 0.80, 0.90),
    "rim": (0.50, 1.25, 0.70, 0.75),  # enhancing rim: bright on T1ce only
    "necrosis": (0.22, 0.24, 1.00, 0.35),
}
_INTENSITY = np.array(list(TISSUES.values()), dtype=np.float32)  # [T, 4]

# voxel centres in [-1, 1], [SIZE, SIZE, SIZE] each (axes d, h, w)
_C = (np.arange(SIZE, dtype=np.float32) + 0.5) / SIZE * 2.0 - 1.0
_D, _H, _W = np.meshgrid(_C, _C, _C, indexing="ij")
_EDGE = 0.5 * 2.0 / SIZE  # half a voxel in normalised units: the partial-volume edge width


@dataclass
class Case:
    volumes: np.ndarray  # [4, SIZE, SIZE, SIZE] float32, z-scored in the head, 0 outside and when absent
    present: np.ndarray  # [4] bool
    label: int


def _soft(signed: np.ndarray, width: float = _EDGE) -> np.ndarray:
    """Fraction inside from a signed distance (negative inside), a sigmoid over about one voxel."""
    return 1.0 / (1.0 + np.exp(np.clip(signed / width, -30, 30)))


def _ellipsoid(centre: np.ndarray, axes: np.ndarray, rot: np.ndarray | None = None) -> np.ndarray:
    """Approximate signed distance (normalised units) to an ellipsoid: (radius - 1) * smallest axis."""
    c, a = [float(v) for v in centre], [float(v) for v in axes]  # python floats keep the grid float32
    p = [_D - c[0], _H - c[1], _W - c[2]]
    if rot is not None:
        p = [float(rot[i, 0]) * p[0] + float(rot[i, 1]) * p[1] + float(rot[i, 2]) * p[2] for i in range(3)]
    r = np.sqrt((p[0] / a[0]) ** 2 + (p[1] / a[1]) ** 2 + (p[2] / a[2]) ** 2)
    return (r - 1.0) * min(a)


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """A rotation by up to ``max_angle`` radians about each axis in turn."""
    out = np.eye(3)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        a = rng.uniform(-max_angle, max_angle)
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        out = r @ out
    return out


def _anatomy(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """-> (tissue fractions, head signed distance, shape parameters for placing lesions)."""
    head_axes = np.array([rng.uniform(0.78, 0.9), rng.uniform(0.7, 0.84), rng.uniform(0.82, 0.94)])
    centre = rng.uniform(-0.04, 0.04, 3)
    rot = _rotation(rng, 0.15)
    head = _ellipsoid(centre, head_axes, rot)
    brain = _soft(head)
    # cortical ribbon: its inner boundary wavy (gyri), thickness ~ 0.12-0.2 of the radius
    c = [float(v) for v in centre]
    d = [_D - c[0], _H - c[1], _W - c[2]]
    p = [float(rot[i, 0]) * d[0] + float(rot[i, 1]) * d[1] + float(rot[i, 2]) * d[2] for i in range(3)]
    theta, phi = np.arctan2(p[1], p[2]), np.arctan2(p[0], np.hypot(p[1], p[2]))
    k1, k2 = int(rng.integers(4, 8)), int(rng.integers(3, 6))
    wave = np.sin(k1 * theta + float(rng.uniform(0, 6.3))) * np.cos(k2 * phi + float(rng.uniform(0, 6.3)))
    thick = float(rng.uniform(0.12, 0.2)) * (1.0 + 0.45 * wave)
    inner = _soft(head + thick * float(head_axes.min()))  # inside the white-matter boundary
    sulci = brain - _soft(head + 0.045)  # a thin CSF layer at the surface
    deep = np.zeros_like(head)
    for side in (-1.0, 1.0):  # two deep grey nuclei (thalamus-like), lateral to the ventricles
        c = centre + np.array([rng.uniform(-0.05, 0.05), side * rng.uniform(0.22, 0.3), rng.uniform(-0.1, 0.05)])
        deep = np.maximum(deep, _soft(_ellipsoid(c, np.array([0.16, 0.11, 0.17]) * rng.uniform(0.85, 1.15))))
    vent = np.zeros_like(head)
    vsize = rng.uniform(0.7, 1.6)  # atrophy: ventricle size varies between heads
    for side in (-1.0, 1.0):
        c = centre + np.array([rng.uniform(0.02, 0.12), side * 0.1 * vsize, rng.uniform(-0.05, 0.05)])
        vent = np.maximum(vent, _soft(_ellipsoid(c, np.array([0.13, 0.07, 0.33]) * vsize)))
    csf = np.clip(np.maximum(vent, sulci), 0, 1) * brain
    deep = deep * inner * (1 - csf)
    wm = inner * (1 - csf) * (1 - deep)
    gm = np.clip(brain - wm - csf - deep, 0, 1)
    tissues = {"csf": csf, "gm": gm, "wm": wm, "deep": deep}
    return tissues, head, {"centre": centre, "axes": head_axes, "vent": np.array([vsize]), "brain": brain}


def _inside_point(rng: np.random.Generator, shape: dict[str, np.ndarray], depth: float) -> np.ndarray:
    """A random point at most ``depth`` of the head's radius from its centre."""
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    return shape["centre"] + u * shape["axes"] * depth * rng.uniform(0.25, 1.0) ** (1 / 3)


def _lesions(label: int, rng: np.random.Generator, shape: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Lesion tissue fractions for a class (empty for ``none``)."""
    z = np.zeros_like(_D)
    out = {"lesion": z, "oedema": z, "rim": z, "necrosis": z}  # replaced, never written in place
    name = CLASSES[label]
    if name == "solitary":
        r = rng.uniform(0.1, 0.3)
        c = _inside_point(rng, shape, 0.62)
        axes = r * rng.uniform(0.7, 1.3, 3)
        core = _soft(_ellipsoid(c, axes, _rotation(rng, 1.5)))
        out["lesion"] = core * float(rng.uniform(0.6, 1.0))  # lesion contrast varies
        out["oedema"] = (_soft(_ellipsoid(c, axes * rng.uniform(1.2, 1.6))) - core).clip(0, 1) * 0.6
    elif name == "enhancing":
        r = rng.uniform(0.12, 0.3)
        c = _inside_point(rng, shape, 0.6)
        axes = r * rng.uniform(0.75, 1.25, 3)
        rot = _rotation(rng, 1.5)
        outer = _soft(_ellipsoid(c, axes, rot))
        nec = _soft(_ellipsoid(c, axes * rng.uniform(0.45, 0.7), rot))
        out["necrosis"] = nec
        out["rim"] = (outer - nec).clip(0, 1) * float(rng.uniform(0.6, 1.0))
        out["oedema"] = (_soft(_ellipsoid(c, axes * rng.uniform(1.4, 2.0), rot)) - outer).clip(0, 1) * 0.8
    elif name == "multiple":
        for _ in range(int(rng.integers(3, 7))):
            if rng.uniform() < 0.6:  # periventricular: near the ventricles
                c = shape["centre"] + rng.normal(0, 1, 3) * np.array([0.12, 0.22, 0.3]) * shape["vent"][0] ** 0.5
            else:
                c = _inside_point(rng, shape, 0.6)
            axes = rng.uniform(0.06, 0.13) * np.array([1.0, 1.0, rng.uniform(1.0, 1.8)])
            out["lesion"] = np.maximum(out["lesion"], _soft(_ellipsoid(c, axes, _rotation(rng, 1.5))))
        out["lesion"] = out["lesion"] * float(rng.uniform(0.6, 1.0))
    return out


def _bias(rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative bias field: exp of a random low-order polynomial, about +-20%."""
    a = [float(v) for v in rng.normal(0, 0.1, 9)]
    f = (a[0] * _D + a[1] * _H + a[2] * _W + a[3] * _D * _H + a[4] * _H * _W + a[5] * _D * _W
         + a[6] * _D**2 + a[7] * _H**2 + a[8] * _W**2)
    return np.exp(f)


def render(label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One case -> (volumes [4, SIZE, SIZE, SIZE] float32 z-scored in the head, head mask [S, S, S] bool)."""
    tissues, head, shape = _anatomy(rng)
    les = _lesions(label, rng, shape)
    brain = shape["brain"]
    keep = 1.0 - np.clip(sum(les.values()), 0, 1) * brain if label else 1.0  # lesions replace tissue
    frac = np.stack([tissues[t] * keep if t in tissues else les[t] * brain for t in TISSUES])  # [T, S, S, S]
    # per-case tissue contrast jitter (scanners differ), then mix: [4, T] @ [T, V]
    inten = (_INTENSITY * rng.uniform(0.92, 1.08, _INTENSITY.shape)).T.astype(np.float32)
    vol = (inten @ frac.reshape(len(TISSUES), -1)).reshape(-1, SIZE, SIZE, SIZE)
    mask = brain > 0.5
    for m in range(vol.shape[0]):
        v = vol[m]
        v *= _bias(rng) * float(rng.uniform(0.8, 1.25))
        v += rng.standard_normal(v.shape, dtype=np.float32) * float(rng.uniform(0.02, 0.06)) * brain
        vals = v[mask]
        v -= vals.mean()
        v /= max(float(vals.std()), 1e-6)
        v[~mask] = 0.0
    return vol, mask


def presence(rng: np.random.Generator, n: int = len(CONTRASTS)) -> np.ndarray:
    """Which contrasts a case has: each with probability ``PRESENT_P``, never none."""
    while True:
        p = rng.uniform(size=n) < PRESENT_P
        if p.any():
            return p


def generate(split: str, n: int | None = None, seed: int = 0, start: int = 0) -> Iterator[Case]:
    """Yield ``n`` cases of ``split`` (default: its size in ``SPLITS``).

    Case ``i`` depends only on ``(split, seed, i)``, so a shorter ``n`` yields a prefix of the full
    split. Splits use disjoint random streams (seeded by the split name). Labels are balanced (a
    shuffled repetition of the classes over the split's nominal size). Any split name is accepted when
    ``n`` is given.
    ``start`` skips the first ``start`` items (one worker's chunk, mmssl/data/pool.py)."""
    n, seed = split_count(split, n, seed, SPLITS)
    labels = balanced_labels(GENERATOR_VERSION, seed, split, max(n, SPLITS.get(split, 0)), NUM_CLASSES)
    code = split_code(split)
    for i in range(start, n):
        rng = np.random.default_rng([GENERATOR_VERSION, seed, code, 1, i])
        y = int(labels[i])
        vol, _ = render(y, rng)
        present = presence(rng)
        vol[~present] = 0.0
        yield Case(vol, present, y)
