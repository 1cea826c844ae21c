"""Tests for mmssl.modalities.speech.synth: the embedded synthetic spoken-word corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio
from mmssl.modalities.speech import synth


@pytest.fixture(scope="module")
def held_out() -> list[synth.Utterance]:
    return list(synth.generate("test"))


@pytest.fixture(scope="module")
def train_600() -> list[synth.Utterance]:
    return list(synth.generate("train", 600))


def test_constants() -> None:
    assert synth.SAMPLE_RATE == 16000
    assert synth.SPLITS == {"train": 2000, "val": 400, "test": 1000}
    assert isinstance(synth.GENERATOR_VERSION, int)
    assert len(synth.WORDS) == 10 and len(set(synth.WORDS)) == 10
    assert synth.PHONES[0] == "sil" and len(set(synth.PHONES)) == len(synth.PHONES)
    syllables = [w.split("-") for w in synth.WORDS]
    assert all(2 <= len(s) <= 4 for s in syllables)
    # at least two word pairs that differ only in syllable order
    order_pairs = [
        (i, j)
        for i in range(10)
        for j in range(i + 1, 10)
        if sorted(syllables[i]) == sorted(syllables[j]) and syllables[i] != syllables[j]
    ]
    assert len(order_pairs) >= 2


def test_num_frames() -> None:
    assert synth.num_frames(399) == 0
    assert synth.num_frames(400) == 1
    assert synth.num_frames(719) == 1
    assert synth.num_frames(720) == 2
    assert synth.num_frames(16000) == 49  # 1 s -> 49 frames, as the wav2vec2 conv stack


def test_determinism_and_prefix() -> None:
    a = list(synth.generate("val", 6, seed=3))
    b = list(synth.generate("val", 6, seed=3))
    c = list(synth.generate("val", 3, seed=3))
    for u, v in zip(a, b):
        assert u.label == v.label and u.speaker == v.speaker
        np.testing.assert_array_equal(u.wav, v.wav)
        np.testing.assert_array_equal(u.frame_labels, v.frame_labels)
    for u, v in zip(a, c):  # a shorter n yields a prefix of the same stream
        np.testing.assert_array_equal(u.wav, v.wav)


def test_splits_and_seeds_differ() -> None:
    tr = list(synth.generate("train", 4))
    va = list(synth.generate("val", 4))
    te = list(synth.generate("test", 4))
    other_seed = list(synth.generate("train", 4, seed=1))
    for xs, ys in [(tr, va), (tr, te), (va, te), (tr, other_seed)]:
        for u, v in zip(xs, ys):
            assert u.wav.shape != v.wav.shape or not np.array_equal(u.wav, v.wav)


def test_unknown_split_needs_n() -> None:
    with pytest.raises(ValueError):
        next(synth.generate("pretrain"))
    assert len(list(synth.generate("pretrain", 2))) == 2


def test_waveforms_lengths_and_frame_labels(held_out: list[synth.Utterance]) -> None:
    n_phones = len(synth.PHONES)
    seen_phones: set[int] = set()
    for u in held_out:
        assert u.wav.dtype == np.float32 and u.wav.ndim == 1
        assert 0.45 * 16000 <= len(u.wav) <= 1.6 * 16000
        assert np.isfinite(u.wav).all()
        peak = float(np.abs(u.wav).max())
        assert 0.5 < peak <= 1.0
        assert u.frame_labels.dtype == np.int16
        assert len(u.frame_labels) == synth.num_frames(len(u.wav))
        assert u.frame_labels.min() >= 0 and u.frame_labels.max() < n_phones
        # 50-200 ms of silence at both ends; speech in between
        assert u.frame_labels[0] == 0 and u.frame_labels[-1] == 0
        assert (u.frame_labels > 0).mean() > 0.3
        seen_phones.update(np.unique(u.frame_labels).tolist())
        assert 0 <= u.speaker < 8 and 0 <= u.label < 10
    assert seen_phones == set(range(n_phones))


def test_labels_balanced_and_speakers_shared(
    held_out: list[synth.Utterance], train_600: list[synth.Utterance]
) -> None:
    counts = np.bincount([u.label for u in held_out], minlength=10)
    assert counts.min() >= 80 and counts.max() <= 120, counts
    assert {u.speaker for u in held_out} == set(range(8))
    assert {u.speaker for u in train_600} == set(range(8))


def _mfcc_stats(utts: list[synth.Utterance]) -> np.ndarray:
    """[N, 26]: per-utterance mean and std of 13 MFCCs over the front-end's frames (25 ms / 20 ms).

    Computed on one zero-padded batch (fast), keeping only each utterance's own frames: with
    center=False, frame i depends on samples [320 i, 320 i + 400) only, so this equals the
    per-utterance MFCC exactly."""
    mfcc = torchaudio.transforms.MFCC(
        sample_rate=16000,
        n_mfcc=13,
        melkwargs={"n_fft": 400, "hop_length": 320, "center": False, "n_mels": 40},
    )
    wav = torch.zeros(len(utts), max(len(u.wav) for u in utts))
    for i, u in enumerate(utts):
        wav[i, : len(u.wav)] = torch.from_numpy(u.wav)
    with torch.no_grad():
        m = mfcc(wav)  # [N, 13, frames]
    feats = []
    for i, u in enumerate(utts):
        mi = m[i, :, : synth.num_frames(len(u.wav))]
        feats.append(torch.cat([mi.mean(1), mi.std(1)]).numpy())
    return np.stack(feats)


def test_mfcc_probe_is_learnable_but_not_trivial(
    train_600: list[synth.Utterance], held_out: list[synth.Utterance]
) -> None:
    """Utterance-level MFCC mean+std + logistic regression: clearly above chance (0.1), well short of
    perfect (order pairs and minimal pairs defeat a bag-of-frames statistic)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    test_300 = held_out[:300]
    x_tr, y_tr = _mfcc_stats(train_600), np.array([u.label for u in train_600])
    x_te, y_te = _mfcc_stats(test_300), np.array([u.label for u in test_300])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_tr, y_tr)
    acc = clf.score(x_te, y_te)
    assert 0.3 < acc < 0.9, acc
