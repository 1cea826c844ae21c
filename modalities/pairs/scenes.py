"""Synthetic captioned scenes: the embedded image-text pair data set (``scene-captions``).

32x32 RGB images, numpy only, deterministic given a seed. Each image holds ONE main shape described
by four attributes, and its caption names all four from one fixed template, so identical attributes
always give identical text:

    "a {size} {colour} {shape} {position}"      e.g. "a large red star on the left"

* shape (the label, ``CLASSES``): disc, ring, square, triangle, cross, star (signed distance
  functions shared with the ``image-synth`` generator; the triangle drawn 15% larger, it is thin for
  its radius), turned by at most ``MAX_TILT`` so a triangle keeps pointing the same way and a cross
  stands upright.
* colour (``COLOURS``): red, green, blue, yellow, white, each a saturated prototype jittered by a
  little per channel and dimmed by at most 15%: far apart in RGB, and brighter than the background.
* size: ``small`` (radius 4.5-5.5 px) or ``large`` (8-9 px): areas never overlap (a small disc
  covers at most ~86 px, a large star, the thinnest shape, at least ~100 px).
* position: the shape's centre in the left, middle or right third (centre x 6-10, 14.5-17.5 or
  22-26 px, the large shapes nearer the middle so they stay inside the frame); its height varies
  freely within the frame.
* background: a dark, nearly flat colour (every channel <= ``BG_MAX``) with a faint gradient, in half
  the images one small faint grey blob (a distractor that names nothing: grey, at most ``BLOB_MAX``),
  and per-pixel Gaussian noise.

6 x 5 x 2 x 3 = 180 distinct captions: a 1,000-item test split holds nearly all of them, each about
5.6 times, so a retrieval hit is any item with the identical caption.

Why so clean: the preset is for contrastive image-text training of micro towers on a CPU in a few
hundred steps; every attribute must be visible at a glance. Shape (the zero-shot label) is the
hardest attribute, colour, size and position the easiest.

The output is a pure function of ``(GENERATOR_VERSION, split, seed, index)``. ``GENERATOR_VERSION`` is
frozen once shipped: any change that alters a single pixel or caption must bump it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mmssl.data.synth_splits import balanced_labels, split_code, split_count
from mmssl.modalities.image.synth import SHAPES

GENERATOR_VERSION: int = 1

SIZE = 32
SPLITS = {"train": 6000, "val": 500, "test": 1000}
CLASSES: tuple[str, ...] = ("disc", "ring", "square", "triangle", "cross", "star")
NUM_CLASSES = len(CLASSES)
PROMPTS: tuple[str, ...] = ("a {}.", "a photo of a {}.", "a picture of a {} shape.", "a drawing of a {}.")

#: name -> RGB prototype in [0, 1]; pairwise distances >= 0.7, all with a channel >= 0.8
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.16, 0.82, 0.22),
    "blue": (0.22, 0.38, 1.00),
    "yellow": (0.95, 0.88, 0.14),
    "white": (0.95, 0.95, 0.95),
}
SIZES: dict[str, tuple[float, float]] = {"small": (4.5, 5.5), "large": (8.0, 9.0)}  # radius range, px
#: position word -> centre x range (px) per size; the phrase is what the caption says
POSITIONS: dict[str, dict[str, tuple[float, float]]] = {
    "left": {"small": (6.0, 9.0), "large": (9.0, 10.0)},
    "middle": {"small": (14.5, 17.5), "large": (15.0, 17.0)},
    "right": {"small": (23.0, 26.0), "large": (22.0, 23.0)},
}
POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
TEMPLATE = "a {size} {colour} {shape} {position}"
NUM_CAPTIONS = NUM_CLASSES * len(COLOURS) * len(SIZES) * len(POSITIONS)

#: radius multipliers: the triangle of the shared SDF is drawn small for its radius (apothem 0.55)
SHAPE_SCALE: dict[str, float] = {"triangle": 1.15}
MAX_TILT = 0.3  # rad (~17 degrees)
BG_MAX = 0.15  # background channels lie in [0.02, BG_MAX] before noise
BLOB_MAX = 0.3  # the distractor blob's grey level is at most this
NOISE_SD = (0.01, 0.03)

# pixel centres, [SIZE, SIZE] each
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return TEMPLATE.format(size=self.size, colour=self.colour, shape=self.shape,
                               position=POSITION_PHRASES[self.position])

    @property
    def label(self) -> int:
        return CLASSES.index(self.shape)


@dataclass
class Scene:
    pixels: np.ndarray  # [SIZE, SIZE, 3] uint8
    attributes: Attributes

    @property
    def label(self) -> int:
        return self.attributes.label

    @property
    def caption(self) -> str:
        return self.attributes.caption


def all_captions() -> list[str]:
    """Every caption the generator can write (``NUM_CAPTIONS`` of them)."""
    return [Attributes(s, c, z, p).caption
            for s in CLASSES for c in COLOURS for z in SIZES for p in POSITIONS]


def coverage(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage [SIZE, SIZE] in [0, 1] of shape ``kind`` centred at (cx, cy), radius r px."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = _XX - cx, _YY - cy
    u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r
    return np.clip(0.5 - SHAPES[kind](u, v) * r, 0.0, 1.0)


def draw_attributes(label: int, rng: np.random.Generator) -> Attributes:
    """Colour, size and position uniformly at random for shape ``label``."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    return Attributes(CLASSES[label], colour, size, position)


def render(a: Attributes, rng: np.random.Generator) -> np.ndarray:
    """One scene showing ``a`` -> [SIZE, SIZE, 3] uint8."""
    # dark background with a faint linear gradient
    base = rng.uniform(0.02, BG_MAX, 3)
    other = np.clip(base + rng.uniform(-0.04, 0.04, 3), 0.0, BG_MAX)
    phi = rng.uniform(0, 2 * np.pi)
    t = np.clip(((_XX - SIZE / 2) * np.cos(phi) + (_YY - SIZE / 2) * np.sin(phi)) / SIZE + 0.5, 0, 1)
    img = base + t[..., None] * (other - base)
    if rng.uniform() < 0.5:  # a small faint grey blob: clutter that is no named colour
        bx, by = rng.uniform(2, SIZE - 2, 2)
        blob = np.clip(rng.uniform(1.2, 2.2) + 0.5 - np.hypot(_XX - bx, _YY - by), 0, 1)[..., None]
        img = img * (1 - blob) + blob * rng.uniform(0.2, BLOB_MAX)
    # the main shape, drawn over everything
    r = rng.uniform(*SIZES[a.size])
    cx = rng.uniform(*POSITIONS[a.position][a.size])
    cy = rng.uniform(1.05 * r + 0.5, SIZE - 1.05 * r - 0.5)  # star tips reach 1.05 r
    tilt = rng.uniform(-MAX_TILT, MAX_TILT)
    cov = coverage(a.shape, cx, cy, r * SHAPE_SCALE.get(a.shape, 1.0), tilt)[..., None]
    colour = np.clip(np.asarray(COLOURS[a.colour]) + rng.uniform(-0.06, 0.06, 3), 0, 1)
    colour = colour * rng.uniform(0.85, 1.0)
    img = img * (1 - cov) + cov * colour
    img += rng.normal(0, rng.uniform(*NOISE_SD), img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def generate(split: str, n: int | None = None, seed: int = 0, start: int = 0) -> Iterator[Scene]:
    """Yield ``n`` scenes of ``split`` (default: its size in ``SPLITS``).

    Scene ``i`` depends only on ``(split, seed, i)``, so a shorter ``n`` yields a prefix of the full
    split. Splits use disjoint random streams (seeded by the split name). Shape labels are balanced (a
    shuffled repetition of the classes over the split's nominal size); colour, size and position are
    uniform. Any split name is accepted when ``n`` is given.
    ``start`` skips the first ``start`` items (one worker's chunk, mmssl/data/pool.py)."""
    n, seed = split_count(split, n, seed, SPLITS)
    labels = balanced_labels(GENERATOR_VERSION, seed, split, max(n, SPLITS.get(split, 0)), NUM_CLASSES)
    code = split_code(split)
    for i in range(start, n):
        rng = np.random.default_rng([GENERATOR_VERSION, seed, code, 1, i])
        a = draw_attributes(int(labels[i]), rng)
        yield Scene(render(a, rng), a)
