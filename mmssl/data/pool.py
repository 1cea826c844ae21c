"""Generating an embedded preset on every core, with the same bytes as one process.

Every embedded generator draws item ``i`` of a split from its own random stream, seeded by
``(version, seed, split, i)`` (the ``generate(split, n, seed, start)`` contract of the ``synth``
modules), so items can be made in any order and by any process. :func:`pooled` cuts ``[0, n)`` into
chunks, makes each chunk (the generator and the encoding ``then``) in a forked worker, and yields the
results in index order, keeping at most a few chunks in flight so memory stays bounded.

Forked, not spawned: the callables are often closures over a codec, and a forked worker inherits them
without pickling (torch re-creates its thread pool after a fork, as DataLoader workers rely on). Where
fork is unsafe or absent (not Linux), or for small splits, everything runs in this process.
``MMSSL_DATA_WORKERS`` sets the number of workers (default: the cores this process may use, at most
8; ``1`` turns the pool off)."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

#: items per chunk: large enough that a worker's result message is cheap beside the work
CHUNK = 64

# The job the forked workers run, set before the pool forks (the workers inherit it).
_JOB: tuple[Callable[..., Any], Callable[[Any], Any], dict[str, Any]] | None = None


def workers() -> int:
    """How many processes a preset build uses (``MMSSL_DATA_WORKERS``, else the usable cores, <= 8)."""
    env = os.environ.get("MMSSL_DATA_WORKERS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def _chunk(split: str, start: int, stop: int) -> list[Any]:
    generate, then, kw = _JOB  # type: ignore[misc]
    return [then(x) for x in generate(split, n=stop, start=start, **kw)]


def pooled(generate: Callable[..., Iterator[Any]], split: str, n: int, then: Callable[[Any], Any] = lambda x: x,
           num_workers: int | None = None, **kw: Any) -> Iterator[Any]:
    """``then(item)`` for items ``0..n-1`` of ``generate(split, n=.., start=.., **kw)``, in order.

    ``generate`` must make item ``i`` from ``(split, i, kw)`` alone, whatever ``start`` and ``n`` are;
    the output is then identical for any number of workers (tested)."""
    global _JOB
    w = workers() if num_workers is None else max(1, num_workers)
    if w == 1 or n <= CHUNK or not sys.platform.startswith("linux"):
        yield from (then(x) for x in generate(split, n=n, start=0, **kw))
        return
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    _JOB = (generate, then, kw)
    try:
        with ProcessPoolExecutor(max_workers=w, mp_context=mp.get_context("fork")) as ex:
            pending: deque[Future] = deque()
            todo = iter(bounds)
            for a, b in todo:  # prime: two chunks per worker in flight
                pending.append(ex.submit(_chunk, split, a, b))
                if len(pending) >= 2 * w:
                    break
            while pending:
                done = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(ex.submit(_chunk, split, *nxt))
                yield from done
    finally:
        _JOB = None
