"""Debian package descriptions: label = the package's archive section, text = its one-line
description, read from this machine's apt index (``apt-cache dumpavail``; no download).

The index here holds short descriptions only (the long ones live in Translation files that
``apt-get update`` would need root to fetch). Words that name a section are removed from every text,
whatever its own section, so that no text carries any label's name ("Python module for X" -> "module
for X"; "shared library for Y" -> "shared for Y"). Each source package is a group (its binary
packages - library, -dev, -doc - share wording and stay in one split). ``PER_SECTION`` texts per
section, of the ``SECTIONS`` (the 20 largest of bookworm), chosen with a fixed seed."""
from __future__ import annotations

import random
import re
from pathlib import Path

from mmssl.data.fetch import RealSet, register, run_tool

SECTIONS = ("libs", "libdevel", "python", "doc", "perl", "devel", "utils", "haskell", "net", "rust", "golang",
            "javascript", "java", "science", "admin", "ruby", "gnu-r", "games", "x11", "text")
PER_SECTION = 300
#: phrases that name a section (case-insensitive unless marked), removed from every description
LABEL_TERMS = (r"develop\w* files", r"header files", r"librar\w*", r"libs?", r"develop\w*", r"devel", r"headers?", r"python\w*", r"py\w*",
               r"document\w*", r"docs?", r"perl\w*", r"cpan", r"utilit\w*", r"utils?", r"haskell\w*", r"ghc",
               r"hackage", r"network\w*", r"net", r"rust\w*", r"crates?", r"cargo", r"golang", r"go",
               r"javascript", r"js", r"node(?:\.?js)?", r"java", r"scien\w*", r"admin\w*", r"ruby\w*",
               r"gems?", r"rails", r"cran", r"gnu[ -]r", r"games?", r"gaming", r"x11", r"x\s+window\w*",
               r"xorg", r"text\w*")
STRIP = re.compile(r"\b(?:" + "|".join(LABEL_TERMS) + r")\b", re.I)
STRIP_R = re.compile(r"(?<![\w.+&-])R(?![\w+&-])")  # the language R, case-sensitive ("R package")
MIN_WORDS = 3


def strip_labels(text: str) -> str:
    """``text`` without the phrases that name a section, spaces and dangling punctuation tidied."""
    t = STRIP_R.sub(" ", STRIP.sub(" ", text))
    t = re.sub(r"\(\s*\)|\[\s*\]", " ", t)
    t = re.sub(r"\s+([,.;:)])", r"\1", t)
    return re.sub(r"\s+", " ", t).strip(" -,;:/")


def stanzas(index: str) -> list[dict[str, str]]:
    """``apt-cache dumpavail`` output -> one dict per package (continuation lines folded in)."""
    out = []
    for block in index.split("\n\n"):
        d: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                d[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, v = line.partition(":")
                d[key] = v.strip()
        if d.get("Package"):
            out.append(d)
    return out


def choose(packages: list[dict[str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    """section -> ``PER_SECTION`` ``(source, package, stripped text)``; a text found in two sections
    (after stripping) is dropped from both, and texts of fewer than ``MIN_WORDS`` words are not used."""
    seen: dict[str, set[str]] = {}
    rows: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SECTIONS}
    for p in sorted(packages, key=lambda p: p["Package"]):
        section = p.get("Section", "").split("/")[-1]
        if section not in rows:
            continue
        text = strip_labels(p.get("Description", "").split("\n")[0])
        if len(text.split()) < MIN_WORDS:
            continue
        key = text.lower()
        seen.setdefault(key, set()).add(section)
        source = (p.get("Source") or p["Package"]).split()[0]
        rows[section].append((source, p["Package"], text))
    out = {}
    for s in SECTIONS:
        uniq, taken = [], set()
        for r in rows[s]:
            k = r[2].lower()
            if len(seen[k]) == 1 and k not in taken:  # one text once, and only in one section
                taken.add(k)
                uniq.append(r)
        random.Random(f"debian-descriptions-{s}").shuffle(uniq)
        out[s] = sorted(uniq[:PER_SECTION])
    return out


def build(root: Path, tree: Path) -> None:
    chosen = choose(stanzas(run_tool(["apt-cache", "dumpavail"])))
    for section, rows in chosen.items():
        if len(rows) < PER_SECTION:
            raise ValueError(f"section {section!r} has only {len(rows)} usable descriptions here (< {PER_SECTION})")
        for source, pkg, text in rows:
            f = tree / section / source / f"{pkg}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text + "\n", encoding="utf-8")


DEBIAN_DESCRIPTIONS = register(RealSet(
    name="debian-descriptions", modality="text", packages=(), build=build, group_level=2, num_shards=4,
    summary=f"Debian one-line package descriptions, label = section ({len(SECTIONS)} x {PER_SECTION}), "
            "section names stripped, split by source package",
    extra_licence="Debian archive index (apt-cache dumpavail): each description is part of its package, "
                  "under that package's licence (see /usr/share/doc/<package>/copyright of each)"))
