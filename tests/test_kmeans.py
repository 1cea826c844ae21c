"""Tests for mmssl.kmeans: streaming k-means quality vs scikit-learn, and PNMI."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from mmssl.kmeans import StreamingKMeans, pnmi, purity

torch.set_num_threads(2)

SR = 16000
CLIP_SECONDS = 5.0
N_CLIPS = 84  # 84 clips x 249 frames = 20,916 frames
CLIPS_PER_CHUNK = 16

# (F1, F2, F3) in Hz of a few vowels (Peterson & Barney averages): the "phones" of the fake speech.
VOWEL_FORMANTS = torch.tensor(
    [
        [730.0, 1090.0, 2440.0],
        [270.0, 2290.0, 3010.0],
        [300.0, 870.0, 2240.0],
        [530.0, 1840.0, 2480.0],
        [660.0, 1720.0, 2410.0],
        [490.0, 1350.0, 1690.0],
        [640.0, 1190.0, 2390.0],
        [440.0, 1020.0, 2240.0],
    ]
)
FORMANT_BANDWIDTHS = torch.tensor([90.0, 130.0, 200.0])


CTRL_HOP = 40  # samples per control step (2.5 ms): f0, formants and gains vary slowly


def _smooth(x: torch.Tensor, width: int) -> torch.Tensor:
    """Moving average along the last dim of ``[..., L]`` (same length): gradual transitions."""
    flat = x.reshape(1, -1, x.shape[-1])
    kernel = torch.full((flat.shape[1], 1, width), 1.0 / width)
    padded = torch.nn.functional.pad(flat, (width // 2, width - 1 - width // 2), mode="replicate")
    return torch.nn.functional.conv1d(padded, kernel, groups=flat.shape[1]).reshape(x.shape)


def _to_audio_rate(x: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Linear upsampling of control-rate ``[B, C, n_ctrl]`` to ``[B, C, n_samples]``."""
    return torch.nn.functional.interpolate(x, size=n_samples, mode="linear", align_corners=True)


def _wavetable_voice(envelope: torch.Tensor, f0: torch.Tensor, table_size: int = 512) -> torch.Tensor:
    """Additive synthesis ``sum_h envelope[:, h](t) sin(h * phase(t))`` via per-control-step wavetables.

    Args:
        envelope: ``[B, H, n_ctrl]`` harmonic amplitudes at the control rate (``H < table_size / 2``).
        f0: ``[B, n_samples]`` fundamental frequency in Hz at the audio rate.
    Returns:
        ``[B, n_samples]`` waveforms. One period per control step comes from an inverse FFT, and
        samples are read back with linear interpolation over the period (nearest table in time):
        the same signal as summing H sinusoids per sample, at a fraction of the cost.
    """
    b, n_harm, n_ctrl = envelope.shape
    spec = torch.zeros(b, n_ctrl, table_size // 2 + 1, dtype=torch.complex64)
    spec[..., 1 : n_harm + 1] = -0.5j * table_size * envelope.transpose(1, 2)  # bin h -> amp * sin(h theta)
    tables = torch.fft.irfft(spec, n=table_size).flatten()  # [B * n_ctrl * table_size]

    pos = torch.cumsum(f0.double() / SR, 1).remainder_(1.0).float() * table_size  # position in the period
    i0 = pos.floor().long()
    i1 = (i0 + 1) % table_size
    wp = pos - i0
    # Nearest control step: the envelope barely moves in 2.5 ms (formants are smoothed over 20 ms).
    c = (
        torch.arange(f0.shape[1])
        .add_(CTRL_HOP // 2)
        .div_(CTRL_HOP, rounding_mode="floor")
        .clamp_(max=n_ctrl - 1)
    )
    base = (torch.arange(b).unsqueeze(1) * n_ctrl + c) * table_size  # [B, n_samples]
    return (1 - wp) * tables[base + i0] + wp * tables[base + i1]


def _synthetic_speech(g: torch.Generator, n_clips: int, n_samples: int) -> torch.Tensor:
    """``[n_clips, n_samples]`` of speech-like audio, one "speaker" per clip.

    Each clip is a sequence of 50-150 ms segments, each silence, a voiced vowel (harmonics of a
    drifting f0 shaped by that vowel's formants, scaled per speaker) or a fricative (coloured
    noise), with smoothed formant / gain transitions and a little background noise. The slowly
    varying parameters are built at a 400 Hz control rate and interpolated, and all clips are
    made at once, which keeps this fast.
    """
    b = n_clips
    n_seg = n_samples // 800 + 1
    n_ctrl = n_samples // CTRL_HOP + 1
    seg_end = torch.cumsum(torch.randint(800, 2400, (b, n_seg), generator=g), 1)
    seg_of = torch.searchsorted(
        seg_end, (torch.arange(n_ctrl) * CTRL_HOP).expand(b, -1).contiguous(), right=True
    )
    seg_of = seg_of.clamp_(max=n_seg - 1)  # [B, n_ctrl] segment of each control step

    def per_ctrl(per_segment: torch.Tensor) -> torch.Tensor:  # [B, n_seg, ...] -> [B, n_ctrl, ...]
        return per_segment[torch.arange(b).unsqueeze(1), seg_of]

    probs = torch.tensor([0.15, 0.65, 0.20]).expand(b, -1)  # silence / voiced / fricative
    kind = torch.multinomial(probs, n_seg, replacement=True, generator=g)  # [B, n_seg]
    vowel = torch.randint(len(VOWEL_FORMANTS), (b, n_seg), generator=g)
    speaker = 0.85 + 0.3 * torch.rand(b, 1, 1, generator=g)  # vocal-tract length scaling
    f0_base = 90.0 + 130.0 * torch.rand(b, 1, generator=g)

    formants = _smooth(per_ctrl(VOWEL_FORMANTS[vowel] * speaker).transpose(1, 2), 8)  # [B, 3, n_ctrl]
    t = torch.arange(n_ctrl) * CTRL_HOP / SR
    f0 = f0_base * (1.0 + 0.08 * torch.sin(2 * math.pi * 0.7 * t + 6.28 * torch.rand(b, 1, generator=g)))
    f0 = f0 * _smooth(per_ctrl(0.9 + 0.2 * torch.rand(b, n_seg, generator=g)), 20)  # [B, n_ctrl]

    harmonics = torch.arange(1, 41, dtype=torch.float32).view(1, -1, 1)  # [1, H, 1]
    freq = harmonics * f0.unsqueeze(1)  # [B, H, n_ctrl]
    envelope = sum(
        (0.6**i) / (1.0 + ((freq - formants[:, i : i + 1]) / FORMANT_BANDWIDTHS[i]) ** 2) for i in range(3)
    )
    envelope = envelope * (freq < 7600) / harmonics.sqrt()  # spectral tilt, no aliasing
    f0_audio = _to_audio_rate(f0.unsqueeze(1), n_samples)[:, 0]
    # A few clips at a time: the wavetables are [clips, n_ctrl, table_size].
    voiced = torch.cat([_wavetable_voice(e, f) for e, f in zip(envelope.split(16), f0_audio.split(16))])
    voiced = voiced / voiced.abs().amax(1, keepdim=True)

    white = torch.randn(b, n_samples, generator=g)
    highpassed = torch.cat([white[:, :1], white[:, 1:] - white[:, :-1]], 1) / 2.0
    tint = torch.rand(b, n_seg, generator=g)  # per-fricative colour: "s" vs "f" vs "h"
    gain = torch.where(kind == 1, 0.3 + 0.7 * torch.rand(b, n_seg, generator=g), 0.0)
    fgain = torch.where(kind == 2, 0.05 + 0.25 * torch.rand(b, n_seg, generator=g), 0.0)
    ctrl = _smooth(per_ctrl(torch.stack([gain, fgain, tint], 2)).transpose(1, 2), 2)  # 5 ms ramps
    gain_a, fgain_a, tint_a = _to_audio_rate(ctrl, n_samples).unbind(1)
    fric = tint_a * highpassed + (1.0 - tint_a) * white
    return gain_a * voiced + fgain_a * fric + 1e-3 * torch.randn(b, n_samples, generator=g)


@pytest.fixture(scope="module")
def mfcc_frames() -> torch.Tensor:
    """``[N_CLIPS, T, 39]`` MFCC + delta + delta-delta frames (HuBERT iteration-1 features)."""
    torchaudio = pytest.importorskip("torchaudio")
    g = torch.Generator().manual_seed(1234)
    wav = _synthetic_speech(g, N_CLIPS, int(CLIP_SECONDS * SR))
    mfcc = torchaudio.transforms.MFCC(
        sample_rate=SR,
        n_mfcc=13,
        melkwargs={"n_fft": 400, "win_length": 400, "hop_length": 320, "n_mels": 40, "center": False},
    )(wav)  # [B, 13, T]
    d1 = torchaudio.functional.compute_deltas(mfcc)
    d2 = torchaudio.functional.compute_deltas(d1)
    feats = torch.cat([mfcc, d1, d2], dim=1).transpose(1, 2).contiguous()
    assert torch.isfinite(feats).all()
    return feats


def _np_inertia(x: np.ndarray, c: np.ndarray) -> float:
    """Reference inertia in float64, independent of the module under test."""
    d = (x * x).sum(1, keepdims=True) - 2.0 * x @ c.T + (c * c).sum(1)
    return float(np.maximum(d.min(1), 0.0).sum())


def _blobs(n_per: int, centers: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = centers.repeat_interleave(n_per, 0) + scale * torch.randn(
        n_per * len(centers), centers.shape[1], generator=g
    )
    return x[torch.randperm(len(x), generator=g)]


def test_inertia_close_to_sklearn_on_streamed_mfcc(mfcc_frames: torch.Tensor) -> None:
    from sklearn.cluster import KMeans

    n_clips, n_frames, dim = mfcc_frames.shape
    assert dim == 39 and n_clips * n_frames >= 20_000
    passes = 0

    def chunks():
        # A fresh generator per pass, a few clips at a time: the data is never handed over whole.
        nonlocal passes
        passes += 1
        return (
            mfcc_frames[i : i + CLIPS_PER_CHUNK].reshape(-1, dim) for i in range(0, n_clips, CLIPS_PER_CHUNK)
        )

    t0 = time.perf_counter()
    km = StreamingKMeans(k=100, seed=0, device="cpu").fit(chunks)
    t_ours = time.perf_counter() - t0
    assert passes == 1 + km.n_iter_  # sampling pass + Lloyd passes

    x = mfcc_frames.reshape(-1, dim).double().numpy()
    t0 = time.perf_counter()
    ref = KMeans(n_clusters=100, n_init=3, random_state=0).fit(x)
    t_ref = time.perf_counter() - t0

    ours = _np_inertia(x, km.centroids.double().numpy())
    theirs = _np_inertia(x, ref.cluster_centers_)
    print(
        f"\nn={len(x)} ours={ours:.6g} ({km.n_iter_} iters, {t_ours:.2f}s) "
        f"sklearn={theirs:.6g} (inertia_={ref.inertia_:.6g}, {ref.n_iter_} iters, {t_ref:.2f}s) ratio={ours / theirs:.4f}"
    )
    assert km.inertia_ == pytest.approx(ours, rel=1e-4)
    assert ours <= 1.02 * theirs
    assert km.cluster_usage(km.predict(mfcc_frames.reshape(-1, dim)))["used"] == 100


def test_predict_is_nearest_centroid_and_inertia_matches_score() -> None:
    g = torch.Generator().manual_seed(0)
    centers = 4.0 * torch.randn(32, 16, generator=g)
    x = _blobs(200, centers, 1.5, seed=1) + 50.0  # overlapping blobs; offset exercises the centring
    parts = list(x.split(1000))
    km = StreamingKMeans(k=32, seed=1, device="cpu", chunk_size=700).fit(lambda: iter(parts))

    labels = km.predict(x)
    assert labels.dtype == torch.int64 and labels.shape == (len(x),)
    d = torch.cdist(x.double(), km.centroids.double()).pow(2)  # [n, k]
    direct = d.argmin(1)
    # Exact ties in float32 are the only admissible disagreement.
    mismatch = labels != direct
    assert torch.allclose(d[mismatch, labels[mismatch]], d[mismatch, direct[mismatch]], rtol=1e-5)
    assert mismatch.float().mean() < 1e-3

    assert km.score(lambda: iter(parts)) == pytest.approx(km.inertia_, rel=1e-9)
    assert km.score(x) == pytest.approx(km.inertia_, rel=1e-6)  # a plain tensor, other chunking
    assert km.inertia_ == pytest.approx(float(d.min(1).values.sum()), rel=1e-5)


def test_no_empty_clusters_on_clear_clusters() -> None:
    g = torch.Generator().manual_seed(5)
    centers = 20.0 * torch.randn(24, 8, generator=g)
    x = _blobs(300, centers, 1.0, seed=6)
    km = StreamingKMeans(k=24, seed=0, device="cpu", chunk_size=1000).fit(lambda: iter(x.split(2500)))
    usage = km.cluster_usage(km.predict(x))
    assert usage["used"] == 24 and usage["k"] == 24
    assert usage["perplexity"] == pytest.approx(24.0, rel=0.05)
    assert usage["max_fraction"] < 2.0 / 24


def test_empty_clusters_are_reseeded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Degenerate init: every centroid at one far-away point, so all rows fall into cluster 0
    # and k-1 clusters are empty after the first pass; they must all come back to life.
    def bad_init(self, sample, gen):
        return (sample.max(0).values + 100.0).repeat(self.k, 1)

    monkeypatch.setattr(StreamingKMeans, "_init_centroids", bad_init)
    centers = 10.0 * torch.eye(6, 6)
    x = _blobs(200, centers, 0.5, seed=2)
    km = StreamingKMeans(k=10, seed=0, device="cpu", chunk_size=500).fit(lambda: iter(x.split(400)))
    counts = torch.bincount(km.predict(x), minlength=10)
    assert (counts > 0).all(), counts
    assert km.score(x) == pytest.approx(km.inertia_, rel=1e-6)


def test_deterministic_for_fixed_seed() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 8, generator=g)
    parts = list(x.split(900))

    def run(seed: int) -> StreamingKMeans:
        # init_sample < n: the reservoir sample is what the seed must pin down
        return StreamingKMeans(k=16, seed=seed, max_iter=10, device="cpu", chunk_size=512).fit(
            lambda: iter(parts), init_sample=1000
        )

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.centroids, b.centroids) and a.inertia_ == b.inertia_
    assert a.centroids.shape == (16, 8) and a.centroids.dtype == torch.float32
    assert not torch.equal(a.centroids, c.centroids)


def test_initial_sample_is_uniform_without_replacement() -> None:
    # Rows are their own index; chunks of 333 force several reservoir merges (at 2 x init_sample).
    x = torch.arange(10_000, dtype=torch.float32).unsqueeze(1)
    km = StreamingKMeans(k=4, device="cpu")
    sample = km._sample_pass(lambda: iter(x.split(333)), 1000, torch.Generator().manual_seed(0))
    idx = sample[:, 0]
    assert idx.shape == (1000,) and idx.unique().numel() == 1000
    assert abs(float(idx.mean()) - 4999.5) < 400  # ~4.4 standard errors
    per_decile = torch.bincount((idx // 1000).long(), minlength=10)
    assert per_decile.min() > 60 and per_decile.max() < 140
    assert km._shift is not None and float(km._shift[0]) == pytest.approx(4999.5)


def test_one_shot_iterator_is_rejected() -> None:
    with pytest.raises(TypeError):
        StreamingKMeans(k=2, device="cpu").fit(iter([torch.randn(10, 2)]))


def test_too_few_rows_raises() -> None:
    with pytest.raises(ValueError):
        StreamingKMeans(k=10, device="cpu").fit(lambda: [torch.randn(5, 3)])


def test_pnmi_one_to_one_is_one() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, size=10_000)
    perm = rng.permutation(30)
    assert pnmi(perm[labels], labels) == pytest.approx(1.0, abs=1e-12)
    # Units that determine labels (several units per label) also remove all uncertainty.
    units = labels * 3 + rng.integers(0, 3, size=labels.size)
    assert pnmi(torch.from_numpy(units), torch.from_numpy(labels)) == pytest.approx(1.0, abs=1e-12)
    assert purity(units, labels) == pytest.approx(1.0)


def test_pnmi_independent_is_near_zero() -> None:
    rng = np.random.default_rng(1)
    n = 200_000
    labels = rng.integers(0, 40, size=n)
    units = rng.integers(0, 100, size=n)
    # Plug-in MI bias is about (L-1)(U-1)/(2n) nats = 0.0097, over H ~ ln 40: ~0.003.
    assert 0.0 <= pnmi(units, labels) < 0.01


def test_pnmi_hand_computed() -> None:
    # Pairs (label, unit): (0,0) x2, (0,1) x1, (1,1) x1, plus two ignored frames (label -1).
    labels = np.array([0, 0, 0, 1, -1, -1])
    units = np.array([0, 0, 1, 1, 0, 1])
    # p(l) = (3/4, 1/4) -> H(L) = 3/4 ln(4/3) + 1/4 ln 4 = ln 4 - 3/4 ln 3.
    # H(L|U): unit 0 (p=1/2) is always label 0 -> 0; unit 1 (p=1/2) is 50/50 -> ln 2. So H(L|U) = 1/2 ln 2.
    # PNMI = (H(L) - H(L|U)) / H(L) = (3/2 ln 2 - 3/4 ln 3) / (2 ln 2 - 3/4 ln 3) = 0.383689...
    h_l = math.log(4) - 0.75 * math.log(3)
    expected = (h_l - 0.5 * math.log(2)) / h_l
    assert expected == pytest.approx(0.383689, abs=1e-6)
    assert pnmi(units, labels) == pytest.approx(expected, rel=1e-12)
    # MI is symmetric but the normaliser is H(label): swapping roles divides by H(U) = ln 2 instead.
    assert pnmi(labels[:4], units[:4]) == pytest.approx((h_l - 0.5 * math.log(2)) / math.log(2), rel=1e-12)
    # Purity: unit 0 -> 2 of label 0, unit 1 -> 1 of either: (2 + 1) / 4.
    assert purity(units, labels) == pytest.approx(0.75)


def _separated_blobs(seed: int, k: int = 60, f: int = 16, n_per: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's make_blobs layout: centres uniform in [-10, 10]^f, unit variance; rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    centers = 20.0 * torch.rand(k, f, generator=g) - 10.0
    lab = torch.arange(k).repeat_interleave(n_per)
    x = centers[lab] + torch.randn(len(lab), f, generator=g)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], lab[perm]


def test_spare_centroids_find_every_separated_cluster() -> None:
    # On well-separated clusters, k-means++ often leaves one without a seed while another gets two,
    # and Lloyd cannot repair that (it costs ~25x the noise per row of the merged pair). Seeding
    # k + 10% and merging the cheapest pairs (Ward) must land on the true partition every time.
    plain_missed = 0
    for seed in range(5):
        x, lab = _separated_blobs(seed)
        means = torch.zeros(60, 16).index_add_(0, lab, x) / 50
        optimum = float(((x - means[lab]) ** 2).sum())
        km = StreamingKMeans(k=60, seed=seed, device="cpu").fit(x)
        assert km.inertia_ <= 1.001 * optimum, (seed, km.inertia_ / optimum)
        # every unit is one true cluster
        assert purity(km.predict(x), lab) == 1.0 and km.cluster_usage(km.predict(x))["used"] == 60
        plain = StreamingKMeans(k=60, seed=seed, device="cpu", oversample=0.0).fit(x)
        plain_missed += plain.inertia_ > 1.01 * optimum
    assert plain_missed >= 1  # the spares are what makes the difference on this data


def test_ward_merge_picks_the_cheapest_pair_and_the_exact_cost() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64) + 3.0 * torch.randn(6, 5, generator=g, dtype=torch.float64).repeat_interleave(50, 0)
    lab = torch.arange(6).repeat_interleave(50)
    lab[:7] = 1  # unequal sizes
    counts = torch.bincount(lab, minlength=6)
    c = torch.zeros(6, 5, dtype=torch.float64).index_add_(0, lab, x) / counts.unsqueeze(1)

    def sse(rows: torch.Tensor) -> float:
        return float(((rows - rows.mean(0)) ** 2).sum())

    # literal: the SSE increase of every merge, from the rows themselves
    rise = {(i, j): sse(x[(lab == i) | (lab == j)]) - sse(x[lab == i]) - sse(x[lab == j])
            for i in range(6) for j in range(i + 1, 6)}
    i, j = min(rise, key=rise.get)
    km = StreamingKMeans(k=5, device="cpu")
    merged = km._ward_merge(c.float(), counts, 5)
    expect = torch.cat([c[:j], c[j + 1:]])
    expect[i] = x[(lab == i) | (lab == j)].mean(0)
    assert merged.shape == (5, 5)
    assert torch.allclose(merged.double(), expect, atol=1e-5)
    # the cost the merge uses is the literal rise
    ni, nj = float(counts[i]), float(counts[j])
    cost = ni * nj / (ni + nj) * float(((c[i] - c[j]) ** 2).sum())
    assert cost == pytest.approx(rise[(i, j)], rel=1e-9)


def test_argmin_helper_matches_torch() -> None:
    from mmssl.kmeans import _argmin

    d = torch.randn(257, 33, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_argmin(d, 1), d.argmin(1))
    assert int(_argmin(d)) == int(d.argmin())
    assert torch.equal(_argmin(d.T, 1), d.T.argmin(1))  # a non-contiguous view


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_matches_cpu() -> None:
    x, _ = _separated_blobs(1)
    x = x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))  # some overlap
    cpu = StreamingKMeans(k=60, seed=0, device="cpu").fit(lambda: iter(x.split(700)))
    gpu = StreamingKMeans(k=60, seed=0, device="cuda").fit(lambda: iter(x.split(700)))
    assert gpu.centroids.device.type == "cuda"
    assert gpu.inertia_ == pytest.approx(cpu.inertia_, rel=1e-3)
    assert gpu.score(x.cuda()) == pytest.approx(gpu.inertia_, rel=1e-5)
    assert gpu.predict(x.cuda()).device.type == "cuda"
