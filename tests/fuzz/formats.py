"""Small valid source files for every ``mmssl data pack`` format, and the mutated copies the fuzz packs.

``cases(modality, rng)`` -> a list of ``Case``: the originals (which must pack), each original under
every generic byte mutator of ``mutations.BYTE_MUTATORS``, and the modality's targeted mutants (NaN /
Inf payloads, absurd header sizes, huge dimensions, wrong kinds), each with the outcomes it may have."""
from __future__ import annotations

import gzip
import io
import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import mutations as mu

#: outcomes: "packed", "skipped" (any reason) or "skipped:<reason>", "refused"; None: any of them
Expect = frozenset[str] | None
PACKED = frozenset({"packed"})
SKIPPED = frozenset({"skipped"})


def skipped(*reasons: str) -> frozenset[str]:
    return frozenset(f"skipped:{r}" for r in reasons)


@dataclass
class Case:
    """One item for the packer: ``files`` (path below the case's folder -> bytes; one entry for a
    file modality, a case folder's NIfTI files for MRI), made by ``mutation`` from ``origin``."""

    stem: str
    files: dict[str, bytes]
    mutation: str
    expect: Expect = None
    origin: str = ""
    note: str = field(default="", repr=False)


# -- valid files -------------------------------------------------------------------------------------
def _audio(rng: np.random.Generator, n: int, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / 16000.0
    w = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 600) * t) + 0.05 * rng.normal(size=n)
    w = w.astype(np.float32)
    return w if channels == 1 else np.stack([w, w[::-1]], 1)


def audio_bytes(wav: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wav, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _speech_originals(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    return [
        ("pcm16.wav", audio_bytes(_audio(rng, 1200), 16000, "WAV", "PCM_16")),
        ("float.wav", audio_bytes(_audio(rng, 900), 16000, "WAV", "FLOAT")),
        ("stereo22k.wav", audio_bytes(_audio(rng, 1400, 2), 22050, "WAV", "PCM_24")),
        ("mono8k.flac", audio_bytes(_audio(rng, 800), 8000, "FLAC", "PCM_16")),
        ("vorbis.ogg", audio_bytes(_audio(rng, 4000), 16000, "OGG", "VORBIS")),
    ]


def _speech_special(rng: np.random.Generator, orig: dict[str, bytes]) -> list[Case]:
    wav, flac, fw = orig["pcm16.wav"], orig["mono8k.flac"], _audio(rng, 900)
    out = [
        Case("nan.wav", {"nan.wav": audio_bytes(mu.with_nan(rng, fw), 16000, "WAV", "FLOAT")}, "nan_payload",
             skipped("non_finite")),
        Case("inf.wav", {"inf.wav": audio_bytes(mu.with_inf(rng, fw), 16000, "WAV", "FLOAT")}, "inf_payload",
             skipped("non_finite")),
        Case("nan64.wav", {"nan64.wav": audio_bytes(mu.all_nan(rng, fw).astype(np.float64), 16000, "WAV", "DOUBLE")},
             "nan_payload", skipped("non_finite")),
        Case("short.wav", {"short.wav": audio_bytes(fw[:100], 16000, "WAV", "FLOAT")}, "too_short", skipped("too_short")),
        Case("silent0.wav", {"silent0.wav": audio_bytes(np.zeros(0, np.float32), 16000, "WAV", "FLOAT")},
             "no_samples", SKIPPED),
    ]
    for fld, value in (("data_size", 0xFFFFFFF0), ("riff_size", 0xFFFFFFFF), ("channels", 65535), ("channels", 0),
                       ("rate", 0), ("rate", 0xFFFFFFFF), ("rate", 44101), ("rate", 1), ("bits", 0),
                       ("block_align", 0)):
        out.append(Case(f"hdr_{fld}_{value}.wav", {f"hdr_{fld}_{value}.wav": mu.wav_patch(wav, fld, value)},
                        f"absurd_header:{fld}={value}"))
    out += [
        Case("total_samples.flac", {"total_samples.flac": mu.flac_total_samples(flac)},
             "absurd_header:streaminfo_total=2^36-1", SKIPPED),
        Case("rate_channels.flac", {"rate_channels.flac": mu.flac_channels(flac, 8, 655350)},
             "absurd_header:streaminfo_rate_channels"),
    ]
    return out


def png_bytes(hwc: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image_originals(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return [
        ("rgb.png", png_bytes(rgb)),
        ("rgba.png", png_bytes(np.concatenate([rgb, rgb[..., :1]], 2))),
        ("photo.jpg", png_bytes(rgb, "JPEG", quality=90)),
        ("lossy.webp", png_bytes(rgb, "WEBP", quality=80)),
        ("grey.bmp", png_bytes(rgb[..., 0], "BMP")),
        ("deep.tif", png_bytes(rgb, "TIFF")),
    ]


def _image_special(rng: np.random.Generator, orig: dict[str, bytes]) -> list[Case]:
    png = orig["rgb.png"]
    f = rng.random((16, 16)).astype(np.float32)
    out = [Case(f"dims_{w}x{h}.png", {f"dims_{w}x{h}.png": mu.png_size(png, w, h)}, f"absurd_header:IHDR={w}x{h}",
                SKIPPED)
           for w, h in ((0x7FFFFFFF, 0x7FFFFFFF), (65535, 65535), (12000, 12000), (1, 10**8), (0, 16))]
    out += [
        # float greyscale TIFF: NaN pixels read as 0 (black), infinities saturate (see image/data.py to_rgb)
        Case("nan.tif", {"nan.tif": png_bytes(mu.with_nan(rng, f), "TIFF")}, "nan_payload", PACKED,
             note="documented: NaN pixels of a float image are black"),
        Case("inf.tif", {"inf.tif": png_bytes(mu.with_inf(rng, f), "TIFF")}, "inf_payload", PACKED,
             note="documented: infinite pixels of a float image saturate"),
        Case("allnan.tif", {"allnan.tif": png_bytes(mu.all_nan(rng, f), "TIFF")}, "nan_payload", PACKED),
        Case("text.png", {"text.png": b"this is not an image\n" * 4}, "wrong_kind", skipped("unreadable")),
    ]
    return out


def _jsonl(rows: list[object]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _text_originals(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    words = ["cats", "dogs", "rain", "maps", "stars", "bread", "ships", "songs"]

    def sentence() -> str:
        return " ".join(rng.choice(words, 6).tolist()) + "."

    return [
        ("doc1.txt", sentence().encode()),
        ("doc2.txt", ("\n".join(sentence() for _ in range(3)) + "\n").encode()),
        ("docs.jsonl", _jsonl([{"text": sentence()} for _ in range(4)])),
        ("unicode.txt", "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e r\u00e9sum\u00e9 \u2014 fine.\n".encode()),
    ]


def _text_special(rng: np.random.Generator, orig: dict[str, bytes]) -> list[Case]:
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    lines = {
        "deep_nesting": (deep, skipped("invalid_json")),
        "huge_int_label": (b'{"text": "a short line", "label": ' + b"9" * 30 + b"}", skipped("bad_label")),
        "giant_int_label": (b'{"text": "a short line", "label": 1' + b"0" * 5000 + b"}", skipped("bad_label")),
        "nan_text": (b'{"text": NaN}', skipped("missing_text")),
        "inf_label": (b'{"text": "a short line", "label": Infinity}', skipped("bad_label")),
        "lone_surrogate": (b'{"text": "broken \\ud800 text"}', skipped("undecodable")),
        "array_line": (b"[1, 2, 3]", skipped("invalid_json")),
        "number_line": (b"1e999999", skipped("invalid_json")),
        "nul_bytes": (b'{"text": "nul \\u0000 inside"}', None),
    }
    out = [Case(f"{k}.jsonl", {f"{k}.jsonl": v + b"\n"}, f"jsonl:{k}", e) for k, (v, e) in lines.items()]
    out += [
        Case("empty.jsonl", {"empty.jsonl": b""}, "zero_length", SKIPPED),
        Case("blank.jsonl", {"blank.jsonl": b"\n  \n\t\n"}, "blank_lines", SKIPPED),
        Case("latin1.txt", {"latin1.txt": "caf\u00e9 au lait".encode("latin-1")}, "not_utf8", skipped("undecodable")),
        Case("spaces.txt", {"spaces.txt": b" \n\t \n"}, "whitespace_only", skipped("empty_text")),
        Case("bom.txt", {"bom.txt": b"\xef\xbb\xbfa text after a byte order mark"}, "bom", PACKED),
        Case("nul.txt", {"nul.txt": b"\x00" * 64}, "nul_bytes"),
        Case("random.txt", {"random.txt": rng.integers(0, 256, 512, dtype=np.uint8).tobytes()}, "random_bytes"),
    ]
    return out


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=a.dtype.hasobject)
    return buf.getvalue()


def _ply(xyz: np.ndarray, fmt: str) -> bytes:
    head = (f"ply\nformat {fmt} 1.0\ncomment fuzz\nelement vertex {len(xyz)}\nproperty float x\nproperty float y\n"
            f"property float z\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n").encode()
    if fmt == "ascii":
        return head + "".join(f"{x} {y} {z}\n" for x, y, z in xyz.tolist()).encode()
    return head + xyz.astype("<f4" if fmt == "binary_little_endian" else ">f4").tobytes()


def _off(v: np.ndarray, faces: list[list[int]]) -> bytes:
    lines = ["OFF", f"{len(v)} {len(faces)} 0", *(" ".join(f"{c:.5f}" for c in p) for p in v.tolist()),
             *(" ".join(map(str, [len(f), *f])) for f in faces)]
    return ("\n".join(lines) + "\n").encode()


def _point_originals(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    xyz = rng.normal(size=(32, 3)).astype(np.float32)
    cube = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float)
    faces = [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 5, 4], [2, 3, 7, 6], [1, 2, 6, 5], [0, 3, 7, 4]]
    return [
        ("cloud.npy", npy_bytes(xyz)),
        ("normals.npy", npy_bytes(np.concatenate([xyz, xyz], 1).astype(np.float64))),
        ("ascii.ply", _ply(xyz[:16], "ascii")),
        ("binle.ply", _ply(xyz, "binary_little_endian")),
        ("binbe.ply", _ply(xyz, "binary_big_endian")),
        ("cube.off", _off(cube, faces)),
    ]


def _point_special(rng: np.random.Generator, orig: dict[str, bytes]) -> list[Case]:
    xyz = rng.normal(size=(32, 3)).astype(np.float32)
    ply_head = b"ply\nformat binary_little_endian 1.0\nelement vertex %d\nproperty float x\nproperty float y\n" \
               b"property float z\nend_header\n"
    out = [
        Case("nan.npy", {"nan.npy": npy_bytes(mu.with_nan(rng, xyz))}, "nan_payload", skipped("non_finite")),
        Case("inf.npy", {"inf.npy": npy_bytes(mu.with_inf(rng, xyz))}, "inf_payload", skipped("non_finite")),
        Case("nan.ply", {"nan.ply": _ply(mu.with_nan(rng, xyz), "binary_little_endian")}, "nan_payload",
             skipped("non_finite")),
        Case("inf.off", {"inf.off": b"OFF\n3 0 0\n0 0 0\ninf 1 1\n1 2 nan\n"}, "inf_payload", skipped("non_finite")),
        Case("overflow.off", {"overflow.off": b"OFF\n3 1 0\n0 0 0\n1e300 0 0\n0 1e300 0\n3 0 1 2\n"}, "absurd_values",
             skipped("non_finite")),
        Case("huge_dims.npy", {"huge_dims.npy": mu.npy_header_only((1, mu.HUGE))}, "huge_dims:(1,1e9)", SKIPPED),
        Case("huge_rows.npy", {"huge_rows.npy": mu.npy_header_only((mu.HUGE, 3), "<f4")}, "huge_dims:(1e9,3)",
             SKIPPED),
        Case("huge_cols.npy", {"huge_cols.npy": mu.npy_header_only((4, 2**62), "<f8")}, "huge_dims:(4,2^62)",
             SKIPPED),
        Case("objects.npy", {"objects.npy": npy_bytes(np.array([None, 1], dtype=object))}, "pickled_objects",
             skipped("unreadable")),
        Case("flat.npy", {"flat.npy": npy_bytes(xyz[:, :2])}, "wrong_shape", skipped("wrong_shape")),
        Case("none.npy", {"none.npy": npy_bytes(np.zeros((0, 3), np.float32))}, "empty_array", skipped("empty")),
        Case("strings.npy", {"strings.npy": npy_bytes(np.array([["a", "b", "c"]]))}, "wrong_dtype",
             skipped("wrong_shape")),
        Case("huge_count.ply", {"huge_count.ply": ply_head % 999_999_999_999 + xyz.tobytes()}, "absurd_header:vertices",
             SKIPPED),
        Case("ascii_huge.ply", {"ascii_huge.ply": ply_head.replace(b"binary_little_endian", b"ascii")
                                % 10**12 + b"0 0 0\n"}, "absurd_header:vertices", SKIPPED),
        Case("face_first.ply", {"face_first.ply": b"ply\nformat binary_little_endian 1.0\nelement face 10000000000000\n"
                                b"property int a\n" + (ply_head % 2).split(b"\n", 2)[2] + xyz[:2].tobytes()},
             "absurd_header:faces_before_vertices", SKIPPED),
        Case("huge.off", {"huge.off": b"OFF\n1000000000000 0 0\n0 0 0\n"}, "absurd_header:vertices", SKIPPED),
        Case("huge_face.off", {"huge_face.off": b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n1000000000 0 1 2\n"},
             "absurd_header:face_size", SKIPPED),
    ]
    return out


# -- EEG: .npz, EDF (written here, byte by byte), FIF (through MNE) -----------------------------------
EEG_NAMES = ["Fz", "Cz", "Pz", "Oz"]


def npz_bytes(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npz_raw(members: dict[str, bytes]) -> bytes:
    """An .npz built member by member (``name.npy`` -> its raw bytes), e.g. with a header-only member."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    return buf.getvalue()


def edf_bytes(uv: np.ndarray, rate: int, names: list[str]) -> bytes:
    """A plain EDF (one-second records, int16, +-3200 uV) of ``uv`` [C, T]."""
    C, T = uv.shape
    n_rec = T // rate
    head = ("0".ljust(8) + "X X X X".ljust(80) + "Startdate 01-JAN-2001 X X X".ljust(80) + "01.01.01" + "00.00.00"
            + str(256 * (C + 1)).ljust(8) + "".ljust(44) + str(n_rec).ljust(8) + "1".ljust(8) + str(C).ljust(4))
    fields = [([f"EEG {n}" for n in names], 16), (["AgAgCl electrode"] * C, 80), (["uV"] * C, 8), (["-3200"] * C, 8),
              (["3200"] * C, 8), (["-32768"] * C, 8), (["32767"] * C, 8), ([""] * C, 80), ([str(rate)] * C, 8),
              ([""] * C, 32)]
    head += "".join(v.ljust(n)[:n] for vals, n in fields for v in vals)
    dig = np.clip(np.round(uv / 3200.0 * 32767), -32768, 32767).astype("<i2")
    body = b"".join(dig[c, r * rate:(r + 1) * rate].tobytes() for r in range(n_rec) for c in range(C))
    return head.encode("ascii") + body


def fif_bytes(uv: np.ndarray, rate: float, names: list[str]) -> bytes:
    import tempfile

    import mne

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "rec_raw.fif"
        mne.io.RawArray(uv * 1e-6, mne.create_info(names, rate, "eeg"), verbose="error").save(p, verbose="error")
        return p.read_bytes()


def _eeg_originals(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    x = rng.normal(0, 20, (4, 256))
    return [
        ("rec.npz", npz_bytes(data=x, ch_names=np.array(EEG_NAMES), sfreq=128.0)),
        ("pos.npz", npz_bytes(data=x[:3].astype(np.float32), ch_names=np.array(["A", "B", "C"]), sfreq=100.0,
                              pos=np.array([[0, 0, 0.1], [0.08, 0, 0], [0, -0.09, 0]]))),
        ("rec.edf", edf_bytes(x, 128, EEG_NAMES)),
        ("rec_raw.fif", fif_bytes(x[:, :200], 100.0, EEG_NAMES)),
    ]


def _eeg_special(rng: np.random.Generator, orig: dict[str, bytes]) -> list[Case]:
    x = rng.normal(0, 20, (4, 256))
    names = np.array(EEG_NAMES)
    hdr = mu.npy_header_only((4, mu.HUGE))

    def npz(stem: str, mutation: str, expect: Expect, **arrays: object) -> Case:
        return Case(f"{stem}.npz", {f"{stem}.npz": npz_bytes(**arrays)}, mutation, expect)

    edf = orig["rec.edf"]
    out = [
        npz("nan", "nan_payload", skipped("non_finite"), data=mu.with_nan(rng, x), ch_names=names, sfreq=128.0),
        npz("inf", "inf_payload", skipped("non_finite"), data=mu.with_inf(rng, x), ch_names=names, sfreq=128.0),
        npz("nan16", "nan_payload", skipped("non_finite"), data=mu.with_nan(rng, x).astype(np.float16), ch_names=names,
            sfreq=128.0),
        npz("rate0", "bad_rate", skipped("bad_rate"), data=x, ch_names=names, sfreq=0.0),
        npz("ratenan", "bad_rate", skipped("bad_rate"), data=x, ch_names=names, sfreq=np.nan),
        npz("ratehuge", "absurd_rate", skipped("bad_rate"), data=x, ch_names=names, sfreq=1e300),
        npz("ratetiny", "absurd_rate", skipped("bad_rate"), data=x, ch_names=names, sfreq=1e-300),
        npz("ratestr", "bad_rate", skipped("bad_rate"), data=x, ch_names=names, sfreq="fast"),
        npz("posnan", "nan_payload:pos", skipped("bad_coordinates"), data=x[:3], ch_names=np.array(["A", "B", "C"]),
            sfreq=128.0, pos=np.array([[0, 0, np.nan], [1, 0, 0], [0, 1, 0]])),
        npz("complex", "wrong_dtype", skipped("wrong_dtype"), data=x.astype(np.complex64), ch_names=names,
            sfreq=128.0),
        npz("cube", "wrong_shape", skipped("wrong_shape"), data=x[None], ch_names=names, sfreq=128.0),
        npz("nodata", "missing_field", skipped("missing_field"), ch_names=names, sfreq=128.0),
        npz("fewnames", "wrong_shape", skipped("wrong_shape"), data=x, ch_names=names[:2], sfreq=128.0),
        npz("nosamples", "empty_array", skipped("wrong_shape"), data=x[:, :0], ch_names=names, sfreq=128.0),
        Case("objects.npz", {"objects.npz": npz_bytes(data=x, ch_names=np.array(EEG_NAMES, dtype=object),
                                                      sfreq=128.0)}, "pickled_objects", skipped("unreadable")),
        Case("huge_dims.npz", {"huge_dims.npz": npz_raw({"data.npy": hdr, "ch_names.npy": npy_bytes(names),
                                                         "sfreq.npy": npy_bytes(np.array(128.0))})},
             "huge_dims:(4,1e9)", SKIPPED),
        Case("bare.npy", {"bare.npy": npy_bytes(x)}, "wrong_kind", skipped("no_channel_names")),
        Case("nan_cal.edf", {"nan_cal.edf": edf.replace(b"3200    ", b"nan     ", 4)}, "nan_payload:calibration",
             SKIPPED),
        Case("flat_cal.edf", {"flat_cal.edf": edf.replace(b"32767   ", b"-32768  ")}, "absurd_header:dig_range"),
    ]
    for k, v in (("n_records", 99_999_999), ("n_records", -5), ("samples", 99_999_999), ("samples", 0),
                 ("n_signals", 9999), ("duration", "0"), ("duration", "1e300"), ("header_bytes", 99_999_999)):
        out.append(Case(f"hdr_{k}_{v}.edf", {f"hdr_{k}_{v}.edf": mu.edf_patch(edf, **{k: v})},
                        # MNE recovers a wrong record count from the file size and reads the same samples
                        f"absurd_header:{k}={v}", SKIPPED if k not in ("duration", "n_records") else None))
    return out


# -- MRI: case folders of NIfTI files ------------------------------------------------------------------
def nifti_bytes(vol: np.ndarray, gz: bool = True, affine: np.ndarray | None = None) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(vol, dtype=np.float32), np.eye(4) if affine is None else affine)
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def _head(rng: np.random.Generator, n: int = 10) -> np.ndarray:
    z, y, x = np.mgrid[:n, :n, :n]
    inside = ((z - n / 2) ** 2 + (y - n / 2) ** 2 + (x - n / 2) ** 2) < (n / 2.5) ** 2
    return np.where(inside, 100 + 10 * rng.normal(size=inside.shape), 0).astype(np.float32)


def _mri_originals(rng: np.random.Generator) -> list[tuple[str, dict[str, bytes]]]:
    return [
        ("gz", {"t1.nii.gz": nifti_bytes(_head(rng)), "t2.nii.gz": nifti_bytes(_head(rng))}),
        ("raw", {"T1ce.nii": nifti_bytes(_head(rng), gz=False), "FLAIR.nii": nifti_bytes(_head(rng), gz=False)}),
    ]


def _mri_special(rng: np.random.Generator, orig: dict[str, dict[str, bytes]]) -> list[Case]:
    good, raw = orig["gz"]["t2.nii.gz"], orig["raw"]["FLAIR.nii"]
    v = _head(rng)

    def case(stem: str, t1: bytes, mutation: str, expect: Expect = None, name: str = "t1.nii.gz") -> Case:
        return Case(stem, {name: t1, "t2.nii.gz": good}, mutation, expect)

    out = [
        case("nan", nifti_bytes(mu.with_nan(rng, v)), "nan_payload", PACKED),  # documented: NaN is background
        case("allnan", nifti_bytes(mu.all_nan(rng, v)), "nan_payload", PACKED),  # t2 still has a head
        case("inf", nifti_bytes(mu.with_inf(rng, v)), "inf_payload", skipped("non_finite")),
        # NIfTI: a slope of 0 or a non-finite one means "no scaling" (nibabel reads the raw voxels)
        case("slope_inf", mu.nifti_patch(good, scl_slope=np.inf), "inf_payload:scl_slope", PACKED),
        case("slope_nan", mu.nifti_patch(good, scl_slope=np.nan), "nan_payload:scl_slope"),
        case("slope_huge", mu.nifti_patch(good, scl_slope=3e38), "absurd_values:scl_slope", skipped("non_finite")),
        case("4d", nifti_bytes(np.stack([v, v], -1)), "wrong_shape", skipped("not_3d")),
        case("other_grid", nifti_bytes(v[:6]), "shape_mismatch", skipped("shape_mismatch")),
        case("empty_file", b"", "zero_length", skipped("unreadable")),
        Case("onlyseg", {"seg.nii.gz": good}, "no_contrast", skipped("no_contrast")),
    ]
    for stem, fields in (
            ("dims_gz_huge", {"dim": (3, 32767, 32767, 32767, 1, 1, 1, 1)}),
            ("dims_gz_2g", {"dim": (3, 2048, 2048, 512, 1, 1, 1, 1)}),
            ("dims_negative", {"dim": (3, -10, 10, 10, 1, 1, 1, 1)}),
            ("dims_zero", {"dim": (3, 0, 10, 10, 1, 1, 1, 1)}),
            ("dims_rank9", {"dim": (9, 10, 10, 10, 1, 1, 1, 1)}),
            ("pixdim_zero", {"pixdim": (1, 0, 0, 0, 1, 1, 1, 1)}),
            ("pixdim_nan", {"pixdim": (1, np.nan, 1, 1, 1, 1, 1, 1)}),
            ("pixdim_inf", {"pixdim": (1, np.inf, 1e38, 1, 1, 1, 1, 1)}),
            ("datatype_odd", {"datatype": 2304, "bitpix": 32}),
            ("datatype_junk", {"datatype": 12345}),
            ("vox_offset_huge", {"vox_offset": 1e20})):
        expect = None if stem.startswith("pixdim") or stem == "datatype_odd" else SKIPPED
        out.append(case(stem, mu.nifti_patch(good, **fields), f"absurd_header:{stem}", expect))
    out.append(Case("dims_raw_huge", {"T1ce.nii": mu.nifti_patch(raw, dim=(3, 32767, 32767, 32767, 1, 1, 1, 1)),
                                      "FLAIR.nii": raw}, "absurd_header:dims_raw_huge", SKIPPED))
    return out


# -- assembling the cases ------------------------------------------------------------------------------
ORIGINALS = {"speech": _speech_originals, "image": _image_originals, "text": _text_originals,
             "point": _point_originals, "eeg": _eeg_originals, "mri": _mri_originals}
SPECIALS = {"speech": _speech_special, "image": _image_special, "text": _text_special,
            "point": _point_special, "eeg": _eeg_special, "mri": _mri_special}


def _split(name: str) -> tuple[str, str]:
    """``a.nii.gz`` -> (``a``, ``.nii.gz``)."""
    low = name.lower()
    for suf in (".nii.gz",):
        if low.endswith(suf):
            return name[: -len(suf)], name[-len(suf):]
    p = Path(name)
    return p.stem, p.suffix


def cases(modality: str, rng: np.random.Generator, mutators: tuple[str, ...] | None = None) -> list[Case]:
    """Originals (expected to pack), every original under each generic mutator, and the targeted mutants.
    For MRI a mutator hits one NIfTI file of the case (chosen by ``rng``)."""
    originals = ORIGINALS[modality](rng)
    out: list[Case] = []
    as_files: dict[str, object] = {}
    for name, data in originals:
        files = data if isinstance(data, dict) else {name: data}
        as_files[name] = data
        out.append(Case(_split(name)[0] if modality == "mri" else name, dict(files), "original", PACKED, name))
    for m in mutators or tuple(mu.BYTE_MUTATORS):
        for name, data in originals:
            files = dict(data) if isinstance(data, dict) else {name: data}
            target = sorted(files)[int(rng.integers(0, len(files)))]
            files[target] = mu.BYTE_MUTATORS[m](rng, files[target])
            stem, suf = _split(name)
            if modality == "mri":
                out.append(Case(f"{stem}_{m}", files, m, None, f"{name}/{target}"))
            else:  # the mutated file keeps its name's suffix (the packer picks files by suffix)
                new = f"{stem}_{m}{suf}"
                out.append(Case(new, {new: files[target]}, m, None, name))
    out += SPECIALS[modality](rng, as_files)  # type: ignore[arg-type]
    return out


def struct_unused() -> None:  # pragma: no cover - keeps the struct import for header patchers in tests
    struct.calcsize("<I")
