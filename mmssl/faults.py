"""Fault injection for the crash-safety tests: named points in the code where a test can kill the
process or make a write fail, so "a kill at any point resumes exactly" is measured, not assumed.

``MMSSL_FAULT=NAME:N[,NAME:N ...]`` sends SIGKILL to this process the N-th time it reaches point NAME
(1-based; ranks count separately). Unset (always, outside tests), a point costs one dict lookup."""
from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("MMSSL_FAULT", "")
_counts: dict[str, int] = {}


def _targets() -> dict[str, int]:
    out = {}
    for part in filter(None, (p.strip() for p in _SPEC.split(","))):
        name, _, n = part.partition(":")
        out[name] = int(n or 1)
    return out


_TARGETS = _targets()

#: the points the code reaches, in the order a run meets them
POINTS = ("units_dumped", "units_fitted", "step", "ckpt_rank_state", "ckpt_weights", "ckpt_optimizer",
          "ckpt_aside", "export")


def point(name: str) -> None:
    """Reaching point ``name``: die here if MMSSL_FAULT says so."""
    if not _TARGETS:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _TARGETS.get(name) == _counts[name]:
        os.kill(os.getpid(), signal.SIGKILL)
