"""Synthetic spoken-word corpus: the embedded default speech data set.

A labelled corpus of spoken "words" (2-4 CV syllables) rendered with a small source-filter
(Klatt-style cascade) synthesiser, numpy + scipy.signal only, deterministic given a seed.

* 10 words built from 6 vowels (textbook F1/F2/F3) and 8 consonants: fricatives /s/ /sh/ /f/
  (band-passed noise at different centre frequencies), plosives /p/ /t/ /k/ (closure + burst +
  aspiration) and nasals /m/ /n/ (voiced murmur through low, broad formants).
  Two word pairs differ only in syllable order ("sa-ti"/"ti-sa", "mo-ke-shu"/"shu-ke-mo"), so an
  order-blind representation (a bag of frames) is capped near 0.8 accuracy; most other words are
  minimal pairs of these (one phone changed: t/p, m/n, a/ae, e/ae), so utterance-level MFCC
  mean+std statistics with a logistic-regression probe reach only ~0.55-0.58 (2,000 train /
  1,000 test items; ~0.52 with 600 / 300), while an order-aware linear probe on MFCCs pooled into
  8 time bins over the speech span reaches ~0.87.
* 8 fixed synthetic speakers (pitch 90-250 Hz, formant scale 0.88-1.22, speaking rate 0.8-1.25),
  drawn per utterance and shared by every split; per-utterance jitter of pitch, formants and
  durations; declining pitch contour with an accent; 50-200 ms silences before and after;
  a random channel tilt; coloured background noise at 0-15 dB SNR; 0.45-1.6 s at 16 kHz;
  peak-normalised (0.95) float32.
* Source: Rosenberg glottal-pulse derivative (plus a little breath noise) on a time-varying f0.
  Filter: four cascaded 2nd-order formant resonators whose frequencies glide smoothly between
  segments (targets smoothed over ~35 ms, filtered in short piecewise-constant blocks by
  ``scipy.signal.lfilter`` with output-continuous state carried across blocks).
* Frame labels for PNMI: one phone id per 20 ms frame exactly as the conv front-end frames the
  waveform (frame ``i`` covers samples ``[320 i, 320 i + 400)``; label = phone at sample
  ``320 i + 200``).

The output is a pure function of ``(GENERATOR_VERSION, split, seed, index)``. ``GENERATOR_VERSION`` is
frozen once shipped: any change that alters a single sample must bump it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from mmssl.data.synth_splits import balanced_labels, split_code, split_count

GENERATOR_VERSION: int = 1

SAMPLE_RATE = 16000
SPLITS = {"train": 2000, "val": 400, "test": 1000}

# Framing of the model's conv front-end (wav2vec2/HuBERT style: 25 ms window, 20 ms hop).
FRAME_WIN = 400
FRAME_HOP = 320

MIN_SAMPLES = int(0.45 * SAMPLE_RATE)  # 7200
MAX_SAMPLES = int(1.6 * SAMPLE_RATE)  # 25600

# --------------------------------------------------------------------------------------------------
# Phone inventory (index = frame label).
# --------------------------------------------------------------------------------------------------
VOWELS: dict[str, tuple[float, float, float]] = {  # Peterson & Barney style F1/F2/F3 (adult male)
    "i": (270.0, 2290.0, 3010.0),
    "a": (730.0, 1090.0, 2440.0),
    "u": (300.0, 870.0, 2240.0),
    "e": (530.0, 1840.0, 2480.0),
    "o": (570.0, 840.0, 2410.0),
    "ae": (660.0, 1720.0, 2410.0),
}
FRICATIVES: dict[str, tuple[float, float, float]] = {  # centre Hz, bandwidth Hz, relative rms
    "s": (5200.0, 1800.0, 0.30),
    "sh": (2900.0, 1100.0, 0.38),
    "f": (4200.0, 5000.0, 0.11),
}
PLOSIVES: dict[str, tuple[float, float, float]] = {  # burst centre Hz, bandwidth Hz, relative peak
    "p": (900.0, 1400.0, 0.55),
    "t": (4300.0, 2500.0, 0.60),
    "k": (1900.0, 900.0, 0.70),
}
NASALS: dict[str, tuple[float, float, float]] = {  # murmur F1/F2/F3
    "m": (280.0, 1100.0, 2300.0),
    "n": (280.0, 1650.0, 2650.0),
}
PHONES: list[str] = ["sil", *VOWELS, *FRICATIVES, *PLOSIVES, *NASALS]
_PHONE_ID = {p: i for i, p in enumerate(PHONES)}

# --------------------------------------------------------------------------------------------------
# Lexicon: 10 words, 2-4 CV syllables. Index = class label.
# --------------------------------------------------------------------------------------------------
_LEXICON: list[list[tuple[str, str]]] = [
    [("s", "a"), ("t", "i")],
    [("t", "i"), ("s", "a")],  # order pair with 0
    [("m", "o"), ("k", "e"), ("sh", "u")],
    [("sh", "u"), ("k", "e"), ("m", "o")],  # order pair with 2
    [("s", "a"), ("p", "i")],  # minimal pair with 0 (t/p)
    [("n", "o"), ("k", "e"), ("sh", "u")],  # minimal pair with 2 (m/n)
    [("t", "i"), ("s", "ae")],  # minimal pair with 1 (a/ae)
    [("m", "o"), ("k", "ae"), ("sh", "u")],  # minimal pair with 2 (e/ae)
    [("f", "o"), ("m", "i"), ("t", "ae"), ("k", "u")],
    [("f", "o"), ("n", "i"), ("t", "ae"), ("p", "u")],  # near 8 (m/n, k/p)
]
WORDS: list[str] = ["-".join(c + v for c, v in w) for w in _LEXICON]
NUM_CLASSES = len(WORDS)

# --------------------------------------------------------------------------------------------------
# Speakers: fixed table (frozen with GENERATOR_VERSION), shared by all splits.
# (f0 Hz, formant scale, speaking rate, glottal open quotient, breathiness)
# --------------------------------------------------------------------------------------------------
SPEAKERS: list[tuple[float, float, float, float, float]] = [
    (95.0, 0.90, 0.95, 0.55, 0.02),
    (118.0, 0.95, 1.20, 0.50, 0.04),
    (135.0, 1.00, 0.82, 0.60, 0.03),
    (165.0, 1.05, 1.05, 0.65, 0.06),
    (195.0, 1.10, 0.90, 0.62, 0.08),
    (215.0, 1.14, 1.25, 0.68, 0.05),
    (240.0, 1.20, 1.10, 0.70, 0.07),
    (105.0, 0.88, 1.15, 0.52, 0.03),
]
NUM_SPEAKERS = len(SPEAKERS)

# Base segment durations (seconds) at rate 1.0.
_DUR_VOWEL = 0.135
_DUR_FRIC = 0.105
_DUR_PLOS = 0.080  # closure + burst + aspiration
_DUR_NASAL = 0.075

_FORMANT_BW = np.array([65.0, 95.0, 150.0, 220.0])
_NASAL_BW = np.array([110.0, 260.0, 320.0, 350.0])
_F4 = 3500.0
_BLOCK = 80  # 5 ms: time-varying filter update step
_QSTEP = 0.012  # log-frequency quantum that triggers a filter-coefficient update


@dataclass
class Utterance:
    wav: np.ndarray  # [L] float32 in [-1, 1]
    label: int  # word index into WORDS
    speaker: int  # speaker index into SPEAKERS
    frame_labels: np.ndarray  # [num_frames(L)] int16 phone ids into PHONES


def num_frames(num_samples: int) -> int:
    """Frames of the conv front-end: floor((L - 400) / 320) + 1 (0 when L < 400)."""
    if num_samples < FRAME_WIN:
        return 0
    return (num_samples - FRAME_WIN) // FRAME_HOP + 1


def frame_labels_from_samples(sample_labels: np.ndarray) -> np.ndarray:
    """Per-frame labels: the label of each frame's centre sample (320 i + 200)."""
    n = num_frames(len(sample_labels))
    centres = np.arange(n) * FRAME_HOP + FRAME_WIN // 2
    return sample_labels[centres].astype(np.int16)




def generate(split: str, n: int | None = None, seed: int = 0, start: int = 0) -> Iterator[Utterance]:
    """Yield ``n`` utterances of ``split`` (default: its size in ``SPLITS``).

    Deterministic given ``(split, seed)``; utterance ``i`` depends only on ``(split, seed, i)`` so a
    shorter ``n`` yields a prefix of the full split. Splits use disjoint random streams (seeded by the
    split name); the speakers are shared by all splits. Labels are balanced (a shuffled repetition of
    0..9 over the split's nominal size). Any split name is accepted when ``n`` is given.
    ``start`` skips the first ``start`` items (one worker's chunk, mmssl/data/pool.py)."""
    n, seed = split_count(split, n, seed, SPLITS)
    labels = balanced_labels(GENERATOR_VERSION, seed, split, max(n, SPLITS.get(split, 0)), NUM_CLASSES)
    code = split_code(split)
    for i in range(start, n):
        rng = np.random.default_rng([GENERATOR_VERSION, seed, code, 1, i])
        yield synthesize(int(labels[i]), int(rng.integers(NUM_SPEAKERS)), rng)


# --------------------------------------------------------------------------------------------------
# Synthesis.
# --------------------------------------------------------------------------------------------------
def _cascade_allpole(freq: np.ndarray, bw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cascade of unity-DC-gain resonators as one all-pole filter: gains [R] and denominators
    [R, 2K+1] for formants ``freq``/``bw`` of shape [R, K]."""
    r = np.exp(-np.pi * bw / SAMPLE_RATE)
    a1 = -2.0 * r * np.cos(2.0 * np.pi * freq / SAMPLE_RATE)
    a2 = r * r
    den = np.ones((freq.shape[0], 1))
    for j in range(freq.shape[1]):
        nxt = np.zeros((den.shape[0], den.shape[1] + 2))
        nxt[:, :-2] += den
        nxt[:, 1:-1] += den * a1[:, j : j + 1]
        nxt[:, 2:] += den * a2[:, j : j + 1]
        den = nxt
    return np.prod(1.0 + a1 + a2, axis=1), den


def _hist(y: np.ndarray, s: int, order: int) -> np.ndarray:
    """[y[s-1], y[s-2], ..., y[s-order]] with zeros before the start."""
    out = np.zeros(order)
    m = min(order, s)
    out[:m] = y[s - 1 :: -1][:m]
    return out


def _bandpass_ba(fc: float, bw: float) -> tuple[np.ndarray, np.ndarray]:
    """Peak-normalised 2-pole/2-zero band-pass (zeros at DC and Nyquist), squared (4th order)."""
    fc = min(fc, 0.45 * SAMPLE_RATE)
    r = np.exp(-np.pi * bw / SAMPLE_RATE)
    a = np.array([1.0, -2.0 * r * np.cos(2.0 * np.pi * fc / SAMPLE_RATE), r * r])
    g = (1.0 - r * r) / 2.0
    b = np.array([g, 0.0, -g])
    return np.convolve(b, b), np.convolve(a, a)


def _smoothed(bounds: np.ndarray, values: np.ndarray, x: np.ndarray, win: float) -> np.ndarray:
    """Moving average (width ``win`` samples, centred, edge-extended) of the piecewise-constant
    function equal to ``values[k]`` on ``[bounds[k], bounds[k+1])``, evaluated at points ``x``.

    Uses the exact piecewise-linear integral, so it costs O(len(x)) per column, not O(L)."""
    h = 0.5 * win
    b = np.concatenate([[bounds[0] - win - 1.0], bounds[1:-1], [bounds[-1] + win + 1.0]]).astype(np.float64)
    c = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(np.diff(b)[:, None] * values, 0)], 0)
    lo, hi = x - h, x + h
    out = np.empty((len(x), values.shape[1]))
    for j in range(values.shape[1]):
        out[:, j] = (np.interp(hi, b, c[:, j]) - np.interp(lo, b, c[:, j])) / win
    return out


def _allpole_state(a: np.ndarray, y_hist: np.ndarray) -> np.ndarray:
    """lfilter (transposed direct form II) state of the all-pole filter ``b=[g], a`` that continues
    from past outputs ``y_hist = [y[n], y[n-1], ..., y[n-N+1]]``: the time-varying recursion
    y[n] = g x[n] - sum_j a_j[n] y[n-j] with the *new* coefficients and the old outputs."""
    n = len(a) - 1
    return -(a[_STATE_IDX[n]] * _STATE_MASK[n]) @ y_hist


_STATE_IDX: dict[int, np.ndarray] = {}
_STATE_MASK: dict[int, np.ndarray] = {}
for _n in (8,):
    _i, _k = np.meshgrid(np.arange(_n), np.arange(_n), indexing="ij")
    _STATE_MASK[_n] = (_i + 1 + _k <= _n).astype(np.float64)
    _STATE_IDX[_n] = np.minimum(_i + 1 + _k, _n)


_PULSE_TABLE = 2048


def _glottal_source(f0: np.ndarray, oq: float, rng: np.random.Generator) -> np.ndarray:
    """Rosenberg glottal flow derivative for a per-sample f0 contour (table lookup of the pulse)."""
    phase = np.cumsum(f0 * (1.0 / SAMPLE_RATE)) + rng.random()
    ipart = np.floor(phase)
    # one period of the Rosenberg flow pulse with open quotient ``oq``
    q = np.arange(_PULSE_TABLE + 1) / _PULSE_TABLE
    tp = 0.62 * oq
    tn = oq - tp
    table = np.where(
        q < tp,
        0.5 * (1.0 - np.cos(np.pi * q / tp)),
        np.where(q < oq, np.cos(0.5 * np.pi * np.minimum(q - tp, tn) / tn), 0.0),
    )
    g = table[((phase - ipart) * _PULSE_TABLE).astype(np.intp)]
    # per-period amplitude shimmer (~4 %)
    period = ipart.astype(np.intp)
    period -= period[0]
    shimmer = 1.0 + 0.04 * rng.standard_normal(period[-1] + 1)
    g = g * shimmer[period]
    return np.diff(g, prepend=g[0])


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-variance white noise (uniform: cheaper than Gaussian, and filtered anyway)."""
    return (rng.random(n) - 0.5) * 3.4641016151377544


def _upsample(edges: np.ndarray, length: int) -> np.ndarray:
    """Linear interpolation of values given every ``_BLOCK`` samples (at 0, B, 2B, ...)."""
    frac = np.arange(_BLOCK) * (1.0 / _BLOCK)
    up = edges[:-1, None] + (edges[1:] - edges[:-1])[:, None] * frac[None, :]
    return up.ravel()[:length]


def synthesize(label: int, speaker: int, rng: np.random.Generator) -> Utterance:
    """Render one utterance of word ``label`` by ``speaker`` using ``rng`` for all variation."""
    sr = SAMPLE_RATE
    f0_base, fscale, rate, oq, breath = SPEAKERS[speaker]
    # ---- per-utterance jitter
    f0_base *= float(np.exp(rng.normal(0.0, 0.07)))
    fscale *= float(np.exp(rng.normal(0.0, 0.03)))
    rate *= float(np.exp(rng.normal(0.0, 0.07)))
    oq = float(np.clip(oq + rng.normal(0.0, 0.04), 0.4, 0.8))

    # ---- segment plan: (phone, kind, duration s)
    plan: list[tuple[str, str, float]] = []
    for cons, vow in _LEXICON[label]:
        if cons in FRICATIVES:
            kind, dur = "fric", _DUR_FRIC
        elif cons in PLOSIVES:
            kind, dur = "plos", _DUR_PLOS
        else:
            kind, dur = "nasal", _DUR_NASAL
        plan.append((cons, kind, dur))
        plan.append((vow, "vowel", _DUR_VOWEL))
    # (no word-final lengthening: it would let a bag-of-frames model tell order pairs apart)
    durs = np.array([d for _, _, d in plan]) / rate * np.exp(rng.normal(0.0, 0.12, len(plan)))
    seg_len = np.maximum(np.round(durs * sr).astype(np.int64), int(0.03 * sr))
    pre = int(rng.uniform(0.05, 0.2) * sr)
    post = int(rng.uniform(0.05, 0.2) * sr)
    speech = int(seg_len.sum())
    if pre + speech + post > MAX_SAMPLES:  # too long: compress speech
        seg_len = np.floor(seg_len * (MAX_SAMPLES - pre - post) / speech).astype(np.int64)
    elif pre + speech + post < MIN_SAMPLES:  # too short: stretch speech
        seg_len = np.ceil(seg_len * (MIN_SAMPLES - pre - post) / speech).astype(np.int64)
    bounds = np.concatenate([[pre], pre + np.cumsum(seg_len)])
    L = int(bounds[-1] + post)

    # ---- per-sample phone labels
    sample_labels = np.zeros(L, dtype=np.int16)
    for (ph, _, _), s, e in zip(plan, bounds[:-1], bounds[1:]):
        sample_labels[s:e] = _PHONE_ID[ph]

    # ---- formant targets & voicing amplitude per segment
    nseg = len(plan)
    targets = np.zeros((nseg, 8))  # F1..F4, B1..B4
    voice_amp = np.zeros(nseg)
    syl_gain = np.exp(rng.normal(0.0, 0.15, nseg // 2))
    accent = int(rng.integers(nseg // 2))
    syl_gain[accent] *= 1.25
    vowel_f = {}
    for k, (ph, kind, _) in enumerate(plan):
        if kind == "vowel":
            f = np.array([*VOWELS[ph], _F4]) * fscale * np.exp(rng.normal(0.0, 0.05, 4))
            targets[k] = np.concatenate([f, _FORMANT_BW * (1.0 + 0.3 * breath / 0.05)])
            voice_amp[k] = syl_gain[k // 2]
            vowel_f[k] = targets[k]
        elif kind == "nasal":
            f = np.array([*NASALS[ph], _F4]) * fscale
            targets[k] = np.concatenate([f, _NASAL_BW])
            voice_amp[k] = 0.45 * syl_gain[k // 2]
    for k, (ph, kind, _) in enumerate(plan):  # unvoiced: anticipate the following vowel
        if kind in ("fric", "plos"):
            targets[k] = vowel_f[k + 1]
    # pre/post silences take the neighbouring targets
    seg_targets = np.concatenate([targets[:1], targets, targets[-1:]], 0)
    seg_amp = np.concatenate([[0.0], voice_amp, [0.0]])
    seg_bounds = np.concatenate([[0], bounds, [L]])
    nb = -(-L // _BLOCK)
    edges = np.arange(nb + 1, dtype=np.float64) * _BLOCK  # control points every 5 ms
    amp = _upsample(_smoothed(seg_bounds, seg_amp[:, None], edges, 0.015 * sr)[:, 0], L)

    # ---- source: f0 contour (declination + accent bump + slow wobble)
    decl = float(rng.uniform(0.05, 0.18))
    span = max(bounds[-1] - bounds[0], 1)
    pos = np.clip((edges - bounds[0]) / span, 0.0, 1.0)
    acc_c = (bounds[2 * accent + 1] + bounds[2 * accent + 2]) / 2.0
    bump = float(rng.uniform(0.06, 0.2)) * np.exp(-0.5 * ((edges - acc_c) / (0.08 * sr)) ** 2)
    wob = 0.015 * np.sin(2 * np.pi * rng.uniform(3.0, 6.0) / sr * edges + rng.uniform(0, 2 * np.pi))
    f0 = _upsample(f0_base * (1.0 + decl * (0.5 - pos)) * (1.0 + bump + wob), L)
    src = _glottal_source(f0, oq, rng)
    src = src / (np.sqrt(np.mean(src**2)) + 1e-9)
    src = src + breath * 3.0 * _noise(rng, L)  # aspiration noise in the glottal source
    exc = src * amp

    # ---- time-varying cascade of 4 formant resonators. Formant targets are smoothed over ~35 ms
    # (smooth transitions) and sampled every 5 ms; the filter is held constant over runs of blocks
    # whose formants agree to within ~1.2 % and switched with output-continuous state.
    active = np.flatnonzero(amp > 1e-4)
    voiced = np.zeros(L)
    if active.size:
        a0 = int(active[0]) // _BLOCK * _BLOCK
        a1 = min(L, int(active[-1]) + int(0.04 * sr))
        starts = np.arange(a0, a1, _BLOCK)
        centres = np.minimum(starts + _BLOCK // 2, L - 1).astype(np.float64)
        traj = _smoothed(seg_bounds, seg_targets, centres, max(0.035 * sr / rate, 8.0))  # [B, 8]
        fq = np.round(np.log(traj[:, :4]) / _QSTEP)
        change = np.concatenate([[True], np.any(fq[1:] != fq[:-1], axis=1)])
        run_starts = starts[change]
        run_ends = np.append(run_starts[1:], a1)
        gain, den = _cascade_allpole(traj[change, :4], traj[change, 4:])  # [R], [R, 9]
        order = den.shape[1] - 1
        zi = np.zeros(order)
        for r in range(len(run_starts)):
            s, e = int(run_starts[r]), int(run_ends[r])
            if r:
                hist = voiced[s - 1 : s - 1 - order : -1] if s - 1 - order >= 0 else _hist(voiced, s, order)
                zi = _allpole_state(den[r], hist)
            voiced[s:e], _ = lfilter(gain[r : r + 1], den[r], exc[s:e], zi=zi)
    vowel_mask = np.zeros(L, dtype=bool)
    for k in range(nseg):
        if plan[k][1] == "vowel":
            vowel_mask[bounds[k] : bounds[k + 1]] = True
    voiced /= np.sqrt(np.mean(voiced[vowel_mask] ** 2)) + 1e-9

    # ---- unvoiced consonants
    out = voiced
    for k, (ph, kind, _) in enumerate(plan):
        s, e = int(bounds[k]), int(bounds[k + 1])
        n = e - s
        g = syl_gain[k // 2]
        if kind == "fric":
            fc, bw, lvl = FRICATIVES[ph]
            noise = lfilter(*_bandpass_ba(fc * fscale**0.5, bw), _noise(rng, n + 64))[64:]
            noise /= np.sqrt(np.mean(noise**2)) + 1e-9
            ramp = min(int(0.02 * sr), n // 3)
            env = np.ones(n)
            env[:ramp] = np.linspace(0.0, 1.0, ramp)
            env[n - ramp :] = np.linspace(1.0, 0.0, ramp)
            out[s:e] += lvl * g * noise * env
        elif kind == "plos":
            fc, bw, lvl = PLOSIVES[ph]
            closure = int(n * rng.uniform(0.35, 0.5))
            rest = n - closure
            noise = lfilter(*_bandpass_ba(fc * fscale**0.5, bw), _noise(rng, rest + 64))[64:]
            noise /= np.sqrt(np.mean(noise**2)) + 1e-9
            tt = np.arange(rest) / sr
            env = np.exp(-tt / 0.006) + 0.25 * np.exp(-tt / 0.03)  # burst + aspiration
            env[: min(16, rest)] *= np.linspace(0.2, 1.0, min(16, rest))
            out[s + closure : e] += lvl * g * noise * env

    # ---- channel: random spectral tilt (microphone / room colouring)
    tilt = float(rng.uniform(-0.6, 0.9))
    out = lfilter([1.0, -tilt], [1.0], out)

    # ---- background: coloured noise at 0-15 dB SNR
    sp = out[bounds[0] : bounds[-1]]
    p_speech = float(np.mean(sp**2))
    snr_db = float(rng.uniform(0.0, 15.0))
    colour = float(rng.uniform(-0.5, 0.97))  # one-pole: <0 bluish, ~0 white, ->1 brown
    bg = lfilter([1.0], [1.0, -colour], _noise(rng, L + 256))[256:]
    bg *= np.sqrt(p_speech / (np.mean(bg**2) + 1e-12) / 10.0 ** (snr_db / 10.0))
    wav = out + bg
    wav = wav / (np.max(np.abs(wav)) + 1e-9) * 0.95

    return Utterance(
        wav=wav.astype(np.float32),
        label=int(label),
        speaker=int(speaker),
        frame_labels=frame_labels_from_samples(sample_labels),
    )


if __name__ == "__main__":  # timing of the full corpus
    import time

    t0 = time.perf_counter()
    total = 0
    for name, size in SPLITS.items():
        for u in generate(name, size):
            total += len(u.wav)
    dt = time.perf_counter() - t0
    n_utt = sum(SPLITS.values())
    print(f"generated {n_utt} utterances ({total / SAMPLE_RATE:.0f} s of audio) in {dt:.2f} s")
