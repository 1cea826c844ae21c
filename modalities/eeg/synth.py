"""Simulated scalp EEG: the embedded default EEG data set.

Each recording is ``SECONDS`` long at ``RATE`` Hz, numpy only, deterministic given a seed. Sources sit
on the unit sphere of the head frame (montage.py) and reach each electrode with a gain that falls
with the angle between them, ``exp(-angle^2 / (2 width^2))`` (a smooth stand-in for volume
conduction). A recording sums:

* background: ``N_BACKGROUND`` sources of 1/f^beta noise (beta 0.8-1.8) at random places on the
  upper head, so neighbouring electrodes are correlated as in real EEG;
* a posterior alpha rhythm (8-12 Hz, narrow-band noise: it waxes and wanes) near O1/Oz/O2;
* sensorimotor mu (9-13 Hz) with a beta component (18-25 Hz) over C3 and over C4;
* nuisance: eye blinks over the forehead (30% of recordings), 50 Hz line noise on every channel (20%),
  independent sensor noise; every source location is jittered by a small random rotation (cap
  placement), and the overall amplitude varies (the codec normalises it away).

Four classes (``CLASSES``): ``rest``; ``left_desync`` and ``right_desync``, mu and beta over C3
(left) or C4 (right) reduced to 15-50% (event-related desynchronisation, as in motor imagery of the
opposite hand); ``evoked``, an evoked response (a central N1 at 100 ms and a parietal P3 at 300-400 ms)
at a random time inside the recording's middle.

Montages vary from recording to recording (``TRAIN_MONTAGES``): the 19-channel 10-20 set, a 32- and a
64-channel 10-10 cap, and random subsets of 16-40 of the 10-10 positions, in a shuffled channel
order. The ``unseen`` family is a 32-38 channel layout of 10-05 intermediate positions (``UNSEEN``),
8-13 degrees away from every 10-10 position: a montage pretraining never sees.

The output is a pure function of ``(GENERATOR_VERSION, family, split, seed, index)``.
``GENERATOR_VERSION`` is frozen once shipped: any change that alters one sample must bump it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np

from mmssl.data.synth_splits import balanced_labels, split_code, split_count
from mmssl.modalities.eeg import montage

GENERATOR_VERSION: int = 1

RATE = 128
SECONDS = 2.5
SPLITS = {"train": 4000, "val": 500, "test": 1000}
UNSEEN_SPLITS = {"train": 2000, "val": 500, "test": 1000}
CLASSES: tuple[str, ...] = ("rest", "left_desync", "right_desync", "evoked")
NUM_CLASSES = len(CLASSES)
N_BACKGROUND = 12

#: (family, probability) of the training montages; "subset" draws 16-40 of the 10-10 positions
TRAIN_MONTAGES: tuple[tuple[str, float], ...] = (("1020-19", 0.25), ("1010-32", 0.25), ("1010-64", 0.15),
                                                 ("subset", 0.35))
#: 10-05 intermediate positions, none of them in the 10-10 system
UNSEEN: tuple[str, ...] = (
    "AFp1", "AFp2", "AFF5h", "AFF1h", "AFF2h", "AFF6h", "FFT7h", "FFC3h", "FFC4h", "FFT8h", "FTT7h", "FCC5h",
    "FCC3h", "FCC1h", "FCC2h", "FCC4h", "FCC6h", "FTT8h", "TTP7h", "CCP5h", "CCP3h", "CCP1h", "CCP2h", "CCP4h",
    "CCP6h", "TTP8h", "TPP7h", "CPP3h", "CPP4h", "TPP8h", "PPO1h", "PPO2h", "PPO5h", "PPO6h", "POO1", "POO2",
    "OI1h", "OI2h")
FAMILIES = ("train", "unseen")


@dataclass
class Recording:
    data: np.ndarray  # [C, T] float32, arbitrary microvolt-like units
    ch_names: list[str]
    rate: float
    label: int
    montage: str  # the montage family it was drawn from


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """A random rotation [3, 3] by at most ``max_angle`` radians about a random axis (Rodrigues)."""
    k = _unit(rng.normal(size=3))
    a = rng.uniform(0, max_angle)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def _coloured(rng: np.random.Generator, n: int, T: int, weight: np.ndarray) -> np.ndarray:
    """n noise series [n, T] with the amplitude spectrum ``weight`` [T // 2 + 1] ([n, F] allowed), unit std."""
    spec = np.fft.rfft(rng.normal(size=(n, T)), axis=1) * weight
    x = np.fft.irfft(spec, n=T, axis=1)
    return x / (x.std(axis=1, keepdims=True) + 1e-12)


def _pink(rng: np.random.Generator, n: int, T: int) -> np.ndarray:
    f = np.fft.rfftfreq(T, 1.0 / RATE)
    beta = rng.uniform(0.8, 1.8, (n, 1))
    w = np.maximum(f, 0.5) ** (-beta / 2) * (f > 0)  # no DC
    return _coloured(rng, n, T, w)


def _rhythm(rng: np.random.Generator, T: int, f0: float, bandwidth: float) -> np.ndarray:
    """Narrow-band noise around f0 [T]: an oscillation whose amplitude waxes and wanes."""
    f = np.fft.rfftfreq(T, 1.0 / RATE)
    return _coloured(rng, 1, T, np.exp(-0.5 * ((f - f0) / bandwidth) ** 2))[0]


def _gains(elec: np.ndarray, src: np.ndarray, width: np.ndarray) -> np.ndarray:
    """elec [C, 3], src [S, 3] unit vectors, width [S] radians -> [C, S] gains."""
    ang = np.arccos(np.clip(elec @ src.T, -1.0, 1.0))
    return np.exp(-0.5 * (ang / width) ** 2)


def _montage(family: str, rng: np.random.Generator) -> tuple[str, list[str]]:
    if family == "unseen":
        names = list(UNSEEN)
        drop = int(rng.integers(0, 7))
        keep = np.sort(rng.permutation(len(names))[: len(names) - drop])
        names, kind = [names[i] for i in keep], "unseen"
    elif family == "train":
        kinds, probs = zip(*TRAIN_MONTAGES)
        kind = str(kinds[int(rng.choice(len(kinds), p=np.asarray(probs)))])
        if kind == "subset":
            pool = montage.names_of("1010")
            k = int(rng.integers(16, 41))
            names = [pool[i] for i in np.sort(rng.permutation(len(pool))[:k])]
        else:
            names = list(montage.MONTAGES[kind])
    else:
        raise ValueError(f"montage family must be one of {FAMILIES}, not {family!r}")
    return kind, [names[i] for i in rng.permutation(len(names))]  # recordings list channels in any order


@cache
def _named_cached(name: str) -> tuple[float, float, float]:
    x, y, z = montage.positions([name])[0].astype(np.float64)
    return float(x), float(y), float(z)


def _named(name: str) -> np.ndarray:
    return np.array(_named_cached(name))


def simulate(label: int, names: list[str], rng: np.random.Generator) -> np.ndarray:
    """One recording of class ``label`` on electrodes ``names`` -> [C, T] float32."""
    T = int(round(SECONDS * RATE))
    t = np.arange(T) / RATE
    elec = montage.positions(names).astype(np.float64)
    C = len(names)
    rot = _rotation(rng, 0.12)  # cap placement: every source moves with the head

    # background: sources spread over the upper head
    src = _unit(rng.normal(size=(N_BACKGROUND, 3)) + np.array([0.0, 0.0, 0.8]))
    g = _gains(elec, src @ rot.T, rng.uniform(0.35, 0.7, N_BACKGROUND))
    x = g @ (_pink(rng, N_BACKGROUND, T) * rng.uniform(0.5, 1.5, (N_BACKGROUND, 1)))
    x /= x.std() + 1e-12  # background: unit amplitude on average

    def add(where: np.ndarray, width: float, series: np.ndarray) -> None:
        nonlocal x
        x = x + _gains(elec, _unit(where @ rot.T)[None], np.array([width]))[:, :1] * series[None]

    # posterior alpha
    occ = _unit(0.5 * _named("Oz") + 0.25 * _named("O1") + 0.25 * _named("O2") + rng.normal(0, 0.08, 3))
    add(occ, rng.uniform(0.35, 0.5), rng.uniform(0.5, 1.0) * _rhythm(rng, T, rng.uniform(8.0, 10.5), 0.8))
    # sensorimotor mu + beta, desynchronised on one side for the lateralised classes
    for side, name in ((1, "C3"), (2, "C4")):
        keep = rng.uniform(0.1, 0.35) if label == side else 1.0
        mu = rng.uniform(1.5, 2.5) * _rhythm(rng, T, rng.uniform(10.0, 13.0), 0.7)
        beta = rng.uniform(0.5, 0.8) * _rhythm(rng, T, rng.uniform(18.0, 25.0), 1.5)
        add(_unit(_named(name) + rng.normal(0, 0.05, 3)), rng.uniform(0.3, 0.42), keep * (mu + beta))
    # evoked response: N1 (fronto-central, negative) then P3 (parietal, positive)
    if CLASSES[label] == "evoked":
        t0 = rng.uniform(0.6, SECONDS - 1.1)
        lat = rng.uniform(0.3, 0.4)
        n1 = -rng.uniform(1.0, 2.0) * np.exp(-0.5 * ((t - t0 - 0.1) / 0.025) ** 2)
        p3 = rng.uniform(2.5, 4.0) * np.exp(-0.5 * ((t - t0 - lat) / 0.08) ** 2)
        add(_named("FCz"), 0.45, n1)
        add(_unit(_named("Pz") + 0.3 * _named("CPz")), 0.5, p3)
    # nuisance: blinks, line noise, sensor noise
    if rng.uniform() < 0.3:
        blink = np.zeros(T)
        for tb in rng.uniform(0.1, SECONDS - 0.1, int(rng.integers(1, 3))):
            blink += np.exp(-0.5 * ((t - tb) / 0.07) ** 2)
        add(_unit(_named("Fpz") + np.array([0.0, 0.0, -0.5])), 0.35, rng.uniform(4.0, 10.0) * blink)
    if rng.uniform() < 0.2:
        x = x + rng.uniform(0.1, 0.6) * np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 2 * np.pi))[None]
    x = x + rng.uniform(0.1, 0.3) * rng.normal(size=(C, T))
    return (x * rng.uniform(5.0, 30.0)).astype(np.float32)  # microvolt-like scale, varying per recording


def generate(split: str, n: int | None = None, seed: int = 0, family: str = "train", start: int = 0) -> Iterator[Recording]:
    """Yield ``n`` recordings of ``split`` (default: its size in ``SPLITS`` or, for the unseen
    family, ``UNSEEN_SPLITS``).

    Recording ``i`` depends only on ``(family, split, seed, i)``, so a shorter ``n`` yields a prefix
    of the full split; families and splits use disjoint random streams. Labels are balanced over the
    split's nominal size. Any split name is accepted when ``n`` is given.
    ``start`` skips the first ``start`` items (one worker's chunk, mmssl/data/pool.py)."""
    if family not in FAMILIES:
        raise ValueError(f"montage family must be one of {FAMILIES}, not {family!r}")
    sizes = UNSEEN_SPLITS if family == "unseen" else SPLITS
    n, seed = split_count(split, n, seed, sizes)
    stream = split if family == "train" else f"{family}/{split}"
    labels = balanced_labels(GENERATOR_VERSION, seed, stream, max(n, sizes.get(split, 0)), NUM_CLASSES)
    code = split_code(stream)
    for i in range(start, n):
        rng = np.random.default_rng([GENERATOR_VERSION, seed, code, 1, i])
        kind, names = _montage(family, rng)
        y = int(labels[i])
        yield Recording(simulate(y, names, rng), names, float(RATE), y, kind)
