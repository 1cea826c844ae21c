"""Atomic folder writes: build in a temporary sibling folder, then rename into place, so a crash
leaves either the old folder or the new one whole, never half of one."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mmssl import faults


def make_tmp_dir(dst: Path) -> Path:
    """A temporary sibling of ``dst`` (same file system, so the final rename is atomic), made readable
    by others (mkdtemp creates it 0700)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    tmp.chmod(0o755)
    return tmp


def replace_dir(tmp: Path, dst: Path) -> None:
    """Move a finished folder into place; an old one is renamed aside first and removed after."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        faults.point("ckpt_aside")  # the old folder aside, the new one not yet in place
    os.replace(tmp, dst)
    if old.exists():
        shutil.rmtree(old)


def write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename: a reader sees the old file or the new
    one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
