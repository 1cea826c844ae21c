"""EEG data: recordings with channel names or coordinates -> shards -> padded, normalised batches; the
embedded presets ``eeg-synth`` (default) and ``eeg-synth-unseen-montage``.

Files ``mmssl data pack modality=eeg`` reads:

* ``.npz`` with arrays ``data`` [C, T], ``ch_names`` [C] (strings), ``sfreq`` (a scalar, Hz) and
  optionally ``pos`` [C, 3] (head-frame coordinates in any unit, used instead of the names);
* ``.edf``, ``.bdf``, ``.fif`` through MNE-Python, an optional extra (``pip install mmssl[eeg]``):
  EEG-typed channels that are not marked bad, in microvolts; digitised positions when the file has
  them for every channel, else the channel names;
* ``.npy`` is refused: a bare array has no channel names and no rate.

Names become unit-sphere coordinates here (montage.py: case-insensitive, old 10-20 aliases, reference
suffixes), never in the model; an unknown name is a ``BadSample`` naming it.

Batches (``collate``): ``eeg`` float32 [B, C, T] (C padded to the batch's largest montage, T to its
longest recording), ``eeg_pos`` [B, C, 3] (zeros for padding), ``eeg_chan_mask`` bool [B, C] (True =
a real channel), ``eeg_len`` int64 [B] (samples), ``eeg_rate`` float32 [B] (Hz, one rate per batch:
the highest among its items, the others resampled to it; the adapter resamples to the model's rate).

Normalisation, per recording, of the crop the model sees: each channel's median is removed, then the
whole recording is divided by one robust scale, the median over channels of each channel's
``1.4826 * MAD`` (a robust standard deviation; flat channels left out), and clipped to +-``CLIP``. One scale per recording,
not per channel, keeps the topography (which electrodes are stronger) that lateralised rhythms show
in; medians keep a flat or a wild channel from setting it. It happens in the data pipeline, on the
whole crop, so (as with per-utterance normalisation of speech, or an STFT's overlapping windows in
audio MAE) a hidden patch's content moves these two robust statistics, and through the collate's
resampling of lower-rate items a few edge samples of its neighbours, a little; it never reaches a
visible token otherwise. The adapter's own resampling to the model's rate works patch by patch, so it
adds nothing. Filtering is left to the user's preprocessing before packing."""
from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

from mmssl.data.pool import pooled
from mmssl.data.shards import BadSample, build_atomically, write_labelled_splits
from mmssl.modalities.eeg import montage
from mmssl.registry import PRESETS
from mmssl.types import Batch

#: clip of normalised signals, in robust standard deviations
CLIP = 15.0
#: suffixes read through MNE-Python
MNE_SUFFIXES = (".edf", ".bdf", ".fif")
INSTALL_HINT = "pip install mmssl[eeg]"


def _np_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _np_load(data: bytes, key: str, field: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise BadSample(f"unreadable: {key}: {field}: {type(e).__name__}: {e}") from None


def resample(x: torch.Tensor, orig: float, new: float) -> torch.Tensor:
    """[..., T] at ``orig`` Hz -> [..., T'] at ``new`` Hz (torchaudio's windowed-sinc resampler; rates
    that are not whole numbers are taken as exact fractions)."""
    if orig == new:
        return x
    a, b = Fraction(orig).limit_denominator(1000), Fraction(new).limit_denominator(1000)
    d = np.lcm(a.denominator, b.denominator)
    return torchaudio.functional.resample(x, int(a * d), int(b * d))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """One recording [C, T] -> channel medians removed, divided by the median over channels of
    1.4826 * MAD, clipped to +-CLIP (see the module docstring)."""
    x = x - x.median(dim=1, keepdim=True).values
    sd = 1.4826 * x.abs().median(dim=1).values
    sd = sd[sd > 1e-12]  # flat (dead) channels do not set the scale
    s = float(sd.median()) if sd.numel() else float(x.abs().max())
    if not np.isfinite(s) or s <= 1e-12:  # an all-flat recording: nothing to scale
        s = 1.0
    return (x / s).clamp_(-CLIP, CLIP)


#: rates a recording may claim (scalp EEG: 100 Hz to a few kHz; intracranial up to 30 kHz)
MIN_RATE, MAX_RATE = 1.0, 100_000.0


def check(data: np.ndarray, pos: np.ndarray, rate: float, name: str) -> None:
    if data.ndim != 2 or data.shape[0] < 1 or data.shape[1] < 1:
        raise BadSample(f"wrong_shape: {name}: data must be [channels, samples], got {data.shape}")
    if pos.shape != (data.shape[0], 3):
        raise BadSample(f"wrong_shape: {name}: {data.shape[0]} channels but coordinates {pos.shape}")
    if not np.isfinite(rate) or not MIN_RATE <= rate <= MAX_RATE:
        raise BadSample(f"bad_rate: {name}: sampling rate {rate} Hz outside [{MIN_RATE}, {MAX_RATE}]")
    if not np.isfinite(data).all():
        raise BadSample(f"non_finite: {name}: NaN or infinite samples")


def coordinates(names: list[str], pos: np.ndarray | None, name: str) -> np.ndarray:
    """Own coordinates (projected to the unit sphere) when given, else the names' table positions."""
    if pos is not None:
        try:
            return montage.project(pos)
        except ValueError as e:
            raise BadSample(f"bad_coordinates: {name}: {e}") from None
    try:
        return montage.positions(names)
    except montage.UnknownChannel as e:
        raise BadSample(f"unknown_channel: {name}: no 10-05 position for {e} (rename the channels, or give "
                        f"coordinates with the recording: pos [C, 3])") from None


def _item(data: np.ndarray, names: list[str], rate: float, pos: np.ndarray | None, name: str) -> dict[str, Any]:
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":  # strings, objects, complex numbers: no silent conversion
        raise BadSample(f"wrong_dtype: {name}: samples of dtype {data.dtype}, not real numbers")
    if data.dtype != np.float16:
        data = data.astype(np.float32)
    if data.ndim != 2:
        raise BadSample(f"wrong_shape: {name}: data must be [channels, samples], got {data.shape}")
    if len(names) != data.shape[0]:
        raise BadSample(f"wrong_shape: {name}: {data.shape[0]} channels but {len(names)} channel names")
    xyz = coordinates(names, pos, name)
    check(data, xyz, float(rate), name)
    return {"eeg": data, "eeg_pos": xyz, "eeg_rate": float(rate), "ch_names": [str(n) for n in names]}


def read_npz(path: str) -> dict[str, Any]:
    name = Path(path).name
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle, which is never loaded
        raise BadSample(f"unreadable: {name}: {e} (store ch_names as a string array, not objects)") from None
    except Exception as e:
        raise BadSample(f"unreadable: {name}: {type(e).__name__}: {e}") from None
    for k in ("data", "ch_names", "sfreq"):
        if k not in arrays:
            raise BadSample(f"missing_field: {name}: no array {k!r} (an .npz needs data [C, T], ch_names [C], "
                            f"sfreq; pos [C, 3] optional)")
    try:
        sfreq = np.asarray(arrays["sfreq"], dtype=np.float64)
    except (TypeError, ValueError):
        raise BadSample(f"bad_rate: {name}: sfreq is not a number ({arrays['sfreq']!r})") from None
    if sfreq.size != 1:
        raise BadSample(f"bad_rate: {name}: sfreq must be one number, got shape {sfreq.shape}")
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)  # an S-dtype array holds bytes
             for n in np.asarray(arrays["ch_names"]).reshape(-1).tolist()]
    pos = arrays.get("pos")
    return _item(arrays["data"], names, float(sfreq.reshape(())), None if pos is None else pos, name)


def read_mne(path: str) -> dict[str, Any]:
    """EDF, BDF or FIF through MNE-Python (imported here: an optional extra)."""
    name = Path(path).name
    try:
        import mne
    except ImportError:
        raise ImportError(f"reading {Path(path).suffix} files needs MNE-Python: {INSTALL_HINT}") from None
    try:
        suffix = Path(path).suffix.lower()
        if suffix == ".edf":
            raw = mne.io.read_raw_edf(path, preload=True, infer_types=True, verbose="error")
        elif suffix == ".bdf":
            raw = mne.io.read_raw_bdf(path, preload=True, infer_types=True, verbose="error")
        else:
            raw = mne.io.read_raw_fif(path, preload=True, verbose="error")
        picks = mne.pick_types(raw.info, eeg=True, exclude="bads")
        if len(picks) == 0:
            raise BadSample(f"no_eeg: {name}: no EEG channels (channel types: "
                            f"{sorted(set(raw.get_channel_types()))})")
        data = raw.get_data(picks=picks) * 1e6  # volts -> microvolts
        names = [raw.ch_names[i] for i in picks]
        locs = np.array([raw.info["chs"][i]["loc"][:3] for i in picks], dtype=np.float64)
        rate = float(raw.info["sfreq"])
    except BadSample:
        raise
    except Exception as e:  # MNE raises many types for damaged files
        raise BadSample(f"unreadable: {name}: {type(e).__name__}: {e}") from None
    has_pos = np.isfinite(locs).all() and (np.linalg.norm(locs, axis=1) > 1e-9).all()
    return _item(data, names, rate, locs if has_pos else None, name)


class EEGCodec:
    """Items hold ``eeg`` [C, T] (float32, or float16 as the presets store it), ``eeg_pos`` [C, 3],
    ``eeg_rate`` (Hz) and, from files, ``ch_names``. Batches: see the module docstring."""

    modality = "eeg"
    suffixes = (".npz", ".npy", *MNE_SUFFIXES)

    def read_file(self, path: str) -> dict[str, Any]:
        suffix = Path(path).suffix.lower()
        if suffix == ".npz":
            return read_npz(path)
        if suffix in MNE_SUFFIXES:
            return read_mne(path)
        if suffix == ".npy":
            raise BadSample(f"no_channel_names: {Path(path).name}: a bare .npy array has no channel names or "
                            f"rate; save an .npz with data [C, T], ch_names [C], sfreq (and optional pos [C, 3])")
        raise BadSample(f"unsupported_type: {Path(path).name}")

    def encode(self, item: dict[str, Any]) -> dict[str, Any]:
        data = np.asarray(item["eeg"])
        if data.dtype != np.float16:
            data = data.astype(np.float32)
        meta = {"rate": float(item["eeg_rate"]), "ch_names": list(item.get("ch_names") or [])}
        return {"eeg.npy": _np_bytes(data), "pos.npy": _np_bytes(np.asarray(item["eeg_pos"], dtype=np.float32)),
                "eeg.json": json.dumps(meta).encode()}

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = str(raw.get("__key__", "?"))
        if "eeg.npy" not in raw or "eeg.json" not in raw:
            raise BadSample(f"missing_field: {key}: needs eeg.npy and eeg.json")
        try:
            meta = json.loads(raw["eeg.json"])
            rate = float(meta["rate"])
        except Exception as e:
            raise BadSample(f"unreadable: {key}: eeg.json: {type(e).__name__}: {e}") from None
        data = _np_load(raw["eeg.npy"], key, "eeg.npy")
        pos = _np_load(raw["pos.npy"], key, "pos.npy") if "pos.npy" in raw else None
        names = [str(n) for n in meta.get("ch_names") or []]
        xyz = coordinates(names, pos, key) if pos is not None or names else None
        if xyz is None:
            raise BadSample(f"missing_field: {key}: neither coordinates nor channel names")
        check(data, xyz, rate, key)
        return {"eeg": torch.from_numpy(data.astype(np.float32)), "eeg_pos": torch.from_numpy(xyz),
                "eeg_rate": rate}

    def length(self, item: dict[str, Any]) -> int:
        """Channels x duration in ms: batches of similar montage size and length pad least."""
        C, T = item["eeg"].shape
        return int(C * round(1000.0 * T / float(item["eeg_rate"])))

    def collate(self, items: list[dict[str, Any]], max_len: int | None, generator: torch.Generator | None,
                keep_frame_labels: bool = True) -> Batch:
        """``max_len``: crop length in milliseconds (None: whole recordings). Longer recordings are cut
        at a random sample with ``generator`` (training), centred without (evaluation); then each is
        normalised (module docstring) and the batch padded."""
        rate = max(float(it["eeg_rate"]) for it in items)
        L = None if max_len is None else max(1, int(round(float(max_len) * rate / 1000.0)))
        sigs, poss = [], []
        for it in items:
            x = torch.as_tensor(it["eeg"]).float()
            x = resample(x, float(it["eeg_rate"]), rate)
            if L is not None and x.shape[1] > L:
                room = x.shape[1] - L
                off = int(torch.randint(room + 1, (1,), generator=generator)) if generator is not None else room // 2
                x = x[:, off:off + L]
            sigs.append(normalise(x))
            poss.append(torch.as_tensor(it["eeg_pos"]).float())
        B, C, T = len(items), max(s.shape[0] for s in sigs), max(s.shape[1] for s in sigs)
        eeg = torch.zeros(B, C, T)
        pos = torch.zeros(B, C, 3)
        chan = torch.zeros(B, C, dtype=torch.bool)
        for i, (s, p) in enumerate(zip(sigs, poss)):
            eeg[i, : s.shape[0], : s.shape[1]] = s
            pos[i, : s.shape[0]] = p
            chan[i, : s.shape[0]] = True
        return {"eeg": eeg, "eeg_pos": pos, "eeg_chan_mask": chan,
                "eeg_len": torch.tensor([s.shape[1] for s in sigs], dtype=torch.long),
                "eeg_rate": torch.full((B,), rate, dtype=torch.float32)}


# -- embedded presets ---------------------------------------------------------------------------------
class _SynthPreset:
    """Simulated EEG (modalities/eeg/synth.py) of one montage family, stored as float16."""

    modality = "eeg"
    version = 1
    name = ""
    family = ""

    def build(self, out: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> None:
        """``sizes``: split -> count, to build a smaller set (tests); default the generator's."""
        from mmssl.modalities.eeg import synth

        codec = EEGCodec()
        sizes = dict(sizes or (synth.UNSEEN_SPLITS if self.family == "unseen" else synth.SPLITS))
        meta: dict[str, Any] = {
            "name": self.name, "modality": "eeg", "generator_version": synth.GENERATOR_VERSION, "seed": seed,
            "classes": list(synth.CLASSES), "sample_rate": synth.RATE, "seconds": synth.SECONDS,
            "montage_family": self.family, "splits": {}, "bad_samples": {}}
        write_labelled_splits(out, sizes, lambda split, n: pooled(
            synth.generate, split, n, seed=seed, family=self.family,
            then=lambda r: (codec.encode({"eeg": r.data.astype(np.float16), "eeg_pos": montage.positions(r.ch_names),
                                          "eeg_rate": r.rate, "ch_names": r.ch_names}), r.label)), meta)

    def ensure(self, cache_dir: Path, seed: int = 0) -> Path:
        root = Path(cache_dir) / "data" / f"{self.name}-v{self.version}-seed{seed}"
        return build_atomically(root, lambda tmp: self.build(tmp, seed))


@PRESETS.register("eeg-synth")
class EEGSynthPreset(_SynthPreset):
    """Simulated EEG, 4 classes (rest, left / right mu desynchronisation, evoked response), montages
    of 19, 32 and 64 channels and random 10-10 subsets; 128 Hz, 2.5 s; train 4000 / val 500 / test 1000."""

    name = "eeg-synth"
    family = "train"


@PRESETS.register("eeg-synth-unseen-montage")
class EEGSynthUnseenPreset(_SynthPreset):
    """The same simulation on a 32-38 channel layout of 10-05 positions that ``eeg-synth`` never uses:
    probe a pretrained encoder on a montage it never saw. train 2000 / val 500 / test 1000."""

    name = "eeg-synth-unseen-montage"
    family = "unseen"
