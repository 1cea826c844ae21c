"""mmssl/data/pool.py: a preset made on several processes holds the same items, in the same order, as
one made in this process, and the work really leaves this process."""
from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mmssl.data import pool


def _toy(split: str, n: int, seed: int = 0, start: int = 0) -> Iterator[tuple[int, float]]:
    for i in range(start, n):
        yield i, float(np.random.default_rng([seed, len(split), i]).normal())


def test_pooled_is_the_serial_sequence_made_elsewhere() -> None:
    n = 5 * pool.CHUNK + 7  # a ragged last chunk
    serial = list(pool.pooled(_toy, "train", n, seed=3, num_workers=1))
    parallel = list(pool.pooled(_toy, "train", n, seed=3, num_workers=2,
                                then=lambda x: (x, os.getpid())))
    pids = {p for _, p in parallel}
    assert [x for x, _ in parallel] == serial == list(_toy("train", n, seed=3))
    assert pids and os.getpid() not in pids, pids
    # small splits stay in this process
    assert {p for _, p in pool.pooled(_toy, "val", 10, num_workers=2, then=lambda x: (x, os.getpid()))} == {os.getpid()}


def test_a_worker_error_reaches_the_caller() -> None:
    def bad(x: tuple[int, float]) -> int:
        if x[0] == pool.CHUNK + 3:
            raise ValueError("item 67 is bad")
        return x[0]

    with pytest.raises(ValueError, match="item 67 is bad"):
        list(pool.pooled(_toy, "train", 3 * pool.CHUNK, num_workers=2, then=bad))


def _members(root: Path) -> list[tuple[str, str, bytes]]:
    out = []
    for tar in sorted(root.rglob("*.tar")):
        with tarfile.open(tar) as t:
            out += [(tar.relative_to(root).as_posix(), m.name, t.extractfile(m).read()) for m in t.getmembers()]
    return out


@pytest.mark.parametrize("preset", ["mri", "eeg"])
def test_a_preset_built_on_two_processes_is_byte_identical(preset: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mmssl.modalities.eeg.data import EEGSynthPreset
    from mmssl.modalities.mri.data import MRISynthPreset

    make = {"mri": MRISynthPreset, "eeg": EEGSynthPreset}[preset]
    sizes = {"train": 2 * pool.CHUNK + 5, "val": 6}
    for w in ("1", "2"):
        monkeypatch.setenv("MMSSL_DATA_WORKERS", w)
        make().build(tmp_path / w, sizes=sizes)
    one, two = _members(tmp_path / "1"), _members(tmp_path / "2")
    assert len(one) > 2 * sizes["train"] and one == two
    assert (tmp_path / "1" / "meta.json").read_text() == (tmp_path / "2" / "meta.json").read_text()
