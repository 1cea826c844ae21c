"""`mmssl data fetch`: the whole path (apt-get download -> dpkg-deb -x -> licence -> class tree ->
`mmssl data pack` -> data=real-NAME) on tiny packages built here with dpkg-deb, served by a stand-in
`apt-get` on PATH (the registry itself is in tests/test_data_fetch_slow.py, marked slow); the grouped
split; the label stripping of debian-descriptions."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmssl.cli import main
from mmssl.data.fetch import licences
from mmssl.data.loader import iter_split, resolve_source
from mmssl.data.pack import grouped_split
from mmssl.data.real import debian_descriptions as dd

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: KLettres

Files: *
Copyright: 2001, Someone
License: GPL-2+

Files: doc/*
License: GFDL-NIV-1.2+

License: GPL-2+
 This program is free software.
"""
#: voice -> alphabet names (en, fr, de: Latin; ru: Cyrillic, left out of the letter task)
VOICES = {"en": "ABC", "fr": "ABC", "de": "ABCÄ", "cs": "AB", "ru": "АБВ"}


def _tone(i: int) -> np.ndarray:
    t = np.arange(4000) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 37 * i) * t)).astype(np.float32)


def _klettres_deb(tmp: Path) -> Path:
    """A klettres-data .deb with KLettres' layout: <lang>/sounds.xml naming <lang>/alpha/*.ogg and
    <lang>/syllab/*.ogg, one listed file missing (as the real id/ and nn/ lists are)."""
    pkg = tmp / "pkg"
    base = pkg / "usr/share/klettres"
    n = 0
    for lang, names in VOICES.items():
        sounds = []
        for j, name in enumerate(names):
            rel = f"{lang}/alpha/a-{j}.ogg"
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(base / rel, _tone(n), 16000, format="OGG", subtype="VORBIS")
            n += 1
            sounds.append(f'<sound name="{name}" file="{rel}" />')
        syl = f"{lang}/syllab/ba.ogg"
        (base / syl).parent.mkdir(parents=True, exist_ok=True)
        sf.write(base / syl, _tone(n), 16000, format="OGG", subtype="VORBIS")
        n += 1
        missing = f'<sound name="Z" file="{lang}/alpha/gone.ogg" />'
        (base / lang / "sounds.xml").write_text(
            f'<klettres><language code="{lang}"><alphabet>{"".join(sounds)}{missing}</alphabet>'
            f'<syllables><sound name="ba" file="{syl}" /></syllables></language></klettres>', encoding="utf-8")
    doc = pkg / "usr/share/doc/klettres-data"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(COPYRIGHT)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text("Package: klettres-data\nVersion: 4:1.0-1\nArchitecture: all\n"
                                        "Maintainer: t <t@example.org>\nDescription: test sounds\n")
    deb = tmp / "klettres-data_4%3a1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(pkg), str(deb)], check=True,
                   capture_output=True)
    return deb


def _fake_tool(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    f = bindir / name
    f.write_text("#!/bin/sh\n" + body)
    f.chmod(f.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``apt-get download klettres-data`` copies the test's .deb into the working folder (as the real
    one does); every call is logged."""
    deb = _klettres_deb(tmp_path / "build")
    log = tmp_path / "apt.log"
    _fake_tool(tmp_path / "bin", "apt-get", f'echo "$@" >> {log}\n[ "$1" = download ] && [ "$2" = klettres-data ] '
                                            f'&& cp {deb} . && exit 0\necho "E: Unable to locate package $2" >&2; exit 100\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return log


def _read(root: Path, cache: Path, modality: str) -> dict[str, Counter]:
    src = resolve_source({"name": root.name}, [modality], None, cache) if not root.is_dir() else \
        resolve_source({"name": "shards", "path": str(root)}, [modality], None, cache)
    meta = src.meta
    out = {}
    for split in meta["splits"]:
        out[split] = Counter(meta["classes"][int(y)] for b in iter_split(src, split, 4, Counter()) for y in b["label"])
    return out


@needs_dpkg
def test_fetch_klettres_letters_end_to_end(tmp_path: Path, fake_apt: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    assert main(["data", "fetch", "klettres", f"cache_dir={cache}"]) == 0
    said = capsys.readouterr().out
    assert "installs Debian package klettres-data, without root" in said and str(cache / "real/klettres") in said
    assert "licences: klettres-data 4:1.0-1: GPL-2+, GFDL-NIV-1.2+" in said
    out = cache / "real/klettres/v2"
    meta = json.loads((out / "meta.json").read_text())
    # A-Z names of the Latin voices only: en A B C, fr A B C, de A B C (Ä is not A-Z), cs A B; ru left out
    assert meta["classes"] == ["A", "B", "C"]
    assert meta["fetched"][0]["licences"] == ["GPL-2+", "GFDL-NIV-1.2+"]
    assert (cache / "real/klettres/LICENSES/klettres-data.copyright").read_text() == COPYRIGHT
    assert sorted(v for g in meta["groups"].values() for v in g) == ["cs", "de", "en", "fr"]  # each voice once
    counts = _read(out, cache, "speech")
    assert sum(sum(c.values()) for c in counts.values()) == 11
    assert sum((c for c in counts.values()), Counter()) == Counter({"A": 4, "B": 4, "C": 3})
    # data=real-klettres resolves to the same folder through the preset
    src = resolve_source({"name": "real-klettres"}, ["speech"], None, cache)
    assert src.root == out
    # a second fetch keeps what is there; the stand-in apt-get was asked once
    assert main(["data", "fetch", "klettres", f"cache_dir={cache}"]) == 0
    assert "already fetched" in capsys.readouterr().out
    assert fake_apt.read_text().splitlines() == ["download klettres-data"]


@needs_dpkg
def test_fetch_klettres_language_labels_voices(tmp_path: Path, fake_apt: Path) -> None:
    cache = tmp_path / "cache"
    assert main(["data", "fetch", "klettres-language", f"cache_dir={cache}"]) == 0
    meta = json.loads((cache / "real/klettres-language/v1/meta.json").read_text())
    assert meta["classes"] == sorted(VOICES)
    counts = sum(_read(cache / "real/klettres-language/v1", cache, "speech").values(), Counter())
    assert counts == Counter({v: len(n) + 1 for v, n in VOICES.items()})  # alphabet + one syllable each


def test_unfetched_set_is_one_line_naming_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="run `mmssl data fetch klettres` first"):
        resolve_source({"name": "real-klettres"}, ["speech"], None, tmp_path)
    assert main(["eval", "linear-probe", f"encoder={tmp_path}", "data=real-klettres", f"cache_dir={tmp_path}"]) == 2
    assert main(["data", "fetch"]) == 2
    err = capsys.readouterr().err
    assert "klettres, klettres-language" in err and len(err.strip().splitlines()) == 2


def test_fetch_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    _fake_tool(tmp_path / "bin", "apt-get", 'echo "E: Unable to locate package $2" >&2; exit 100\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert main(["data", "fetch", "klettres", f"cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmssl: error: `apt-get download klettres-data` failed: E: Unable to locate package klettres-data"
    assert main(["data", "fetch", "nosuchset"]) == 2
    assert "unknown real data set 'nosuchset'; choose one of:" in capsys.readouterr().err


def test_licences_reads_the_license_lines() -> None:
    assert licences(COPYRIGHT) == ["GPL-2+", "GFDL-NIV-1.2+"]


def test_grouped_split_keeps_each_group_in_one_split() -> None:
    groups = [f"g{i % 10}" for i in range(200)]
    s = grouped_split(groups, val=0.1, test=0.2, seed=3)
    where = {split: {groups[i] for i in idx} for split, idx in s.items()}
    assert [len(where[k]) for k in ("train", "val", "test")] == [7, 1, 2]
    assert not (where["train"] & where["test"]) and not (where["train"] & where["val"]) and not (where["val"] & where["test"])
    assert sorted(i for idx in s.values() for i in idx) == list(range(200))
    assert grouped_split(groups, 0.1, 0.2, seed=3) == s and grouped_split(groups, 0.1, 0.2, seed=4) != s


def test_pack_group_option_splits_by_folder(tmp_path: Path, cache_dir: Path) -> None:
    src = tmp_path / "tree"
    for c in ("x", "y"):
        for spk in ("s1", "s2", "s3", "s4", "s5"):
            (src / c / spk).mkdir(parents=True)
            for k in range(2):
                (src / c / spk / f"{k}.txt").write_text(f"{c} said by {spk} take {k}")
    out = tmp_path / "packed"
    assert main(["data", "pack", "modality=text", f"src={src}", f"out={out}", "group=2", "val=0.2", "test=0.2",
                 "shards=1"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert [len(meta["groups"][k]) for k in ("train", "val", "test")] == [3, 1, 1]
    assert [meta["splits"][k]["count"] for k in ("train", "val", "test")] == [12, 4, 4]


# -- debian-descriptions ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "want"), [
    ("Fast array facility to the Python 3 language", "Fast array facility to the 3 language"),
    ("GNU R package for survival analysis", "package for survival analysis"),
    ("shared library for PNG images (development files)", "shared for PNG images"),
    ("Perl module to parse R&D documents; Go bindings", "module to parse R&D; bindings"),
    ("Network utilities for X Window System", "for System"),
])
def test_strip_labels_removes_every_section_name(text: str, want: str) -> None:
    assert dd.strip_labels(text) == want


def test_choose_caps_dedups_and_drops_shared_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dd, "PER_SECTION", 2)
    rows = [{"Package": f"p{i}", "Source": f"s{i // 2} (1.0)", "Section": s, "Description": f"tool number {i} for {s} work"}
            for i, s in enumerate(dd.SECTIONS * 3)]
    rows += [{"Package": "dup1", "Section": "libs", "Description": "same words here"},
             {"Package": "dup2", "Section": "doc", "Description": "same words here"},
             {"Package": "short", "Section": "libs", "Description": "Python library"},
             {"Package": "other", "Section": "oldlibs", "Description": "an old thing here"}]
    chosen = dd.choose(rows)
    assert set(chosen) == set(dd.SECTIONS) and all(len(v) == 2 for v in chosen.values())
    texts = [t for v in chosen.values() for _, _, t in v]
    assert "same words here" not in texts and all(dd.strip_labels(t) == t for t in texts)
    assert all(src.startswith("s") and " " not in src for v in chosen.values() for src, _, _ in v)


def test_stanzas_fold_continuation_lines() -> None:
    idx = "Package: a\nSection: libs\nDescription: one\nTag: x,\n y\n\nPackage: b\nSection: doc\n"
    assert dd.stanzas(idx) == [{"Package": "a", "Section": "libs", "Description": "one", "Tag": "x,\ny"},
                               {"Package": "b", "Section": "doc"}]


def test_ring_count_reads_ring_closures_not_bracket_digits() -> None:
    from mmssl.data.real.qm9 import ring_count

    assert [ring_count(s) for s in ("C", "C1CC1", "c1ccc2ccccc2c1", "C1CC2CC1C2", "[NH3+]CC", "C%10CC%10")] == [0, 1, 2, 2, 0, 1]


def test_fetch_qm9_from_a_wheel_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for the qm9pack wheel (its layout and CSV columns, three molecules of each ring
    class) already in the cache: unzipped, licence recorded from METADATA, one .npy cloud per
    molecule with its atoms, packed; nothing is installed."""
    import zipfile

    from mmssl.data import fetch as fetch_mod
    from mmssl.data.real import qm9

    monkeypatch.setattr(qm9, "PER_CLASS", 3)
    wheels = tmp_path / "c" / "real" / "qm9" / "wheels"
    wheels.mkdir(parents=True)
    rows = ["XYZ_file,Index,SMILES,N_atoms,XYZ_Ang"]
    smiles = {"rings-0": "CC", "rings-1": "C1CC1", "rings-2": "C1CC2CC1C2", "rings-3+": "C12C3C1C23"}
    i = 0
    for c, smi in smiles.items():
        for j in range(3):
            i += 1
            xyz = [[0.1 * i, 0.0, 1.0], [0.5, 0.2 * j, 0.0], [1.0, 1.0, 1.0 + j]]
            rows.append(f'"dsgdb9nsd_{i:06d}.xyz",{i},"{smi}",3,"{str(xyz).replace(" ", "")}"')
    with zipfile.ZipFile(wheels / "qm9pack-1.0.3-py3-none-any.whl", "w") as z:
        z.writestr("qm9pack/data/qm9_part1.csv", "\n".join(rows) + "\n")
        z.writestr("qm9pack-1.0.3.dist-info/METADATA", "Metadata-Version: 2.1\nName: qm9pack\nLicense: MIT\n")
        z.writestr("qm9pack-1.0.3.dist-info/LICENSE", "MIT License\n")
    monkeypatch.setattr(fetch_mod, "run_tool", lambda *a, **k: pytest.fail("nothing should be downloaded"))
    out = fetch_mod.fetch("qm9", tmp_path / "c", log=lambda line: None)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == list(smiles) and sum(s["count"] for s in meta["splits"].values()) == 12
    assert meta["fetched"][0]["package"] == "qm9pack" and meta["fetched"][0]["licences"] == ["MIT"]
    clouds = sorted((tmp_path / "c" / "real" / "qm9" / "tree" / "rings-2").glob("*.npy"))
    assert len(clouds) == 3 and np.load(clouds[0]).shape == (3, 3)
