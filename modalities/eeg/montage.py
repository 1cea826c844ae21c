"""Electrode coordinates and channel-name matching.

Coordinates live in ``electrodes_1005.tsv`` (package data): every position of the 10-05 system
(Oostenveld & Praamstra, 2001), which contains the 10-10 and 10-20 positions, each marked with the
smallest system it belongs to (``1020``, ``1010``, ``1005``; ``other`` for mastoids and earlobes).

Frame: the head frame (x towards the right preauricular point, y towards the nasion, z up; origin on
the line between the preauricular points), every position projected radially onto the unit sphere,
so coordinates from any source and in any unit compare (only directions matter).

Provenance: generated once at development time by ``table_from_mne`` from MNE-Python's bundled
``standard_1005`` template (positions on the Colin27 head, transformed to the head frame by its
fiducials); MNE is not needed at run time. The 10-20 aliases of the old nomenclature (T3, T4, T5, T6)
are not rows of the table but aliases (``ALIASES``)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import numpy as np

TABLE = "electrodes_1005.tsv"

#: old 10-20 names -> the 10-10 nomenclature (American Clinical Neurophysiology Society, 2006)
ALIASES: dict[str, str] = {"T3": "T7", "T4": "T8", "T5": "P7", "T6": "P8"}

#: reference labels that may follow an electrode name after a dash ("EEG Fp1-REF", "C3-A1", "O1-LE")
_REFERENCES = {"REF", "LE", "RE", "AR", "AVG", "AVE", "AV", "CAR", "A1", "A2", "M1", "M2", "A1A2", "LM", "RM",
               "MASTOIDS", "EARS"}

#: the classic 10-20 placement's 19 recording electrodes
STANDARD_1020_19 = ("Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz", "C4", "T8", "P7", "P3", "Pz",
                    "P4", "P8", "O1", "O2")
#: a common 32-channel 10-10 cap (Brain Products actiCAP / EasyCap 32)
STANDARD_1010_32 = ("Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "FC5", "FC1", "FC2", "FC6", "T7", "C3", "Cz", "C4",
                    "T8", "TP9", "CP5", "CP1", "CP2", "CP6", "TP10", "P7", "P3", "Pz", "P4", "P8", "PO9", "O1",
                    "Oz", "O2", "PO10")
#: a 64-channel 10-10 cap (BioSemi 64's positions under their 10-10 names)
STANDARD_1010_64 = ("Fp1", "AF7", "AF3", "F1", "F3", "F5", "F7", "FT7", "FC5", "FC3", "FC1", "C1", "C3", "C5", "T7",
                    "TP7", "CP5", "CP3", "CP1", "P1", "P3", "P5", "P7", "P9", "PO7", "PO3", "O1", "Iz", "Oz", "POz",
                    "Pz", "CPz", "Fpz", "Fp2", "AF8", "AF4", "AFz", "Fz", "F2", "F4", "F6", "F8", "FT8", "FC6",
                    "FC4", "FC2", "FCz", "Cz", "C2", "C4", "C6", "T8", "TP8", "CP6", "CP4", "CP2", "P2", "P4", "P6",
                    "P8", "P10", "PO8", "PO4", "O2")
MONTAGES: dict[str, tuple[str, ...]] = {"1020-19": STANDARD_1020_19, "1010-32": STANDARD_1010_32,
                                        "1010-64": STANDARD_1010_64}


class UnknownChannel(ValueError):
    """Channel names without coordinates in the table (after aliases and reference suffixes)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        super().__init__(", ".join(self.names))


@lru_cache(maxsize=1)
def table() -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """-> (names, unit vectors [n, 3] float64, systems) of the shipped table, in file order."""
    text = resources.files("mmssl.modalities.eeg").joinpath(TABLE).read_text(encoding="utf-8")
    names, xyz, systems = [], [], []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("name\t"):
            continue
        n, x, y, z, s = line.split("\t")
        names.append(n)
        xyz.append((float(x), float(y), float(z)))
        systems.append(s)
    return tuple(names), np.asarray(xyz, dtype=np.float64), tuple(systems)


@lru_cache(maxsize=1)
def _lookup() -> dict[str, int]:
    names, _, _ = table()
    out = {n.casefold(): i for i, n in enumerate(names)}
    for old, new in ALIASES.items():
        out[old.casefold()] = out[new.casefold()]
    return out


def canonical(name: str) -> str | None:
    """A channel name as recordings spell it -> the table's name, or None when it has no position.

    Case-insensitive; ``ALIASES`` apply; an ``EEG`` prefix, trailing dots (PhysioNet's ``Fc5.``) and a
    reference suffix after a dash (``-REF``, ``-LE``, ``-A1``, ``-M2``, ...) are ignored. A bipolar
    derivation (``Fp1-F7``) is not an electrode and stays unknown."""
    look = _lookup()
    s = name.strip()
    s = re.sub(r"^EEG[\s_:-]+", "", s, flags=re.IGNORECASE).strip().rstrip(".").strip()
    if "-" in s:
        head, _, tail = s.partition("-")
        if tail.strip().upper() not in _REFERENCES:
            return None
        s = head.strip()
    i = look.get(s.casefold())
    return None if i is None else table()[0][i]


def positions(names: Sequence[str]) -> np.ndarray:
    """Channel names -> unit vectors [C, 3] float32 in the head frame; raises UnknownChannel naming
    every name that has no position."""
    names_t, xyz, _ = table()
    look = _lookup()
    idx, unknown = [], []
    for n in names:
        c = canonical(str(n))
        if c is None:
            unknown.append(str(n))
        else:
            idx.append(look[c.casefold()])
    if unknown:
        raise UnknownChannel(unknown)
    return xyz[idx].astype(np.float32)


def project(pos: np.ndarray) -> np.ndarray:
    """Own coordinates [C, 3] (head frame, any unit) -> unit vectors; ValueError when a row is not
    finite or sits at the origin."""
    p = np.asarray(pos, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"coordinates must be [C, 3], got {p.shape}")
    r = np.linalg.norm(p, axis=1)
    if not np.isfinite(p).all() or (r < 1e-9).any():
        raise ValueError("coordinates must be finite and away from the origin")
    return (p / r[:, None]).astype(np.float32)


def names_of(system: str) -> tuple[str, ...]:
    """Every table name of one system and the systems it contains: ``1020`` in ``1010`` in ``1005``."""
    order = {"1020": 0, "1010": 1, "1005": 2}
    if system not in order:
        raise ValueError(f"system must be one of {list(order)}, not {system!r}")
    names, _, systems = table()
    return tuple(n for n, s in zip(names, systems) if s in order and order[s] <= order[system])


def table_from_mne() -> str:
    """Development only (needs mne): the text of ``electrodes_1005.tsv`` from MNE's ``standard_1005``."""
    import mne

    m = mne.channels.make_standard_montage("standard_1005")
    info = mne.create_info(m.ch_names, 100.0, "eeg")
    info.set_montage(m)  # the template's fiducials define the head frame
    ten20 = set(STANDARD_1020_19) | {"Fpz", "Oz"}
    ten10 = set(mne.channels.make_standard_montage("standard_1020").ch_names)
    lines = ["# Electrode positions of the 10-05 system (includes 10-10 and 10-20), unit sphere, head frame",
             "# (x: right preauricular, y: nasion, z: up). Generated by mmssl.modalities.eeg.montage.table_from_mne",
             f"# from MNE-Python {mne.__version__} standard_1005 (Colin27 head), projected radially; T3/T4/T5/T6 are",
             "# aliases (montage.ALIASES). system: smallest system holding the position (other: mastoids, earlobes).",
             "name\tx\ty\tz\tsystem"]
    for ch in info["chs"]:
        n = ch["ch_name"]
        if n in ALIASES:
            continue
        p = ch["loc"][:3] / np.linalg.norm(ch["loc"][:3])
        s = "other" if n in ("M1", "M2", "A1", "A2") else "1020" if n in ten20 else "1010" if n in ten10 else "1005"
        lines.append(f"{n}\t{p[0]:.5f}\t{p[1]:.5f}\t{p[2]:.5f}\t{s}")
    return "\n".join(lines) + "\n"
