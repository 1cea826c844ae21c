"""Synthetic shapes in clutter: the embedded default image data set.

32x32 RGB images, numpy only, deterministic given a seed. Each image holds one large shape whose
kind is the label, on a textured, cluttered background:

* 10 shape kinds (``CLASSES``): disc, ring, square, frame (outline square), triangle, cross, star,
  bars (two parallel bars), crescent, chevron. Each is a signed distance function in shape-local
  units, drawn anti-aliased (coverage = clip(0.5 - distance in pixels, 0, 1)) with a random radius
  (8-11.5 px), centre, rotation (any angle) and a light colour, in 30% of images a two-colour
  gradient fill.
* Background: a darker two-colour linear gradient, a coloured texture (grating, checkerboard, blobs
  or none), 2-5 thin random strokes of any colour (sometimes one more over the shape), 1-3
  distractor fragments (small shapes of any kind and colour, cut by a random half-plane so they are
  incomplete), per-pixel Gaussian noise.
* The shape's colour keeps a minimum RGB distance from the background behind it, so the label is
  always visible to a human.

Why clutter: a measured prototype showed masked autoencoding on clean flat backgrounds ends *below*
a random-init encoder (reconstruction of flat colour needs no shape features), while textured
backgrounds with distractors made it learn class-relevant features. A random-init micro ViT with
a mean-pooled linear probe scores roughly 0.3 here: learnable but far from solved.

The output is a pure function of ``(GENERATOR_VERSION, split, seed, index)``. ``GENERATOR_VERSION`` is
frozen once shipped: any change that alters a single pixel must bump it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from mmssl.data.synth_splits import balanced_labels, split_code, split_count

GENERATOR_VERSION: int = 1

SIZE = 32
SPLITS = {"train": 5000, "val": 500, "test": 1000}
CLASSES: tuple[str, ...] = ("disc", "ring", "square", "frame", "triangle", "cross", "star", "bars",
                            "crescent", "chevron")
NUM_CLASSES = len(CLASSES)
# Background colours are darker than shape colours in every channel's range (shapes from [FG_MIN, 1],
# backgrounds from [0, BG_MAX]): with fully random colours on both sides a random-init encoder's
# pooled features were dominated by colour and its probe sat near chance (0.13-0.18, measured).
BG_MAX = 0.45
FG_MIN = 0.6

# pixel centres, [SIZE, SIZE] each
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


@dataclass
class Image:
    pixels: np.ndarray  # [SIZE, SIZE, 3] uint8
    label: int


# --------------------------------------------------------------------------------------------------
# Signed distance functions in shape-local units (the shape's radius is 1); negative inside.
# --------------------------------------------------------------------------------------------------
def _box(u: np.ndarray, v: np.ndarray, bu: float, bv: float) -> np.ndarray:
    qu, qv = np.abs(u) - bu, np.abs(v) - bv
    return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0)


def _segment(u: np.ndarray, v: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    du, dv = b[0] - a[0], b[1] - a[1]
    t = np.clip(((u - a[0]) * du + (v - a[1]) * dv) / (du * du + dv * dv), 0, 1)
    return np.hypot(u - a[0] - t * du, v - a[1] - t * dv)


def _polygon(u: np.ndarray, v: np.ndarray, n: int, apothem: float) -> np.ndarray:
    """Regular n-gon (a vertex pointing up): the largest signed distance to its edge lines."""
    angles = 2 * np.pi * (np.arange(n) + 0.5) / n + np.pi / 2
    return np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) - apothem


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star as a radial profile (an approximate distance, enough for anti-aliasing)."""
    theta = np.arctan2(v, u)
    profile = 0.45 + 0.6 * (0.5 + 0.5 * np.cos(5 * theta)) ** 2
    return (np.hypot(u, v) - profile) * 0.8


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": lambda u, v: np.hypot(u, v) - 0.95,
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.72) - 0.25,
    "square": lambda u, v: _box(u, v, 0.8, 0.8),
    "frame": lambda u, v: np.abs(_box(u, v, 0.74, 0.74)) - 0.2,
    "triangle": lambda u, v: _polygon(u, v + 0.15, 3, 0.55),
    "cross": lambda u, v: np.minimum(_box(u, v, 1.0, 0.28), _box(u, v, 0.28, 1.0)),
    "star": _star,
    "bars": lambda u, v: np.minimum(_box(u, v - 0.55, 0.95, 0.22), _box(u, v + 0.55, 0.95, 0.22)),
    "crescent": lambda u, v: np.maximum(np.hypot(u, v) - 1.0, -(np.hypot(u - 0.5, v) - 0.8)),
    "chevron": lambda u, v: np.minimum(_segment(u, v, (-0.85, -0.6), (0.0, 0.6)),
                                       _segment(u, v, (0.85, -0.6), (0.0, 0.6))) - 0.22,
}
assert tuple(SHAPES) == CLASSES


def _coverage(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage [SIZE, SIZE] in [0, 1] of a shape centred at (cx, cy) of radius r px."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = _XX - cx, _YY - cy
    u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r
    return np.clip(0.5 - SHAPES[kind](u, v) * r, 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-composite ``colour`` ([3] or [SIZE, SIZE, 3]) over ``img`` [SIZE, SIZE, 3] in place."""
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * colour


# --------------------------------------------------------------------------------------------------
# Backgrounds and clutter.
# --------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator) -> np.ndarray:
    """Two-colour linear gradient plus a coloured texture. -> [SIZE, SIZE, 3] float in [0, 1]."""
    a, b = rng.uniform(0, BG_MAX, 3), rng.uniform(0, BG_MAX, 3)
    phi = rng.uniform(0, 2 * np.pi)
    t = ((_XX - SIZE / 2) * np.cos(phi) + (_YY - SIZE / 2) * np.sin(phi)) / SIZE + 0.5
    img = a + np.clip(t, 0, 1)[..., None] * (b - a)
    kind = rng.integers(4)
    if kind == 0:  # grating
        f, th, ph = rng.uniform(0.15, 0.6), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        tex = np.sin(f * (_XX * np.cos(th) + _YY * np.sin(th)) + ph)
    elif kind == 1:  # checkerboard
        p, th = rng.uniform(3, 8), rng.uniform(0, np.pi)
        u, v = _XX * np.cos(th) + _YY * np.sin(th), -_XX * np.sin(th) + _YY * np.cos(th)
        tex = np.sign(np.sin(np.pi * u / p) * np.sin(np.pi * v / p))
    elif kind == 2:  # blobs: a few random low-frequency plane waves
        tex = np.zeros((SIZE, SIZE))
        for _ in range(4):
            f, th, ph = rng.uniform(0.1, 0.45), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
            tex += np.sin(f * (_XX * np.cos(th) + _YY * np.sin(th)) + ph)
        tex /= 2.0
    else:
        tex = np.zeros((SIZE, SIZE))
    img += rng.uniform(0.05, 0.25) * tex[..., None] * rng.uniform(-1, 1, 3)
    return img


def _strokes(img: np.ndarray, rng: np.random.Generator, n: int) -> None:
    for _ in range(n):
        p, q = rng.uniform(-4, SIZE + 4, 2), rng.uniform(-4, SIZE + 4, 2)
        d = _segment(_XX, _YY, (p[0], p[1]), (q[0], q[1]))
        half_width, opacity = rng.uniform(0.4, 1.1), rng.uniform(0.5, 1.0)
        _paint(img, np.clip(half_width + 0.5 - d, 0, 1) * opacity, rng.uniform(0, 1, 3))


def _fragments(img: np.ndarray, rng: np.random.Generator, n: int) -> None:
    """Small shapes of any kind, cut by a random half-plane through them: clutter, not labels."""
    for _ in range(n):
        cx, cy = rng.uniform(0, SIZE, 2)
        kind, r = CLASSES[rng.integers(NUM_CLASSES)], rng.uniform(2.5, 4.5)
        cov = _coverage(kind, cx, cy, r, rng.uniform(0, 2 * np.pi))
        th = rng.uniform(0, 2 * np.pi)
        cut = np.clip(0.5 + (_XX - cx) * np.cos(th) + (_YY - cy) * np.sin(th) + rng.uniform(-1.5, 1.5), 0, 1)
        _paint(img, cov * cut, rng.uniform(0, 1, 3))


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray, min_dist: float = 0.45) -> np.ndarray:
    """A colour at least ``min_dist`` (RGB, Euclidean) from ``behind`` [3]; the farthest of a few draws
    when none is that far."""
    cands = rng.uniform(FG_MIN, 1, (8, 3))
    dist = np.linalg.norm(cands - behind, axis=1)
    ok = np.flatnonzero(dist >= min_dist)
    return cands[ok[0] if ok.size else int(dist.argmax())]


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One image of shape kind ``label`` -> [SIZE, SIZE, 3] uint8."""
    img = _background(rng)
    _strokes(img, rng, int(rng.integers(2, 6)))
    _fragments(img, rng, int(rng.integers(1, 4)))
    r = rng.uniform(8.0, 11.5)
    cx, cy = rng.uniform(r * 0.8, SIZE - r * 0.8, 2)
    cov = _coverage(CLASSES[label], cx, cy, r, rng.uniform(0, 2 * np.pi))
    behind = (img * cov[..., None]).sum((0, 1)) / max(float(cov.sum()), 1e-6)
    colour = _contrasting_colour(rng, behind)
    if rng.uniform() < 0.3:  # a two-colour gradient across the shape
        other = _contrasting_colour(rng, behind)
        th = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + ((_XX - cx) * np.cos(th) + (_YY - cy) * np.sin(th)) / (2 * r), 0, 1)[..., None]
        colour = colour + t * (other - colour)
    _paint(img, cov, colour)
    _strokes(img, rng, int(rng.integers(0, 2)))  # occasionally a stroke over the shape
    img += rng.normal(0, rng.uniform(0.01, 0.05), img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Splits.
# --------------------------------------------------------------------------------------------------


def generate(split: str, n: int | None = None, seed: int = 0, start: int = 0) -> Iterator[Image]:
    """Yield ``n`` images of ``split`` (default: its size in ``SPLITS``).

    Image ``i`` depends only on ``(split, seed, i)``, so a shorter ``n`` yields a prefix of the full
    split. Splits use disjoint random streams (seeded by the split name). Labels are balanced (a
    shuffled repetition of 0..9 over the split's nominal size). Any split name is accepted when ``n``
    is given.
    ``start`` skips the first ``start`` items (one worker's chunk, mmssl/data/pool.py)."""
    n, seed = split_count(split, n, seed, SPLITS)
    labels = balanced_labels(GENERATOR_VERSION, seed, split, max(n, SPLITS.get(split, 0)), NUM_CLASSES)
    code = split_code(split)
    for i in range(start, n):
        rng = np.random.default_rng([GENERATOR_VERSION, seed, code, 1, i])
        yield Image(render(int(labels[i]), rng), int(labels[i]))
