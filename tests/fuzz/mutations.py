"""Seeded mutators for the fuzz suite: generic ones over bytes and arrays, and format-aware header
patchers that make a file claim absurd sizes (a WAV, FLAC, PNG, NIfTI, NPY, EDF, PLY or OFF header
announcing gigabytes that are not there).

Every mutator takes a ``numpy.random.Generator`` first (so a run is a function of its seed) and
returns new bytes; none touches its input."""
from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Callable

import numpy as np

#: an absurd element count: 8 GB of float64, far above what a test may allocate (see harness.bounded)
HUGE = 10**9


# -- generic byte mutators ---------------------------------------------------------------------------
def truncate(rng: np.random.Generator, data: bytes) -> bytes:
    """Cut at a random point (never the whole file; an empty file is ``zero_length``)."""
    return data[: int(rng.integers(1, max(len(data), 2)))]


def truncate_header(rng: np.random.Generator, data: bytes) -> bytes:
    """Cut inside the first 64 bytes: a header that ends early."""
    return data[: int(rng.integers(1, min(len(data), 64) + 1))]


def flip_bits(rng: np.random.Generator, data: bytes, n: int | None = None) -> bytes:
    """Flip ``n`` (1-16) random bits anywhere in the file."""
    if not data:
        return data
    out = bytearray(data)
    for pos in rng.integers(0, len(out) * 8, int(n or rng.integers(1, 17))):
        out[int(pos) // 8] ^= 1 << (int(pos) % 8)
    return bytes(out)


def flip_header_bits(rng: np.random.Generator, data: bytes) -> bytes:
    """Flip 1-4 bits among the first 128 bytes, where sizes, counts and types live."""
    out = bytearray(data)
    for pos in rng.integers(0, min(len(out), 128) * 8, int(rng.integers(1, 5))):
        out[int(pos) // 8] ^= 1 << (int(pos) % 8)
    return bytes(out)


def wrong_magic(rng: np.random.Generator, data: bytes) -> bytes:
    """Overwrite the first 4-16 bytes (the magic number and what follows) with random bytes."""
    n = int(rng.integers(4, 17))
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes() + data[n:]


def zero_length(rng: np.random.Generator, data: bytes) -> bytes:
    return b""


def append_garbage(rng: np.random.Generator, data: bytes) -> bytes:
    """Random bytes (1-4096) after the end."""
    return data + rng.integers(0, 256, int(rng.integers(1, 4097)), dtype=np.uint8).tobytes()


def zero_span(rng: np.random.Generator, data: bytes) -> bytes:
    """A random span (up to a quarter of the file) overwritten with zeros."""
    if len(data) < 2:
        return data
    a = int(rng.integers(0, len(data) - 1))
    b = min(len(data), a + int(rng.integers(1, max(2, len(data) // 4))))
    return data[:a] + bytes(b - a) + data[b:]


def random_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    """As many random bytes as the file had: only the name is right."""
    return rng.integers(0, 256, max(len(data), 1), dtype=np.uint8).tobytes()


BYTE_MUTATORS: dict[str, Callable[[np.random.Generator, bytes], bytes]] = {
    "truncate": truncate, "truncate_header": truncate_header, "bitflip": flip_bits,
    "header_bitflip": flip_header_bits, "wrong_magic": wrong_magic, "zero_length": zero_length,
    "garbage_after": append_garbage, "zero_span": zero_span, "random_bytes": random_bytes,
}


# -- array mutators (float payloads) -----------------------------------------------------------------
def with_nan(rng: np.random.Generator, a: np.ndarray) -> np.ndarray:
    """A float copy with 1-8 NaN values at random positions."""
    out = np.array(a, dtype=np.result_type(a.dtype, np.float32), copy=True)
    flat = out.reshape(-1)
    flat[rng.integers(0, flat.size, int(rng.integers(1, 9)))] = np.nan
    return out


def with_inf(rng: np.random.Generator, a: np.ndarray) -> np.ndarray:
    """A float copy with 1-8 values set to +-infinity."""
    out = np.array(a, dtype=np.result_type(a.dtype, np.float32), copy=True)
    flat = out.reshape(-1)
    idx = rng.integers(0, flat.size, int(rng.integers(1, 9)))
    flat[idx] = np.where(rng.random(idx.size) < 0.5, np.inf, -np.inf)
    return out


def all_nan(rng: np.random.Generator, a: np.ndarray) -> np.ndarray:
    return np.full(a.shape, np.nan, dtype=np.result_type(a.dtype, np.float32))


ARRAY_MUTATORS: dict[str, Callable[[np.random.Generator, np.ndarray], np.ndarray]] = {
    "nan": with_nan, "inf": with_inf, "all_nan": all_nan,
}


# -- format-aware header patchers: absurd sizes ------------------------------------------------------
def _chunk(data: bytes, tag: bytes) -> int:
    """Offset of a RIFF chunk's tag."""
    i = data.find(tag, 12)
    if i < 0:
        raise ValueError(f"no {tag!r} chunk")
    return i


def wav_patch(data: bytes, field: str, value: int) -> bytes:
    """A WAV with one header field replaced: ``riff_size``, ``data_size``, ``channels``, ``rate``,
    ``bits`` or ``block_align``."""
    out = bytearray(data)
    fmt = _chunk(data, b"fmt ") + 8
    where = {"riff_size": (4, "<I"), "data_size": (_chunk(data, b"data") + 4, "<I"), "channels": (fmt + 2, "<H"),
             "rate": (fmt + 4, "<I"), "block_align": (fmt + 12, "<H"), "bits": (fmt + 14, "<H")}[field]
    struct.pack_into(where[1], out, where[0], value)
    return bytes(out)


def flac_total_samples(data: bytes, total: int = 2**36 - 1) -> bytes:
    """A FLAC whose STREAMINFO claims ``total`` samples (36 bits: up to 68.7 billion)."""
    if data[:4] != b"fLaC":
        raise ValueError("not a FLAC stream")
    out = bytearray(data)
    p = 8 + 13  # after the metadata block header: the byte holding the top 4 bits of the count
    out[p] = (out[p] & 0xF0) | ((total >> 32) & 0x0F)
    struct.pack_into(">I", out, p + 1, total & 0xFFFFFFFF)
    return bytes(out)


def flac_channels(data: bytes, channels: int = 8, rate: int = 655350) -> bytes:
    """A FLAC whose STREAMINFO claims another channel count (1-8) and sample rate (20 bits)."""
    out = bytearray(data)
    p = 8 + 10  # sample rate (20 bits), channels - 1 (3 bits), bits per sample - 1 (5 bits)
    word = int.from_bytes(out[p:p + 3], "big")
    word = (rate & 0xFFFFF) << 4 | ((channels - 1) & 7) << 1 | (word & 1)
    out[p:p + 3] = word.to_bytes(3, "big")
    return bytes(out)


def png_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (the CRC recomputed, so the header is valid)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    out = bytearray(data)
    struct.pack_into(">II", out, 16, width, height)
    struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])) & 0xFFFFFFFF)
    return bytes(out)


def npy_header_only(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    """An ``.npy`` header claiming ``shape`` with no data after it (or a few bytes)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\x00" * 24


def nifti_patch(data: bytes, **fields: object) -> bytes:
    """A NIfTI-1 file (``.nii`` bytes, or gzip of them when ``data`` is gzipped) with header fields
    replaced: ``dim`` (8 int16), ``pixdim`` (8 float32), ``datatype``/``bitpix`` (int16),
    ``vox_offset``/``scl_slope``/``scl_inter`` (float32)."""
    gz = data[:2] == b"\x1f\x8b"
    raw = bytearray(gzip.decompress(data) if gz else data)
    layout = {"dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "pixdim": (76, "<8f"),
              "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f")}
    for k, v in fields.items():
        off, fmt = layout[k]
        struct.pack_into(fmt, raw, off, *(v if isinstance(v, (tuple, list)) else (v,)))
    return gzip.compress(bytes(raw), mtime=0) if gz else bytes(raw)


def edf_patch(data: bytes, **fields: object) -> bytes:
    """An EDF with fixed-width ASCII header fields replaced: ``n_records`` (8 chars), ``n_signals``
    (4), ``header_bytes`` (8), ``duration`` (8), ``samples`` (every signal's samples per record, 8)."""
    out = bytearray(data)
    ns = int(out[252:256].decode().strip())
    where = {"header_bytes": (184, 8), "n_records": (236, 8), "duration": (244, 8), "n_signals": (252, 4)}
    for k, v in fields.items():
        if k == "samples":
            base = 256 + ns * (16 + 80 + 8 + 8 + 8 + 8 + 8 + 80)
            for i in range(ns):
                out[base + 8 * i: base + 8 * i + 8] = str(v).ljust(8)[:8].encode()
        else:
            off, n = where[k]
            out[off: off + n] = str(v).ljust(n)[:n].encode()
    return bytes(out)
