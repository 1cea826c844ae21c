"""The embedded paired presets (scene-captions: image + text, sound-captions: speech + text): each
caption states what the pixels or samples show (measured from the data alone, not from the
generator's internals), generation is deterministic, and the shards read back through the real
pipeline with both modalities, sid and label."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import mmssl.modalities.pairs  # noqa: F401  (registers the presets; the lead adds it to the built-ins)
from mmssl.data.loader import DataSource, iter_split
from mmssl.modalities.pairs import scenes, sounds
from mmssl.modalities.pairs.data import SceneCaptionsPreset, SoundCaptionsPreset
from mmssl.modalities.text.data import encode_text
from mmssl.registry import PRESETS

SR = sounds.SAMPLE_RATE
SMALL = {"train": 24, "val": 10, "test": 14}  # a small build: 8 train shards of 3 items


# --------------------------------------------------------------------------------------------------
# Measurements on the data alone.
# --------------------------------------------------------------------------------------------------
def _shape_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels of the main shape: the background is at most ~0.27 and the distractor blob ~0.36 in every
    channel (with noise), every named colour has a channel above 0.8."""
    return (pixels / 255.0).max(-1) > 0.5


def _event(w: np.ndarray) -> np.ndarray:
    """The sound event: the 20 ms frames whose peak exceeds 30% of the clip's peak, first to last."""
    n = len(w) // 320
    peak = np.abs(w[: n * 320].reshape(n, 320)).max(1)
    on = np.flatnonzero(peak > 0.3 * peak.max())
    return w[on[0] * 320:(on[-1] + 1) * 320]


def _power(x: np.ndarray, nfft: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    p = np.abs(np.fft.rfft(x * np.hanning(len(x)), nfft)) ** 2
    return np.fft.rfftfreq(nfft, 1 / SR), p


def _log_centroid(x: np.ndarray) -> float:
    """Power-weighted geometric mean frequency (80 Hz-7.5 kHz): the pitch of a tone, sweep or band."""
    f, p = _power(x)
    k = (f >= 80) & (f <= 7500)
    return float(2 ** (np.sum(p[k] * np.log2(f[k])) / p[k].sum()))


def _track(x: np.ndarray, win: int = 256, hop: int = 80) -> np.ndarray:
    """The strongest frequency of each 16 ms frame (hop 5 ms), zero-padded for fine resolution."""
    idx = np.arange(win)[None] + hop * np.arange((len(x) - win) // hop + 1)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(win), 8192, axis=1))
    return np.fft.rfftfreq(8192, 1 / SR)[spec.argmax(1)]


def _wobble_rate(x: np.ndarray) -> float:
    """The frequency (Hz) at which a warble's pitch track oscillates."""
    t = _track(x)[3:-3]
    spec = np.abs(np.fft.rfft((t - t.mean()) * np.hanning(len(t)), 4096))
    f = np.fft.rfftfreq(4096, 80 / SR)
    k = (f >= 2) & (f <= 25)
    return float(f[k][spec[k].argmax()])


def _click_onsets(x: np.ndarray) -> np.ndarray:
    """Sample indices where clicks start (peaks above 30% of the maximum, > 20 ms apart)."""
    on = np.flatnonzero(np.abs(x) > 0.3 * np.abs(x).max())
    return on[np.r_[True, np.diff(on) > 0.02 * SR]]


# --------------------------------------------------------------------------------------------------
# Generators.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gen", [scenes, sounds])
def test_generators_are_deterministic_prefixes_with_disjoint_splits(gen) -> None:
    def data(x):
        return x.pixels if gen is scenes else x.wav

    a = list(gen.generate("val", n=6, seed=3))
    b = list(gen.generate("val", n=3, seed=3))
    for x, y in zip(a[:3], b, strict=True):  # item i depends on (split, seed, i) only
        assert data(x).tobytes() == data(y).tobytes() and x.caption == y.caption and x.label == y.label
    assert data(a[0]).tobytes() != data(next(gen.generate("val", n=1, seed=4))).tobytes()
    assert data(a[0]).tobytes() != data(next(gen.generate("test", n=1, seed=3))).tobytes()
    assert gen.GENERATOR_VERSION == 1 and gen.SPLITS == {"train": 6000, "val": 500, "test": 1000}


@pytest.mark.parametrize(("gen", "lo", "hi"), [(scenes, 170, 180), (sounds, 32, 32)])
def test_balanced_labels_and_repeating_captions(gen, lo: int, hi: int) -> None:
    items = list(gen.generate("test", seed=0))
    counts = np.bincount([x.label for x in items], minlength=len(gen.CLASSES))
    assert counts.max() - counts.min() <= 1 and counts.sum() == 1000  # 1000 / 6 classes
    caps = Counter(x.caption for x in items)
    assert lo <= len(caps) <= hi and set(caps) <= set(gen.all_captions())
    assert len(gen.all_captions()) == len(set(gen.all_captions())) == hi
    assert max(caps.values()) > 1  # captions repeat: retrieval counts every identical caption as a hit
    for x in items[:50]:  # the label is the class the caption names ("rhythm of high clicks")
        assert set(gen.CLASSES[x.label].split()) <= set(x.caption.split())


def test_scene_captions_state_colour_size_position() -> None:
    palette = np.array(list(scenes.COLOURS.values()))
    pattern = re.compile(r"^a (small|large) (\w+) (\w+) (on the left|in the middle|on the right)$")
    for x in scenes.generate("test", n=300, seed=0):
        assert x.pixels.shape == (32, 32, 3) and x.pixels.dtype == np.uint8
        size, colour, shape, where = pattern.match(x.caption).groups()
        assert shape == scenes.CLASSES[x.label]
        m = _shape_mask(x.pixels)
        ys, xs = np.nonzero(m)
        # colour: the mean colour of the shape is nearest to the named prototype
        mean = x.pixels[m].mean(0) / 255.0
        assert list(scenes.COLOURS)[int(((palette - mean) ** 2).sum(1).argmin())] == colour, x.caption
        # size: the shape's extent (small radius <= 5.5 px, large >= 8 px)
        extent = max(np.ptp(xs), np.ptp(ys)) + 1
        assert (extent <= 12) if size == "small" else (extent >= 14), (x.caption, extent)
        # position: the shape's centre of mass in the named third
        cx = xs.mean() + 0.5
        expected = {"on the left": (0, 11), "in the middle": (13, 19), "on the right": (21, 32)}[where]
        assert expected[0] <= cx <= expected[1], (x.caption, cx)
        # the background outside the shape stays dark
        assert np.percentile(x.pixels[~m].max(-1), 90) < 0.25 * 255


def test_sound_captions_state_pitch_duration_direction_speed() -> None:
    seen = Counter()
    for x in sounds.generate("test", n=300, seed=0):
        a, w = x.attributes, x.wav.astype(np.float64)
        assert x.wav.dtype == np.float32 and 0.3 <= len(w) / SR <= 1.0 and np.abs(w).max() <= 1.0
        assert re.fullmatch(r"a (short|long) .+", x.caption) and a.pitch in x.caption.split()
        ev = _event(w)
        seen[a.kind] += 1
        if a.kind != "rhythm of clicks":  # a rhythm's first and last clicks do not span its duration
            dur = len(ev) / SR
            assert (dur <= 0.46) if a.duration == "short" else (dur >= 0.66), (x.caption, dur)
        if a.kind == "rhythm of clicks":
            f, p = _power(ev)
            peak = f[p.argmax()]
            assert (peak < 700) if a.pitch == "low" else (peak > 2400), (x.caption, peak)
            gaps = np.diff(_click_onsets(ev)) / SR
            assert len(gaps) >= 1, x.caption  # even a short slow rhythm holds two clicks
            gap = float(np.median(gaps))
            assert (gap > 0.11) if a.speed == "slow" else (gap < 0.07), (x.caption, gaps)
        else:
            c = _log_centroid(ev)
            assert (c < 500) if a.pitch == "low" else (c > 900), (x.caption, c)
        if a.kind.endswith("chirp"):  # the pitch track goes the named way, by about 1.3 octaves
            t = _track(ev, win=1024, hop=160)  # 64 ms windows: a low sweep starts near 140 Hz
            k = len(t) // 3
            trend = np.log2(t[-k:].mean() / t[:k].mean())
            assert (trend > 0.5) if a.kind == "rising chirp" else (trend < -0.5), (x.caption, trend)
        if a.kind == "warble":
            r = _wobble_rate(ev)
            assert (r < 7) if a.speed == "slow" else (r > 9), (x.caption, r)
    assert set(seen) == set(sounds.CLASSES)


# --------------------------------------------------------------------------------------------------
# Presets.
# --------------------------------------------------------------------------------------------------
def test_presets_are_registered_as_pairs() -> None:
    assert PRESETS.get("scene-captions") is SceneCaptionsPreset
    assert PRESETS.get("sound-captions") is SoundCaptionsPreset
    assert SceneCaptionsPreset.modalities == ("image", "text") and SceneCaptionsPreset.version == 1
    assert SoundCaptionsPreset.modalities == ("speech", "text") and SoundCaptionsPreset.version == 1


@pytest.mark.parametrize(("preset", "gen"), [(SceneCaptionsPreset, scenes), (SoundCaptionsPreset, sounds)])
def test_small_build_reads_back_with_both_modalities(preset, gen, tmp_path: Path) -> None:
    preset().build(tmp_path, seed=2, sizes=SMALL)
    meta = json.loads((tmp_path / "meta.json").read_text())
    m = list(preset.modalities)
    assert meta["modalities"] == m and "modality" not in meta
    assert meta["name"] == preset.name and meta["generator_version"] == 1 and meta["seed"] == 2
    assert meta["classes"] == list(gen.CLASSES) and all("{}" in p for p in meta["prompts"])
    assert meta["bad_samples"] == {}
    assert {s: v["count"] for s, v in meta["splits"].items()} == SMALL
    assert [len(meta["splits"][s]["shards"]) for s in ("train", "val", "test")] == [8, 2, 2]
    ref = {s: list(gen.generate(s, n, seed=2)) for s, n in SMALL.items()}
    assert meta["captions"] == {s: len({x.caption for x in v}) for s, v in ref.items()}

    src = DataSource(tmp_path, meta, m)
    bad: Counter = Counter()
    seen = set()
    for batch in iter_split(src, "test", batch_size=5, bad=bad):
        assert {m[0], "text", "text_len", "sample_id", "label"} <= set(batch)
        for j, sid in enumerate(batch["sample_id"].tolist()):
            x = ref["test"][sid]
            seen.add(sid)
            assert int(batch["label"][j]) == x.label
            n = int(batch["text_len"][j])
            assert torch.equal(batch["text"][j, :n], encode_text(x.caption))
            assert not batch["text"][j, n:].any()  # padding
            if m[0] == "image":  # PNG is lossless
                expected = torch.from_numpy(x.pixels).permute(2, 0, 1).float() / 255
                assert torch.equal(batch["image"][j], expected)
            else:  # FLAC at 16 bits
                L = int(batch["speech_len"][j])
                assert L == len(x.wav)
                assert np.abs(batch["speech"][j, :L].numpy() - x.wav).max() <= 1.01 / 32768
    assert seen == set(range(SMALL["test"])) and not bad


def test_ensure_builds_once_under_the_versioned_name(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = SceneCaptionsPreset.build

    def small(self, out: Path, seed: int = 0, sizes=None) -> None:
        calls.append(seed)
        real(self, out, seed, sizes=SMALL)

    monkeypatch.setattr(SceneCaptionsPreset, "build", small)
    root = SceneCaptionsPreset().ensure(tmp_path, seed=1)
    assert root == tmp_path / "data" / "scene-captions-v1-seed1" and (root / "meta.json").exists()
    assert SceneCaptionsPreset().ensure(tmp_path, seed=1) == root and calls == [1]
