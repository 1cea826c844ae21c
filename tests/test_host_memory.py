"""mmssl.host_memory: with glibc's malloc tuned, a step-sized tensor (20 MiB) comes from the heap and
stays there when freed (the program break grows and does not shrink back), where glibc's defaults
map it fresh with mmap and unmap it on free, so the next one page-faults again. Each way in a fresh
process; the program break is read with sbrk(0)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

WORKLOAD = r"""
import ctypes, torch
from mmssl.host_memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
brk = lambda: libc.sbrk(ctypes.c_long(0))
b0 = brk()
x = torch.empty(20 * 2**20 // 4).fill_(1.0)
b1 = brk()
del x
b2 = brk()
print(applied, (b1 - b0) >> 20, (b2 - b0) >> 20)
"""


def _run(env_extra: dict[str, str]) -> tuple[bool, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "MMSSL_MALLOC"}
    out = subprocess.run([sys.executable, "-c", WORKLOAD], check=True, capture_output=True, text=True,
                         env={**env, "OMP_NUM_THREADS": "1", **env_extra})
    applied, grown, kept = out.stdout.split()
    return applied == "True", int(grown), int(kept)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_malloc_keeps_step_sized_blocks_on_the_heap() -> None:
    tuned = _run({})
    default = _run({"MMSSL_MALLOC": "default"})
    print(f"(applied, heap MiB after a 20 MiB tensor, after freeing it): tuned {tuned}, glibc default {default}")
    assert tuned[0] and tuned[1] >= 20 and tuned[2] >= 20  # on the heap, and kept there when freed
    assert not default[0] and default[1] < 20  # glibc's default: mapped apart from the heap
