"""Host memory for CPU training: keep freed tensor memory in the process instead of giving it back.

glibc's malloc serves blocks above its mmap threshold (128 KiB, rising up to 32 MiB as blocks are
freed) with fresh ``mmap`` pages and returns them on ``free``; every new activation then page-faults
and is zero-filled by the kernel. A CPU HuBERT step on 64 utterances allocates tens of MiB per layer,
and ``make demo`` spent 95 of its 800 CPU-seconds in the kernel, 26 million minor faults. Raising
the mmap and trim thresholds lets malloc reuse those blocks (the usual advice for PyTorch on CPUs,
which ship no caching allocator there). Measured in bench/RESULTS.md ("Host memory").

Off with ``MMSSL_MALLOC=default``; a no-op where the C library is not glibc."""
from __future__ import annotations

import ctypes
import os
import sys

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks above it are mapped
MMAP_THRESHOLD = 32 << 20
#: freed memory at the top of the heap kept up to this much (mallopt takes an int)
TRIM_THRESHOLD = 2**31 - 1

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process (inherited by forked loader workers) -> whether it applied."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("MMSSL_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):
            return _done  # not glibc (musl has no such tunables)
        _done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        _done = False
    return _done
