"""Procedural 3D shapes as point clouds: the embedded default point cloud data set.

Numpy only, deterministic given a seed. Each item is one shape's surface, sampled uniformly by area
(analytic surfaces by inverse transform or rejection, polyhedra through ``sample_mesh``), labelled
by its kind:

* 10 kinds (``CLASSES``): sphere, cube, cylinder, cone, torus, pyramid (square base), capsule,
  prism (triangular), ring (a short hollow tube: outer and inner wall, flat annular top and bottom)
  and hemisphere (a dome closed by its disc). Each has a few shape parameters drawn per item (a
  cylinder's height to radius, a torus's tube radius, ...), within ranges that keep kinds apart.
* Pose and size: anisotropic scale (each axis x0.75-1.33, which also blurs the kinds: a stretched
  sphere is an ellipsoid), then a random rotation about the up axis z followed by a tilt of up to
  60 degrees about a random horizontal axis (shapes stand roughly upright, as in aligned CAD sets
  such as ModelNet, but lean and turn freely), an overall size of 0.5-2 and a random offset: the
  adapter centres and scales every cloud, so these only test that it does.

Why not uniform SO(3) poses: measured with the micro encoder (mean-pooled, linear probe), upright
shapes with only an azimuth are too easy (random init 0.91), and under uniform SO(3) poses neither
random init nor 300 MAE steps get past ~0.55 (a linear probe on pooled, non-invariant features),
while with a 60 degree tilt random init scores ~0.70 and pretraining adds to it.
* Acquisition: Gaussian noise of 0-2% of the shape's size per point, 0-2% outliers spread
  uniformly over the bounding box, and ``POINTS`` (384-1024) points per cloud in a random order.

The output is a pure function of ``(GENERATOR_VERSION, split, seed, index)``. ``GENERATOR_VERSION`` is
frozen once shipped: any change that alters a single point must bump it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from mmssl.data.synth_splits import balanced_labels, split_code, split_count
from mmssl.modalities.point.data import sample_mesh

GENERATOR_VERSION: int = 1

SPLITS = {"train": 4000, "val": 500, "test": 1000}
CLASSES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "capsule", "prism",
                            "ring", "hemisphere")
NUM_CLASSES = len(CLASSES)
POINTS = (384, 1024)  # points per cloud, inclusive
SCALE = (0.75, 4 / 3)  # anisotropic scale per axis
TILT = 60.0  # degrees: the most a shape's up axis leans away from z
NOISE = (0.0, 0.02)  # per-point Gaussian noise, fraction of the radius
OUTLIERS = (0.0, 0.02)  # fraction of points replaced by uniform outliers in the bounding box

Sampler = Callable[[int, np.random.Generator], np.ndarray]


@dataclass
class Cloud:
    points: np.ndarray  # [P, 3] float32
    label: int


# --------------------------------------------------------------------------------------------------
# Surface samplers in a canonical frame (axis z, roughly inside the unit ball): n -> [n, 3].
# --------------------------------------------------------------------------------------------------
def _circle(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = rng.uniform(0, 2 * np.pi, n)
    return np.cos(t), np.sin(t)


def _sphere_pts(n: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)


def _disc(n: int, rng: np.random.Generator, r_out: float, r_in: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform on an annulus r_in <= r <= r_out (a disc when r_in = 0)."""
    r = np.sqrt(rng.uniform(r_in**2, r_out**2, n))
    c, s = _circle(n, rng)
    return r * c, r * s


def _by_area(n: int, rng: np.random.Generator, parts: list[tuple[float, Sampler]]) -> np.ndarray:
    """Split ``n`` points among surface parts in proportion to their areas (multinomial)."""
    areas = np.array([a for a, _ in parts])
    counts = rng.multinomial(n, areas / areas.sum())
    return np.concatenate([f(int(k), rng) for k, (_, f) in zip(counts, parts, strict=True)])


def _tube(r: float, z0: float, z1: float) -> tuple[float, Sampler]:
    def f(n: int, rng: np.random.Generator) -> np.ndarray:
        c, s = _circle(n, rng)
        return np.stack([r * c, r * s, rng.uniform(z0, z1, n)], 1)

    return 2 * np.pi * r * (z1 - z0), f


def _flat(r_out: float, z: float, r_in: float = 0.0) -> tuple[float, Sampler]:
    def f(n: int, rng: np.random.Generator) -> np.ndarray:
        x, y = _disc(n, rng, r_out, r_in)
        return np.stack([x, y, np.full(n, z)], 1)

    return np.pi * (r_out**2 - r_in**2), f


def _cap(r: float, z: float, up: bool) -> tuple[float, Sampler]:
    """A half sphere of radius r centred at height z, bulging up or down."""
    def f(n: int, rng: np.random.Generator) -> np.ndarray:
        p = _sphere_pts(n, rng) * r
        p[:, 2] = np.abs(p[:, 2]) * (1 if up else -1) + z
        return p

    return 2 * np.pi * r * r, f


def sphere(n: int, rng: np.random.Generator) -> np.ndarray:
    return _sphere_pts(n, rng)


def cube(n: int, rng: np.random.Generator) -> np.ndarray:
    face = rng.integers(6, size=n)
    p = rng.uniform(-1, 1, (n, 3))
    p[np.arange(n), face // 2] = np.where(face % 2, 1.0, -1.0)
    return p * 0.6


def cylinder(n: int, rng: np.random.Generator) -> np.ndarray:
    r, h = 0.6, rng.uniform(0.55, 0.8)  # half height
    return _by_area(n, rng, [_tube(r, -h, h), _flat(r, -h), _flat(r, h)])


def cone(n: int, rng: np.random.Generator) -> np.ndarray:
    r, h = rng.uniform(0.55, 0.75), rng.uniform(1.2, 1.6)
    lateral = np.pi * r * np.hypot(r, h)

    def side(k: int, g: np.random.Generator) -> np.ndarray:
        s = np.sqrt(g.uniform(0, 1, k))  # distance from the apex: density grows with the radius
        c, si = _circle(k, g)
        return np.stack([r * s * c, r * s * si, h / 2 - s * h], 1)

    return _by_area(n, rng, [(lateral, side), _flat(r, -h / 2)])


def torus(n: int, rng: np.random.Generator) -> np.ndarray:
    R, r = 0.7, rng.uniform(0.18, 0.3)
    out = np.empty((0, 3))
    while len(out) < n:  # area element (R + r cos phi): rejection on phi
        k = 2 * n
        phi = rng.uniform(0, 2 * np.pi, k)
        phi = phi[rng.uniform(0, R + r, k) < R + r * np.cos(phi)]
        c, s = _circle(len(phi), rng)
        ring = R + r * np.cos(phi)
        out = np.concatenate([out, np.stack([ring * c, ring * s, r * np.sin(phi)], 1)])
    return out[:n]


def _mesh(v: list[list[float]], f: list[list[int]]) -> Sampler:
    vv, ff = np.asarray(v, dtype=np.float64), np.asarray(f)
    return lambda n, rng: sample_mesh(vv, ff, n, rng)


def pyramid(n: int, rng: np.random.Generator) -> np.ndarray:
    a, h = 0.7, rng.uniform(1.1, 1.5)
    v = [[-a, -a, -h / 3], [a, -a, -h / 3], [a, a, -h / 3], [-a, a, -h / 3], [0, 0, 2 * h / 3]]
    f = [[0, 2, 1], [0, 3, 2], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]]
    return _mesh(v, f)(n, rng)


def capsule(n: int, rng: np.random.Generator) -> np.ndarray:
    r, h = 0.4, rng.uniform(0.35, 0.55)  # half length of the straight part
    return _by_area(n, rng, [_tube(r, -h, h), _cap(r, h, True), _cap(r, -h, False)])


def prism(n: int, rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform(0.55, 0.8)
    tri = [[0.75 * np.cos(t), 0.75 * np.sin(t)] for t in np.pi / 2 + 2 * np.pi * np.arange(3) / 3]
    v = [[x, y, -h] for x, y in tri] + [[x, y, h] for x, y in tri]
    f = [[0, 2, 1], [3, 4, 5], [0, 1, 4], [0, 4, 3], [1, 2, 5], [1, 5, 4], [2, 0, 3], [2, 3, 5]]
    return _mesh(v, f)(n, rng)


def ring(n: int, rng: np.random.Generator) -> np.ndarray:
    R, r, h = 0.8, rng.uniform(0.45, 0.6), rng.uniform(0.15, 0.25)
    return _by_area(n, rng, [_tube(R, -h, h), _tube(r, -h, h), _flat(R, h, r), _flat(R, -h, r)])


def hemisphere(n: int, rng: np.random.Generator) -> np.ndarray:
    r = 0.85
    return _by_area(n, rng, [_cap(r, -0.3, True), _flat(r, -0.3)])


SHAPES: dict[str, Sampler] = {"sphere": sphere, "cube": cube, "cylinder": cylinder, "cone": cone, "torus": torus,
                              "pyramid": pyramid, "capsule": capsule, "prism": prism, "ring": ring,
                              "hemisphere": hemisphere}
assert tuple(SHAPES) == CLASSES


def random_pose(rng: np.random.Generator) -> np.ndarray:
    """A rotation [3, 3]: any angle about the up axis z, then a tilt of U(0, ``TILT``) degrees about a
    random horizontal axis (Rodrigues' formula)."""
    t = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(t), np.sin(t)
    spin = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    a = rng.uniform(0, 2 * np.pi)
    K = np.array([[0.0, 0.0, np.sin(a)], [0.0, 0.0, -np.cos(a)], [-np.sin(a), np.cos(a), 0.0]])  # axis (cos a, sin a, 0)
    phi = np.deg2rad(rng.uniform(0, TILT))
    return (np.eye(3) + np.sin(phi) * K + (1 - np.cos(phi)) * K @ K) @ spin


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One cloud of shape kind ``label`` -> [P, 3] float32."""
    n = int(rng.integers(POINTS[0], POINTS[1] + 1))
    p = SHAPES[CLASSES[label]](n, rng)
    p = p * rng.uniform(*SCALE, 3)
    p = p @ random_pose(rng).T
    radius = float(np.linalg.norm(p, axis=1).max())
    p = p + rng.normal(0, rng.uniform(*NOISE) * radius, p.shape)
    n_out = int(round(rng.uniform(*OUTLIERS) * n))
    if n_out:
        lo, hi = p.min(0), p.max(0)
        p[rng.choice(n, n_out, replace=False)] = rng.uniform(lo, hi, (n_out, 3))
    p = p * rng.uniform(0.5, 2.0) + rng.uniform(-1, 1, 3)
    return p[rng.permutation(n)].astype(np.float32)


def generate(split: str, n: int | None = None, seed: int = 0, start: int = 0) -> Iterator[Cloud]:
    """Yield ``n`` clouds of ``split`` (default: its size in ``SPLITS``).

    Cloud ``i`` depends only on ``(split, seed, i)``, so a shorter ``n`` yields a prefix of the full
    split. Splits use disjoint random streams (seeded by the split name). Labels are balanced (a
    shuffled repetition of the classes over the split's nominal size). Any split name is accepted
    when ``n`` is given.
    ``start`` skips the first ``start`` items (one worker's chunk, mmssl/data/pool.py)."""
    n, seed = split_count(split, n, seed, SPLITS)
    labels = balanced_labels(GENERATOR_VERSION, seed, split, max(n, SPLITS.get(split, 0)), NUM_CLASSES)
    code = split_code(split)
    for i in range(start, n):
        rng = np.random.default_rng([GENERATOR_VERSION, seed, code, 1, i])
        yield Cloud(render(int(labels[i]), rng), int(labels[i]))
