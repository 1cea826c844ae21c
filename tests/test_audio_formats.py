"""`mmssl data pack` reads every audio container soundfile reads (wav, flac, ogg/vorbis, opus, mp3,
aiff) and every image format Pillow decodes, resampling audio to the adapter's 16 kHz; files it cannot
use stay counted by reason.

References: the expected audio is torchaudio's own resampling of what soundfile decodes from the
written file (the library's answer, not ours); lossy codecs are checked by their spectral peak, which a
missing or wrong resampling moves (22.05 kHz read as 16 kHz puts 440 Hz at 319 Hz)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from PIL import Image

from mmssl.cli import main
from mmssl.data.loader import iter_split, resolve_source
from mmssl.modalities.image.data import ImageCodec
from mmssl.modalities.image.formats import image_suffixes
from mmssl.modalities.speech.data import SpeechCodec
from mmssl.modalities.speech.formats import audio_suffixes

#: (suffix, soundfile format, subtype, rate, lossless); opus runs at 48 kHz, its native rate
AUDIO = [(".wav", "WAV", "PCM_16", 22050, True), (".flac", "FLAC", "PCM_16", 22050, True),
         (".aiff", "AIFF", "PCM_16", 22050, True), (".ogg", "OGG", "VORBIS", 22050, False),
         (".opus", "OGG", "OPUS", 48000, False), (".mp3", "MP3", "MPEG_LAYER_III", 22050, False)]
FREQ = 440.0


def _writable(fmt: str, subtype: str) -> bool:
    return fmt in sf.available_formats() and subtype in sf.available_subtypes(fmt)


WRITABLE = [a for a in AUDIO if _writable(a[1], a[2])]
MISSING = [a[0] for a in AUDIO if a not in WRITABLE]


def _tone(rate: int, seconds: float = 0.6) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * FREQ * t)).astype(np.float32)


def _peak_hz(w: np.ndarray, rate: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(w * np.hanning(w.size)))
    return float(np.fft.rfftfreq(w.size, 1 / rate)[spec.argmax()])


def test_soundfile_build_writes_every_container() -> None:
    """This soundfile build (libsndfile 1.2.2 in the pinned wheels) writes all six containers;
    MP3 needs libsndfile >= 1.1 and Opus >= 1.0.29: older builds fail here, naming what is missing."""
    assert not MISSING, f"libsndfile {sf.__libsndfile_version__} cannot write {MISSING}"


def test_codec_suffixes_cover_the_containers() -> None:
    sufs = SpeechCodec.suffixes
    assert sufs == audio_suffixes()
    for suf, fmt, subtype, _, _ in WRITABLE:  # what soundfile writes here it also reads here
        assert suf in sufs, (suf, fmt, subtype)


@pytest.mark.parametrize(("suf", "fmt", "subtype", "rate", "lossless"), WRITABLE, ids=[a[0] for a in WRITABLE])
def test_read_file_resamples_each_container(tmp_path: Path, suf: str, fmt: str, subtype: str, rate: int,
                                            lossless: bool) -> None:
    path = tmp_path / f"tone{suf}"
    sf.write(path, _tone(rate), rate, format=fmt, subtype=subtype)
    got = SpeechCodec().read_file(str(path))["speech"]
    decoded, sr = sf.read(path, dtype="float32")
    assert sr == rate
    ref = torchaudio.functional.resample(torch.from_numpy(decoded), sr, 16000).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)  # the same resampling torchaudio does
    assert abs(got.size - 0.6 * 16000) <= (0 if lossless else 2400)  # codec padding at most 150 ms
    assert abs(_peak_hz(got) - FREQ) < 5


def test_pack_every_container_counts_the_rest(tmp_path: Path, cache_dir: Path) -> None:
    src = tmp_path / "tree"
    for cls in ("low", "high"):
        (src / cls).mkdir(parents=True)
    for suf, fmt, subtype, rate, _ in WRITABLE:
        for cls, f in (("low", 1.0), ("high", 2.0)):
            tone = np.interp(np.arange(int(rate * 0.6)) * f % (rate * 0.6), np.arange(int(rate * 0.6)), _tone(rate))
            sf.write(src / cls / f"x{suf}", tone.astype(np.float32), rate, format=fmt, subtype=subtype)
    (src / "low" / "broken.mp3").write_bytes(b"ID3\x03\x00" + bytes(200))  # an mp3 without audio
    (src / "low" / "notes.txt").write_text("not audio")
    out = tmp_path / "packed"
    assert main(["data", "pack", "modality=speech", f"src={src}", f"out={out}", "val=0", "test=0", "shards=1"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["high", "low"]
    assert meta["bad_samples"] == {"unreadable": 1, "unsupported_type": 1}
    assert meta["splits"]["train"]["count"] == 2 * len(WRITABLE)
    source = resolve_source({"name": "shards", "path": str(out)}, ["speech"], None, cache_dir)
    peaks = {"high": [], "low": []}
    for b in iter_split(source, "train", batch_size=4, bad={}):
        for w, n, y in zip(b["speech"], b["speech_len"], b["label"].tolist(), strict=True):
            peaks[meta["classes"][y]].append(_peak_hz(w[:n].numpy()))
    assert all(abs(p - FREQ) < 5 for p in peaks["low"]) and len(peaks["low"]) == len(WRITABLE)
    assert all(abs(p - 2 * FREQ) < 5 for p in peaks["high"]) and len(peaks["high"]) == len(WRITABLE)


# ----------------------------------------------------------------------------------------------------
# Images: every format Pillow writes here is read back by `mmssl data pack`
# ----------------------------------------------------------------------------------------------------
#: Pillow save format -> (suffix, mode to save, exact); lossy or palette-reducing ones are compared loosely
IMAGES = {"PNG": (".png", "RGB", True), "JPEG": (".jpg", "RGB", False), "BMP": (".bmp", "RGB", True),
          "GIF": (".gif", "P", True), "WEBP": (".webp", "RGB", False), "TIFF": (".tiff", "RGB", True),
          "TGA": (".tga", "RGB", True), "PPM": (".ppm", "RGB", True), "PCX": (".pcx", "RGB", True),
          "SGI": (".sgi", "RGB", True), "QOI": (".qoi", "RGB", True),
          "DDS": (".dds", "RGB", True), "JPEG2000": (".jp2", "RGB", False), "AVIF": (".avif", "RGB", False),
          "XBM": (".xbm", "1", True), "MSP": (".msp", "1", True), "BLP": (".blp", "P", True)}
# (icon formats store several sizes and read back the largest; IM is deprecated in Pillow 13)


def _picture() -> np.ndarray:
    """[32, 32, 3] uint8 of eight flat colour blocks (few colours, so palette formats keep it exactly)."""
    cols = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
                     [255, 0, 255], [255, 255, 255]], np.uint8)
    idx = (np.arange(32)[:, None] // 16) * 4 + np.arange(32)[None] // 8
    return cols[idx]


def _write_images(root: Path) -> dict[str, np.ndarray]:
    """One file per Pillow format that can be written here -> the pixels it should read back as."""
    expect: dict[str, np.ndarray] = {}
    pic = Image.fromarray(_picture())
    for fmt, (suf, mode, _) in IMAGES.items():
        if fmt not in Image.SAVE:
            continue
        im = pic.convert("L").point(lambda v: 255 if v > 100 else 0).convert("1") if mode == "1" else pic
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=8) if mode == "P" else im
        path = root / f"{fmt.lower()}{suf}"
        try:
            im.save(path, format=fmt)
        except (OSError, ValueError, KeyError):  # an optional encoder missing from this Pillow build
            path.unlink(missing_ok=True)
            continue
        expect[path.name] = np.asarray(im.convert("RGB"))
    return expect


def test_image_suffixes_cover_what_pillow_writes(tmp_path: Path) -> None:
    expect = _write_images(tmp_path)
    assert {"png.png", "jpeg.jpg", "webp.webp", "tiff.tiff", "bmp.bmp", "gif.gif"} <= set(expect)
    for name in expect:
        assert Path(name).suffix in ImageCodec.suffixes, name
    assert ".pdf" not in ImageCodec.suffixes and ".h5" not in ImageCodec.suffixes  # written, never decoded
    assert ImageCodec.suffixes == image_suffixes()


def test_pack_every_image_format(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    expect = _write_images(src)
    (src / "broken.qoi").write_bytes(b"qoif" + bytes(10))
    (src / "scan.pdf").write_bytes(b"%PDF-1.4\n")
    codec = ImageCodec()
    for name, want in expect.items():
        got = codec.read_file(str(src / name))["image"].transpose(1, 2, 0)
        fmt = Path(name).stem.upper()
        exact = IMAGES[fmt][2]
        err = np.abs(got.astype(int) - want.astype(int))
        assert (err.max() == 0) if exact else (err.mean() < 12), (name, err.max(), err.mean())
    out = tmp_path / "packed"
    assert main(["data", "pack", "modality=image", f"src={src}", f"out={out}", "val=0", "test=0", "shards=1"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["count"] == len(expect)
    assert meta["bad_samples"] == {"unreadable": 1, "unsupported_type": 1}
