"""Synthetic captioned sounds: the embedded audio-text pair data set (``sound-captions``).

Short clips at 16 kHz, numpy only, deterministic given a seed. Each clip holds ONE sound event of a
kind (the label, ``CLASSES``) with a few attributes, and its caption names them from the kind's one
template (``TEMPLATES``), so identical attributes always give identical text:

* tone: a steady sine with a few weak harmonics: ``a {duration} {pitch} tone``
* rising chirp / falling chirp: an exponential sweep over 1.3 octaves, upward or downward:
  ``a {duration} {pitch} rising chirp``
* noise burst: band-limited noise, low (100-600 Hz) or high (3-6 kHz):
  ``a {duration} {pitch} noise burst``
* rhythm of clicks: short decaying pips (low ~500 Hz or high ~3 kHz), slow (6-8 per second) or
  fast (16-20 per second): ``a {duration} {speed} rhythm of {pitch} clicks``
* warble: a sine whose frequency wobbles by about +-12%, slowly (3.5-5 Hz) or fast (11-14 Hz):
  ``a {duration} {speed} {pitch} warble``

Attributes: duration ``short`` (event 0.3-0.42 s) or ``long`` (0.68-0.84 s); pitch ``low`` (tones,
warbles and sweep centres at 220-350 Hz, noise 100-600 Hz, clicks ~500 Hz) or ``high`` (1.1-1.7 kHz,
noise 3-6 kHz, clicks ~3 kHz); speed as above. 4 + 4 + 4 + 4 + 8 + 8 = 32 distinct captions.

Each clip: 30-80 ms of silence before and after the event (a clip lasts 0.36-1.0 s), 10 ms
raised-cosine fades, a random peak level (0.2-0.8) and light white background noise over the whole
clip (standard deviation 0.001-0.005), float32 in [-1, 1].

The output is a pure function of ``(GENERATOR_VERSION, split, seed, index)``. ``GENERATOR_VERSION`` is
frozen once shipped: any change that alters a single sample or caption must bump it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mmssl.data.synth_splits import balanced_labels, split_code, split_count

GENERATOR_VERSION: int = 1

SAMPLE_RATE = 16000
SPLITS = {"train": 6000, "val": 500, "test": 1000}
CLASSES: tuple[str, ...] = ("tone", "rising chirp", "falling chirp", "noise burst", "rhythm of clicks",
                            "warble")
NUM_CLASSES = len(CLASSES)
PROMPTS: tuple[str, ...] = ("the sound of a {}.", "a {}.", "a recording of a {}.")

#: kind -> caption template; the attributes a kind has are the fields its template names
TEMPLATES: dict[str, str] = {
    "tone": "a {duration} {pitch} tone",
    "rising chirp": "a {duration} {pitch} rising chirp",
    "falling chirp": "a {duration} {pitch} falling chirp",
    "noise burst": "a {duration} {pitch} noise burst",
    "rhythm of clicks": "a {duration} {speed} rhythm of {pitch} clicks",
    "warble": "a {duration} {speed} {pitch} warble",
}
DURATIONS: dict[str, tuple[float, float]] = {"short": (0.3, 0.42), "long": (0.68, 0.84)}  # event, seconds
PITCHES = ("low", "high")
SPEEDS = ("slow", "fast")
#: tone and warble carrier (Hz); chirps sweep between centre / SWEEP**0.5 and centre * SWEEP**0.5
CARRIER: dict[str, tuple[float, float]] = {"low": (220.0, 350.0), "high": (1100.0, 1700.0)}
SWEEP = 2.5  # 1.3 octaves
NOISE_BAND: dict[str, tuple[float, float]] = {"low": (100.0, 600.0), "high": (3000.0, 6000.0)}
CLICK_FREQ: dict[str, tuple[float, float]] = {"low": (450.0, 600.0), "high": (2600.0, 3400.0)}
CLICK_RATE: dict[str, tuple[float, float]] = {"slow": (6.0, 8.0), "fast": (16.0, 20.0)}  # per second
WARBLE_RATE: dict[str, tuple[float, float]] = {"slow": (3.5, 5.0), "fast": (11.0, 14.0)}  # Hz
WARBLE_DEPTH = 0.12  # relative frequency deviation
PAD = (0.03, 0.08)  # silence before and after the event, seconds
PEAK = (0.2, 0.8)
NOISE_SD = (0.001, 0.005)
FADE = 0.01  # seconds


@dataclass(frozen=True)
class Attributes:
    kind: str
    duration: str
    pitch: str
    speed: str | None = None  # clicks and warbles only

    @property
    def caption(self) -> str:
        return TEMPLATES[self.kind].format(duration=self.duration, pitch=self.pitch, speed=self.speed)

    @property
    def label(self) -> int:
        return CLASSES.index(self.kind)


@dataclass
class Sound:
    wav: np.ndarray  # [L] float32 in [-1, 1], 16 kHz
    attributes: Attributes
    onset: int  # first sample of the event
    offset: int  # one past its last sample

    @property
    def label(self) -> int:
        return self.attributes.label

    @property
    def caption(self) -> str:
        return self.attributes.caption


def _has_speed(kind: str) -> bool:
    return "{speed}" in TEMPLATES[kind]


def all_captions() -> list[str]:
    """Every caption the generator can write."""
    return [Attributes(k, d, p, s).caption for k in CLASSES for d in DURATIONS for p in PITCHES
            for s in (SPEEDS if _has_speed(k) else (None,))]


def draw_attributes(label: int, rng: np.random.Generator) -> Attributes:
    kind = CLASSES[label]
    duration = list(DURATIONS)[int(rng.integers(len(DURATIONS)))]
    pitch = PITCHES[int(rng.integers(len(PITCHES)))]
    speed = SPEEDS[int(rng.integers(len(SPEEDS)))] if _has_speed(kind) else None
    return Attributes(kind, duration, pitch, speed)


def _sine(freq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sine following the per-sample frequency ``freq`` [n] (Hz), random start phase."""
    return np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi))


def _event(a: Attributes, n: int, rng: np.random.Generator) -> np.ndarray:
    """The sound event alone, ``n`` samples, peak about 1."""
    t = np.arange(n) / SAMPLE_RATE
    if a.kind == "tone":
        f0 = rng.uniform(*CARRIER[a.pitch])
        # weak harmonics give timbre without moving the perceived pitch
        w = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
        w += rng.uniform(0, 0.3) * np.sin(4 * np.pi * f0 * t)
        w += rng.uniform(0, 0.15) * np.sin(6 * np.pi * f0 * t)
    elif a.kind in ("rising chirp", "falling chirp"):
        centre = rng.uniform(*CARRIER[a.pitch])
        lo, hi = centre / np.sqrt(SWEEP), centre * np.sqrt(SWEEP)
        frac = t / t[-1]
        if a.kind == "falling chirp":
            frac = 1.0 - frac
        w = _sine(lo * (hi / lo) ** frac, rng)  # exponential sweep: even in pitch
    elif a.kind == "noise burst":
        f1, f2 = NOISE_BAND[a.pitch]
        m = 1 << (n - 1).bit_length()  # a power-of-two FFT: odd lengths cost several times more
        spec = np.fft.rfft(rng.standard_normal(m))
        f = np.fft.rfftfreq(m, 1 / SAMPLE_RATE)
        spec[(f < f1) | (f > f2)] = 0.0  # brick-wall band: the fades smooth the edges in time
        w = np.fft.irfft(spec, m)[:n]
    elif a.kind == "rhythm of clicks":
        rate = rng.uniform(*CLICK_RATE[a.speed])  # type: ignore[index]
        fc = rng.uniform(*CLICK_FREQ[a.pitch])
        # decay over >= 2.5 cycles (>= 2.5 ms): a shorter low pip would be a broadband tick, no pitch
        tau = max(0.0025, 2.5 / fc)
        pip_len = int(5 * tau * SAMPLE_RATE)
        tp = np.arange(pip_len) / SAMPLE_RATE
        pip = np.sin(2 * np.pi * fc * tp) * np.exp(-tp / tau)
        period = SAMPLE_RATE / rate
        # the first click just after the fade-in: even a short slow rhythm holds two clicks
        first = rng.uniform(0.015, 0.04) * SAMPLE_RATE
        starts = np.round(np.arange(first, n - pip_len, period)).astype(int)
        impulses = np.zeros(n)
        impulses[starts] = rng.uniform(0.8, 1.0, len(starts))
        w = np.convolve(impulses, pip)[:n]
    elif a.kind == "warble":
        f0 = rng.uniform(*CARRIER[a.pitch])
        fm = rng.uniform(*WARBLE_RATE[a.speed])  # type: ignore[index]
        w = _sine(f0 * (1 + WARBLE_DEPTH * np.sin(2 * np.pi * fm * t + rng.uniform(0, 2 * np.pi))), rng)
    else:
        raise ValueError(f"unknown sound kind {a.kind!r}")
    return w / max(float(np.abs(w).max()), 1e-9)


def render(a: Attributes, rng: np.random.Generator) -> Sound:
    """One clip of ``a``: silence, the faded event at a random level, silence; noise throughout."""
    n = int(rng.uniform(*DURATIONS[a.duration]) * SAMPLE_RATE)
    pre, post = (int(rng.uniform(*PAD) * SAMPLE_RATE) for _ in range(2))
    ev = _event(a, n, rng)
    k = int(FADE * SAMPLE_RATE)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
    ev[:k] *= ramp
    ev[-k:] *= ramp[::-1]
    wav = rng.normal(0.0, rng.uniform(*NOISE_SD), pre + n + post)
    wav[pre:pre + n] += rng.uniform(*PEAK) * ev
    return Sound(np.clip(wav, -1, 1).astype(np.float32), a, pre, pre + n)


def generate(split: str, n: int | None = None, seed: int = 0, start: int = 0) -> Iterator[Sound]:
    """Yield ``n`` sounds of ``split`` (default: its size in ``SPLITS``).

    Sound ``i`` depends only on ``(split, seed, i)``, so a shorter ``n`` yields a prefix of the full
    split. Splits use disjoint random streams (seeded by the split name). Kinds are balanced (a
    shuffled repetition of the classes over the split's nominal size); the other attributes are
    uniform. Any split name is accepted when ``n`` is given.
    ``start`` skips the first ``start`` items (one worker's chunk, mmssl/data/pool.py)."""
    n, seed = split_count(split, n, seed, SPLITS)
    labels = balanced_labels(GENERATOR_VERSION, seed, split, max(n, SPLITS.get(split, 0)), NUM_CLASSES)
    code = split_code(split)
    for i in range(start, n):
        rng = np.random.default_rng([GENERATOR_VERSION, seed, code, 1, i])
        yield render(draw_attributes(int(labels[i]), rng), rng)
