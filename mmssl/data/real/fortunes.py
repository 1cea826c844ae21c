"""BSD fortune cookies (Debian ``fortunes`` + ``fortunes-min``, BSD): label = the fortune file
(category) a cookie comes from. Cookies are separated by a line holding ``%``; ``PER_CATEGORY`` of
each of the ``CATEGORIES`` (every file with at least that many), chosen with a fixed seed; identical
cookies in two files are dropped from both. Split stratified by category."""
from __future__ import annotations

import random
from pathlib import Path

from mmssl.data.fetch import RealSet, register

FORTUNES = Path("usr/share/games/fortunes")
CATEGORIES = ("art", "computers", "cookie", "definitions", "disclaimer", "drugs", "education", "fortunes",
              "knghtbrd", "law", "linux", "literature", "men-women", "miscellaneous", "people", "perl",
              "platitudes", "politics", "science", "songs-poems", "startrek", "wisdom", "work", "zippy")
PER_CATEGORY = 200


def cookies(path: Path) -> list[str]:
    """The cookies of one fortune file (``%`` lines separate them), stripped, empty ones left out."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return [c.strip() for c in text.replace("\r\n", "\n").split("\n%\n") if c.strip().strip("%").strip()]


def build(root: Path, tree: Path) -> None:
    per = {c: cookies(root / FORTUNES / c) for c in CATEGORIES}
    where: dict[str, set[str]] = {}
    for c, items in per.items():
        for t in items:
            where.setdefault(t, set()).add(c)
    for c, items in per.items():
        uniq = sorted({t for t in items if len(where[t]) == 1})
        random.Random(f"fortunes-{c}").shuffle(uniq)
        if len(uniq) < PER_CATEGORY:
            raise ValueError(f"fortune file {c!r} has only {len(uniq)} distinct cookies (< {PER_CATEGORY})")
        (tree / c).mkdir(parents=True)
        for i, t in enumerate(uniq[:PER_CATEGORY]):
            (tree / c / f"{i:04d}.txt").write_text(t + "\n", encoding="utf-8")


FORTUNE_SET = register(RealSet(
    name="fortunes", modality="text", packages=("fortunes", "fortunes-min"), build=build, num_shards=4,
    summary=f"BSD fortune cookies, label = fortune file ({len(CATEGORIES)} x {PER_CATEGORY})"))
