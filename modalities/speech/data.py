"""Speech data: FLAC in shards, decoding with soundfile, resampling to 16 kHz, padded batches with
frame-aligned random crops; the embedded synthetic preset."""
from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

from mmssl.data.pool import pooled
from mmssl.data.shards import BadSample, build_atomically, write_split
from mmssl.modalities.speech.features import HOP, SAMPLE_RATE, WIN, num_frames
from mmssl.modalities.speech.formats import audio_suffixes
from mmssl.registry import PRESETS
from mmssl.types import Batch

MIN_SAMPLES = WIN  # one frame


#: sampling rates a recording may claim; outside them the header is wrong (a bit flip, a bad writer)
MIN_RATE, MAX_RATE = 1000, 768000
#: largest reduced rate ratio resampled exactly; torchaudio's sinc kernel has one phase per unit of
#: the reduced source rate, so 44101 -> 16000 (coprime) would allocate gigabytes
MAX_RATIO_TERM = 1000


def to_mono_16k(wav: np.ndarray, sr: int, name: str = "") -> np.ndarray:
    """[T] or [T, C] at ``sr`` -> [T'] float32 mono at 16 kHz (torchaudio's sinc resampler).
    An odd rate is resampled through the nearest ratio with terms <= ``MAX_RATIO_TERM`` (a pitch
    error under 1e-6); a rate outside [MIN_RATE, MAX_RATE] or audio shorter than a frame is a BadSample."""
    if not MIN_RATE <= sr <= MAX_RATE:
        raise BadSample(f"bad_rate: {name}: sampling rate {sr} Hz outside [{MIN_RATE}, {MAX_RATE}]")
    if wav.ndim == 2:
        wav = wav.mean(1)
    if wav.size < MIN_SAMPLES:
        raise BadSample(f"too_short: {name}: {wav.size} samples < {MIN_SAMPLES} (one 25 ms frame)")
    wav = wav.astype(np.float32)
    if sr != SAMPLE_RATE:
        ratio = Fraction(SAMPLE_RATE, sr).limit_denominator(MAX_RATIO_TERM)
        wav = torchaudio.functional.resample(torch.from_numpy(wav), ratio.denominator, ratio.numerator).numpy()
    return wav


class SpeechCodec:
    modality = "speech"
    suffixes = audio_suffixes()  # every container soundfile reads here (wav, flac, ogg, opus, mp3, aiff, ...)

    def read_file(self, path: str) -> dict[str, Any]:
        try:
            wav, sr = sf.read(path, dtype="float32", always_2d=False)
        except Exception as e:  # soundfile raises several types for broken files
            raise BadSample(f"unreadable: {Path(path).name}: {e}") from None
        return self._check({"speech": to_mono_16k(np.asarray(wav), sr, Path(path).name)}, Path(path).name)

    def _check(self, item: dict[str, Any], name: str) -> dict[str, Any]:
        w = item["speech"]
        if w.ndim != 1:
            raise BadSample(f"wrong_shape: {name}: expected mono audio, got shape {w.shape}")
        if w.size < MIN_SAMPLES:
            raise BadSample(f"too_short: {name}: {w.size} samples < {MIN_SAMPLES} (one 25 ms frame)")
        if not np.isfinite(w).all():
            raise BadSample(f"non_finite: {name}")
        return item

    def encode(self, item: dict[str, Any]) -> dict[str, Any]:
        buf = io.BytesIO()
        sf.write(buf, np.clip(item["speech"], -1, 1), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        out: dict[str, Any] = {"flac": buf.getvalue()}
        if item.get("frame_label") is not None:
            b = io.BytesIO()
            np.save(b, np.asarray(item["frame_label"], dtype=np.int16))
            out["phones.npy"] = b.getvalue()
        return out

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = raw.get("__key__", "?")
        audio = next((raw[k] for k in ("flac", "wav", "ogg") if k in raw), None)
        if audio is None:
            raise BadSample(f"missing_field: {key}: no audio field")
        try:
            wav, sr = sf.read(io.BytesIO(audio), dtype="float32", always_2d=False)
        except Exception as e:
            raise BadSample(f"unreadable: {key}: {e}") from None
        item = self._check({"speech": to_mono_16k(np.asarray(wav), sr, key)}, key)
        out: dict[str, Any] = {"speech": torch.from_numpy(item["speech"])}
        if "phones.npy" in raw:
            fl = np.load(io.BytesIO(raw["phones.npy"]), allow_pickle=False)
            if fl.shape[0] != num_frames(out["speech"].numel()):
                raise BadSample(f"misaligned_labels: {key}")
            out["frame_label"] = torch.from_numpy(fl.astype(np.int64))
        return out

    def length(self, item: dict[str, Any]) -> int:
        return int(item["speech"].numel())

    def collate(self, items: list[dict[str, Any]], max_len: int | None, generator: torch.Generator | None,
                keep_frame_labels: bool = True) -> Batch:
        """Pads to the longest item; items longer than ``max_len`` are cropped at a random multiple of
        the 320-sample hop (without a generator, evaluation: the centred one, so reading a split never
        draws from the global random stream), recorded in ``speech_offset`` so frame targets stay aligned."""
        lens, offs, wavs = [], [], []
        for it in items:
            w = it["speech"]
            off = 0
            if max_len is not None and w.numel() > max_len:
                room = (w.numel() - max_len) // HOP
                off = (int(torch.randint(room + 1, (1,), generator=generator)) if generator is not None
                       else room // 2) * HOP
                w = w[off: off + max_len]
            wavs.append(w)
            lens.append(w.numel())
            offs.append(off)
        T = max(lens)
        # one zero-filled batch, each crop copied in: padding every item and then stacking the padded
        # copies moved each sample twice (measured 5x slower for 8 x 10 s; bench/loader.py)
        speech = torch.zeros(len(wavs), T, dtype=wavs[0].dtype)
        for i, w in enumerate(wavs):
            speech[i, :w.numel()] = w
        batch: Batch = {
            "speech": speech,
            "speech_len": torch.tensor(lens, dtype=torch.long),
            "speech_offset": torch.tensor(offs, dtype=torch.long),
        }
        if keep_frame_labels and all("frame_label" in it for it in items) and not any(offs):
            N = num_frames(T)
            batch["frame_label"] = torch.stack(
                [torch.nn.functional.pad(it["frame_label"], (0, N - it["frame_label"].numel()), value=-1)
                 for it in items])
        return batch


@PRESETS.register("speech-synth")
class SpeechSynthPreset:
    """Synthetic spoken words (formant synthesis, 8 speakers, noise); labels = words; frame-level phone
    labels ride along for PNMI. Generated on first use; generator version frozen once shipped."""

    modality = "speech"
    version = 1

    def build(self, out: Path, seed: int = 0) -> None:
        from mmssl.modalities.speech import synth

        codec = SpeechCodec()
        meta: dict[str, Any] = {"name": "speech-synth", "modality": "speech", "generator_version": synth.GENERATOR_VERSION,
                                "seed": seed, "classes": list(synth.WORDS), "phones": list(synth.PHONES),
                                "sample_rate": SAMPLE_RATE, "splits": {}, "bad_samples": {}}
        for split, n in synth.SPLITS.items():
            def samples(split: str = split, n: int = n) -> Any:
                for i, (s, label) in enumerate(pooled(
                        synth.generate, split, n, seed=seed,
                        then=lambda u: (codec.encode({"speech": u.wav, "frame_label": u.frame_labels}), u.label))):
                    s.update({"__key__": f"{i:08d}", "cls": str(int(label)).encode(), "sid": str(i).encode()})
                    yield s

            shards = write_split(samples(), out / split, num_shards=8 if split == "train" else 2)
            meta["splits"][split] = {"shards": shards, "count": n}
        (out / "meta.json").write_text(json.dumps(meta, indent=2))

    def ensure(self, cache_dir: Path, seed: int = 0) -> Path:
        root = Path(cache_dir) / "data" / f"speech-synth-v{self.version}-seed{seed}"
        return build_atomically(root, lambda tmp: self.build(tmp, seed))
