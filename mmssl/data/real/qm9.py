"""QM9 molecules (the ``qm9pack`` wheel, MIT: the 130,831 DFT-relaxed small organic molecules of
Ramakrishnan et al., Scientific Data 2014) as 3D point clouds: one point per atom, at its B3LYP
coordinates in angstroms. Label: the molecule's ring count read from its SMILES (0, 1, 2, 3 or more
rings), a property of the 3D shape (a ring is a closed loop of atoms) that no atom count alone gives.
``PER_CLASS`` molecules of each class, chosen with a fixed seed; split stratified by class."""
from __future__ import annotations

import ast
import csv
import random
import re
import sys
from pathlib import Path

import numpy as np

from mmssl.data.fetch import RealSet, register

WHEEL = "qm9pack==1.0.3"
DATA = Path("qm9pack") / "qm9pack" / "data"
CLASSES = ("rings-0", "rings-1", "rings-2", "rings-3+")
PER_CLASS = 1000


def ring_count(smiles: str) -> int:
    """Rings of a SMILES string: ring-closure labels (a digit, or ``%nn``) come in pairs, one pair per
    ring; digits inside ``[...]`` atoms (charges, hydrogen counts, isotopes) are not labels."""
    plain = re.sub(r"\[[^\]]*\]", "", smiles)
    labels = re.findall(r"%\d\d|\d", plain)
    return len(labels) // 2


def molecules(root: Path) -> list[tuple[str, int, np.ndarray]]:
    """(xyz file name, ring count, atom coordinates [n, 3] float32) of every molecule in the wheel."""
    csv.field_size_limit(sys.maxsize)
    out = []
    for part in sorted((root / DATA).glob("qm9_part*.csv")):
        with open(part, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                # Python literals, not JSON: a few molecules write 0. and 1.
                xyz = np.asarray(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float32).reshape(-1, 3)
                out.append((row["XYZ_file"].removesuffix(".xyz"), ring_count(row["SMILES"]), xyz))
    return out


def build(root: Path, tree: Path) -> None:
    by_class: dict[str, list[tuple[str, np.ndarray]]] = {c: [] for c in CLASSES}
    for name, rings, xyz in molecules(root):
        by_class[CLASSES[min(rings, 3)]].append((name, xyz))
    for c, items in by_class.items():
        if len(items) < PER_CLASS:
            raise ValueError(f"QM9 has only {len(items)} molecules in class {c!r} (< {PER_CLASS})")
        random.Random(f"qm9-{c}").shuffle(items)
        (tree / c).mkdir(parents=True)
        for name, xyz in items[:PER_CLASS]:
            np.save(tree / c / f"{name}.npy", xyz)


QM9_SET = register(RealSet(
    name="qm9", modality="point", packages=(), wheels=(WHEEL,), build=build, num_shards=4,
    summary=f"QM9 molecules as atom point clouds, label = ring count ({len(CLASSES)} x {PER_CLASS})"))
