"""Streaming k-means in torch, for HuBERT discrete-unit targets.

HuBERT clusters MFCC (iteration 1) or hidden-layer features (later iterations) of a
whole corpus into ``k`` units. The corpus rarely fits in memory, so :class:`StreamingKMeans`
only ever sees the data through a callable that yields chunks, and keeps nothing bigger than
``[k, F]`` statistics plus an ``init_sample`` row sample drawn in a first pass. The sample does
most of the work: seeding (greedy k-means++ on a slice of it, with a few spare centroids merged
away), then over-relaxed Lloyd iterations in memory; the full passes over the data only finish
the job, and stop as soon as one more would gain less than ``tol``.

Also here: :func:`pnmi` and :func:`purity`, the unit-quality metrics of the HuBERT paper.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["StreamingKMeans", "pnmi", "purity"]

ChunkSource = Callable[[], Iterable[torch.Tensor]] | Iterable[torch.Tensor] | torch.Tensor


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _argmin(d: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``d.argmin(dim)`` (int64, on ``d``'s device); ``dim=None`` is the flat index.

    On the CPU this goes through numpy: torch's CPU argmin is scalar code (about 0.5 G elements/s
    on this project's 2-core machine, as slow as the distance matmul at k=100, F=39), numpy's is
    SIMD (2-5 G elements/s).
    """
    if d.device.type != "cpu":
        return d.argmin() if dim is None else d.argmin(dim)
    a = d.contiguous().numpy()
    return torch.from_numpy(np.asarray(a.argmin() if dim is None else a.argmin(dim), dtype=np.int64))


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[n, t]`` between rows ``x`` ``[n, F]`` and ``c`` ``[t, F]`` (squared norms
    ``x_sq`` ``[n]``, ``c_sq`` ``[t]``)."""
    return torch.addmm(x_sq.unsqueeze(1) + c_sq, x, c.T, beta=1.0, alpha=-2.0).clamp_min_(0.0)


@dataclass
class _PassStats:
    """What one E-step pass over the data accumulates (tensors on the device: no host sync)."""

    sums: torch.Tensor  # [k, F] float64, per-cluster sum of (shifted) rows
    counts: torch.Tensor  # [k] int64
    total_sq: torch.Tensor  # [] float64, sum over rows of ||x||^2 (shifted)

    def inertia(self, c: torch.Tensor) -> torch.Tensor:
        """Sum of squared distances of the rows to their centroids ``c`` ``[k, F]``, in float64.

        ``sum_i ||x_i - c_l(i)||^2 = sum_i ||x_i||^2 + sum_j (n_j ||c_j||^2 - 2 c_j . S_j)``: from
        the ``[k, F]`` statistics, so a pass never needs per-row distances.
        """
        c = c.double()
        return self.total_sq + (self.counts.double() * c.pow(2).sum(1) - 2.0 * (c * self.sums).sum(1)).sum()


# One E-step over some rows at centroids ``c``, given their ``sum ||x||^2`` once known (else None).
PassFn = Callable[[torch.Tensor, "torch.Tensor | None"], _PassStats]


@dataclass
class _LloydResult:
    """What a run of Lloyd iterations hands on."""

    start: torch.Tensor  # [k, F] the M-step of the pass with the lowest bound: where to go on from
    counts: torch.Tensor  # [k] int64, the sizes of ``start``'s clusters in that pass
    # the lowest-inertia centroids a pass without empty clusters measured, and that (exact) inertia
    measured: tuple[torch.Tensor, float] | None
    iters: int


class StreamingKMeans:
    """Lloyd k-means over data streamed in chunks, seeded and mostly fitted on an in-memory sample.

    ``fit`` reads the data once to draw a uniform row sample (and the data mean, see below), then:

    1. seeds ``k + ceil(oversample * k)`` centroids by greedy k-means++ (scikit-learn's scheme) on
       the first ``seed_rows`` sample rows, runs a few Lloyd iterations there and merges the
       cheapest pairs (Ward's criterion) down to ``k``. The spare centroids catch what plain
       k-means++ misses on well-separated data (a cluster left without a seed, another with two);
    2. runs up to ``sample_iter`` Lloyd iterations on the whole sample, in memory;
    3. runs full Lloyd passes over the data (at most ``max_iter``) until the M-step's exact gain
       (``sum_j n_j ||mean_j - c_j||^2``: the next pass's inertia is at least that much lower) is
       at most ``tol`` times the inertia. The best centroids a pass measured are kept, so
       ``inertia_`` is exact for them.

    Both Lloyd phases over-relax their steps (see :meth:`_lloyd`), with a safeguard that falls
    back to the plain step whenever that would have done better.

    Empty clusters take the sample rows farthest from their centroid.

    Args:
        k: number of clusters.
        max_iter: maximum number of full Lloyd passes over the data.
        tol: relative gain at which a Lloyd phase stops (the sample iterations and the full
            passes alike): a phase ends when one more plain Lloyd step would lower the inertia
            by at most this fraction.
        n_init_candidates: k-means++ candidates tried per centroid (default ``2 + log(k)``,
            as scikit-learn's greedy k-means++).
        seed: seeds the sample and the seeding (results are deterministic for a seed).
        device: where distances are computed (default: cuda if available, else cpu).
        chunk_size: rows per distance matmul; peak memory is ``chunk_size * k`` floats. Default:
            65,536 on a GPU; on the CPU ``2**19 / k`` rows (256..4,096), so the distance block
            stays in cache.
        sample_iter: maximum Lloyd iterations on the in-memory sample (0: none).
        seed_rows: sample rows the seeding uses (default ``max(4096, 10 (k + spare))``).
        oversample: spare centroids seeded, as a fraction of ``k``, and merged away again
            (0: plain greedy k-means++).

    After :meth:`fit`: ``centroids`` ``[k, F]`` float32, ``inertia_`` (sum of squared distances
    of the data to exactly these centroids), ``n_iter_`` (full Lloyd passes run),
    ``n_sample_iter_`` (Lloyd iterations on the sample) and ``timings_`` (seconds per phase).
    """

    # Seeding on m rows keeps their [m, m] distances when that has at most this many entries
    # (128 MiB): k-means++ then reads a few rows per centroid instead of all m rows x F.
    _PAIRWISE_MAX = 2**25
    # Over-relaxation of the Lloyd step (see _lloyd).
    _BETA_MAX = 1.9
    _BETA_GROWTH = 1.25

    def __init__(
        self,
        k: int,
        *,
        max_iter: int = 30,
        tol: float = 1e-4,
        n_init_candidates: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        chunk_size: int | None = None,
        sample_iter: int = 50,
        seed_rows: int | None = None,
        oversample: float = 0.1,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if n_init_candidates is not None and n_init_candidates < 1:
            raise ValueError(f"n_init_candidates must be >= 1, got {n_init_candidates}")
        if sample_iter < 0:
            raise ValueError(f"sample_iter must be >= 0, got {sample_iter}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if oversample < 0:
            raise ValueError(f"oversample must be >= 0, got {oversample}")
        self.k = k
        self.max_iter = max_iter
        self.tol = tol
        self.n_init_candidates = n_init_candidates if n_init_candidates is not None else 2 + int(math.log(k))
        self.seed = seed
        self.device = torch.device(device) if device is not None else _default_device()
        if chunk_size is None:
            chunk_size = 65536 if self.device.type != "cpu" else max(256, min(4096, 2**19 // k))
        self.chunk_size = chunk_size
        self.sample_iter = sample_iter
        self.oversample = oversample
        self.n_spare = math.ceil(oversample * k)
        self.seed_rows = seed_rows if seed_rows is not None else max(4096, 10 * (k + self.n_spare))
        self.centroids: torch.Tensor | None = None
        self.inertia_: float = float("nan")
        self.n_iter_: int = 0
        self.n_sample_iter_: int = 0
        self.timings_: dict[str, float] = {}
        # Internally all rows are shifted by the data mean: the ||x||^2 - 2xc + ||c||^2 trick
        # loses precision in float32 when ||x|| >> ||x - c|| (raw MFCC c0 is in the hundreds).
        self._shift: torch.Tensor | None = None  # [F] float32
        # (centroids, the centred centroids fit measured): (c + shift) - shift rounds, and score()
        # should reproduce inertia_ to the last digit while ``centroids`` is the fitted tensor.
        self._centred: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ data plumbing

    def _rows(self, chunks: ChunkSource, split: bool = True) -> Iterator[torch.Tensor]:
        """Yield ``[<=chunk_size, F]`` float32 tensors on ``self.device`` from any chunk source
        (``split=False``: the source's own chunks, for passes that gain nothing from small ones)."""
        if isinstance(chunks, torch.Tensor):
            source: Iterable[torch.Tensor] = (chunks,)
        elif callable(chunks):
            source = chunks()  # a fresh iterable per pass
        else:
            source = chunks
        for t in source:
            t = torch.as_tensor(t)
            if t.ndim != 2:
                raise ValueError(f"chunks must be 2-D [n, F], got shape {tuple(t.shape)}")
            step = self.chunk_size if split else max(1, t.shape[0])
            for start in range(0, t.shape[0], step):
                yield t[start : start + step].to(self.device, torch.float32)

    def _shifted(self, chunks: ChunkSource) -> Iterator[torch.Tensor]:
        assert self._shift is not None
        for x in self._rows(chunks):
            yield x - self._shift

    def _in_memory(self, x: torch.Tensor) -> PassFn:
        """E-steps over an in-memory (already shifted) ``[n, F]`` tensor, in ``chunk_size`` row views."""
        return lambda c, total_sq: self._e_step(x.split(self.chunk_size), c, total_sq)

    def _streamed(self, chunks: ChunkSource) -> PassFn:
        """E-steps over the data, one pass each."""
        return lambda c, total_sq: self._e_step(self._shifted(chunks), c, total_sq)

    # ------------------------------------------------------------------ Lloyd

    @staticmethod
    def _labels(x: torch.Tensor, c_t: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
        """Nearest centroid ``[n]`` int64 of rows ``x`` ``[n, F]`` (``c_t``: ``[F, k]`` centroids,
        transposed; ``c_sq``: ``[k]`` their squared norms)."""
        # ||x||^2 is the same for every centroid, so it is left out of the argmin. The data are
        # centred (``_shift``), so the expanded form keeps float32 precision.
        return _argmin(torch.addmm(c_sq.unsqueeze(0), x, c_t, beta=1.0, alpha=-2.0), 1)  # [n, k] -> [n]

    def _e_step(self, rows: Iterable[torch.Tensor], c: torch.Tensor, total_sq: torch.Tensor | None = None) -> _PassStats:
        """One pass: assign every (shifted) row to ``c`` ``[k, F]`` and accumulate statistics.

        ``total_sq`` (the rows' ``sum ||x||^2``) is taken as given when a previous pass over the
        same rows measured it."""
        k, f = c.shape
        c_t, c_sq = c.T.contiguous(), c.pow(2).sum(1)
        sums = torch.zeros(k, f, dtype=torch.float64, device=self.device)
        part = torch.empty(k, f, device=self.device)
        counts = torch.zeros(k, dtype=torch.int64, device=self.device)
        measure = total_sq is None
        total_sq = torch.zeros((), dtype=torch.float64, device=self.device) if total_sq is None else total_sq
        for x in rows:
            labels = self._labels(x, c_t, c_sq)
            # float32 within a chunk (a few thousand centred rows), float64 across chunks: exact
            # enough, and no float64 copy of the rows.
            sums += part.zero_().index_add_(0, labels, x)
            counts += torch.bincount(labels, minlength=k)
            if measure:
                total_sq = total_sq + x.pow(2).sum(dtype=torch.float64)
        return _PassStats(sums, counts, total_sq)

    def _m_step(self, stats: _PassStats, c: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, float, float, int]:
        """New centroids from pass statistics; empty clusters take the ``pool`` rows farthest from theirs.

        Like scikit-learn, a re-seeded row is also moved out of its old cluster's sums so the
        update stays a proper mean. A row is only taken from a cluster with more than one
        member, so re-seeding never empties another cluster.

        Returns ``(centroids [k, F] float32, inertia at c, gain, empty clusters)``, where ``gain``
        is ``sum_j n_j ||mean_j - c_j||^2`` over the clusters that were not empty: for the labels
        of this pass, exactly how much moving to the means lowers the inertia.
        """
        sums, counts = stats.sums, stats.counts
        nz = counts > 0
        means = c.double().clone()
        means[nz] = sums[nz] / counts[nz].unsqueeze(1)
        gain = (counts.double() * (means - c.double()).pow(2).sum(1)).sum()
        inertia, gain, n_empty = torch.stack([stats.inertia(c), gain, (~nz).sum().double()]).tolist()  # one sync
        if n_empty:
            sums, counts = sums.clone(), counts.clone()
            pool_sq, c_sq = pool.pow(2).sum(1), c.pow(2).sum(1)
            d = torch.addmm(c_sq.unsqueeze(0), pool, c.T, beta=1.0, alpha=-2.0)  # [p, k]
            labels = _argmin(d, 1)
            dist = d.gather(1, labels.unsqueeze(1)).squeeze(1) + pool_sq
            order = torch.argsort(dist, descending=True).tolist()
            far_lab = labels.tolist()
            j = 0
            for e in torch.nonzero(~nz).flatten().tolist():
                while j < len(order) and int(counts[far_lab[order[j]]]) <= 1:
                    j += 1
                if j == len(order):
                    break  # fewer usable rows than empty clusters: leave the rest where they are
                row, old = pool[order[j]].double(), far_lab[order[j]]
                sums[old] -= row
                counts[old] -= 1
                sums[e] = row
                counts[e] = 1
                j += 1
            nz = counts > 0
            means[nz] = sums[nz] / counts[nz].unsqueeze(1)
        return means.to(torch.float32), inertia, gain, int(n_empty)

    def _lloyd(self, run_pass: PassFn, c: torch.Tensor, iters: int, pool: torch.Tensor) -> _LloydResult:
        """Up to ``iters`` over-relaxed Lloyd iterations from ``c`` ``[k, F]``; ``run_pass(c, total_sq)``
        is one E-step over the data, ``pool`` the rows that re-seed empty clusters.

        Each step moves to ``c + beta (mean - c)``: ``beta`` grows by ``_BETA_GROWTH`` per step up
        to ``_BETA_MAX`` and falls back to 1 (the plain step) whenever the inertia measured at the
        over-relaxed centroids is above the bound the plain step guaranteed (adaptive over-relaxed
        bound optimisation, Salakhutdinov & Roweis 2003). Lloyd crawls along flat directions of the
        inertia; on this project's MFCC-like frames the over-relaxed steps reach a given inertia in
        0.5-0.7 times the iterations.
        Stops when a step's gain is at most ``tol`` times the inertia, with no empty cluster.
        """
        inf = float("inf")
        beta, bound, plain, relaxed = 1.0, inf, c, False
        best_bound, start, counts = inf, c, torch.zeros(c.shape[0], dtype=torch.int64, device=self.device)
        measured: tuple[torch.Tensor, float] | None = None
        total_sq: torch.Tensor | None = None
        it = 0
        for it in range(1, iters + 1):
            stats = run_pass(c, total_sq)
            total_sq = stats.total_sq  # the same rows every pass: measured once
            new, inertia, gain, n_empty = self._m_step(stats, c, pool)
            if n_empty == 0 and (measured is None or inertia < measured[1]):
                measured = (c, inertia)
            if inertia - gain < best_bound:
                best_bound, start, counts = inertia - gain, new, stats.counts
            if relaxed and inertia > bound:
                # The over-relaxed step did worse than the plain step was sure to: take that one.
                c, beta, relaxed = plain, 1.0, False
                continue
            if n_empty == 0 and gain <= self.tol * max(inertia, 1e-30):
                break
            # (with empty clusters the gain leaves out the re-seeded ones, which only lower it more)
            plain, bound = new, inertia - gain
            relaxed = n_empty == 0 and beta > 1.0
            c = c + beta * (new - c) if relaxed else new
            beta = min(beta * self._BETA_GROWTH, self._BETA_MAX)
        return _LloydResult(start, counts, measured, it)

    # ------------------------------------------------------------------ initialisation

    def _sample_pass(self, chunks: ChunkSource, init_sample: int, gen: torch.Generator) -> torch.Tensor:
        """First pass: data mean (sets ``_shift``) and a uniform sample of ``<= init_sample`` rows.

        Returns the sample ``[m, F]`` float32 on ``self.device``, not yet shifted, in a random
        order (so any prefix of it is a uniform sample too).
        """
        # Uniform sampling without replacement in one pass: give every row an i.i.d. uniform
        # key and keep the rows with the smallest keys (a vectorised reservoir). Once the kept
        # pieces hold 2 x init_sample rows they are cut to the init_sample smallest keys, and
        # from then on a chunk only contributes its rows below that cut: each row is copied O(1)
        # times, most rows never.
        keys: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        pending, n, cut = 0, 0, float("inf")
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for x in self._rows(chunks, split=False):
            # float32 column sums (a matrix-vector product's speed), float64 across chunks; the
            # shift only has to centre the data roughly.
            total = total + x.sum(0).double()
            n += x.shape[0]
            key = torch.rand(x.shape[0], generator=gen, dtype=torch.float64).to(self.device)
            if cut < float("inf"):
                keep = key < cut
                key, x = key[keep], x[keep]
            keys.append(key)
            rows.append(x)
            pending += x.shape[0]
            if pending >= 2 * init_sample:
                all_keys = torch.cat(keys)
                cut = float(torch.kthvalue(all_keys, init_sample).values)
                rows = [torch.cat([r[k <= cut] for k, r in zip(keys, rows)])]
                keys = [all_keys[all_keys <= cut]]
                pending = keys[0].shape[0]
        if n == 0:
            raise ValueError("fit() got no data")
        if n < self.k:
            raise ValueError(f"need at least k={self.k} rows, got {n}")
        self._shift = (total / n).to(torch.float32)
        all_keys = torch.cat(keys)
        # Sorted by key, so the sample's row order (and thus the seeding) does not depend on how
        # the pieces arrived; any prefix of it is a uniform sample.
        order = torch.argsort(all_keys)[:init_sample]
        return (rows[0] if len(rows) == 1 else torch.cat(rows))[order]

    def _greedy_pp(self, x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        """Greedy k-means++ (Arthur & Vassilvitskii, as in scikit-learn) on rows ``x`` ``[m, F]``:
        ``[k, F]`` centroids chosen among the rows.

        Each step draws ``n_init_candidates`` rows with probability proportional to their squared
        distance to the chosen centroids and keeps the one that lowers the potential most. The
        random numbers are drawn up front and the choice stays on the device: no host sync.
        """
        m, t = x.shape[0], self.n_init_candidates
        x_sq = x.pow(2).sum(1)
        if m * m <= self._PAIRWISE_MAX:
            pair = _sq_dist(x, x_sq, x, x_sq)  # [m, m], one matmul

            def dist_to(idx: torch.Tensor) -> torch.Tensor:
                return pair[idx]
        else:

            def dist_to(idx: torch.Tensor) -> torch.Tensor:
                return _sq_dist(x[idx], x_sq[idx], x, x_sq)

        r = torch.rand(k, t, generator=gen, dtype=torch.float64).to(self.device)
        chosen = torch.empty(k, dtype=torch.int64, device=self.device)
        chosen[:1] = (r[0, :1] * m).long().clamp_(max=m - 1)  # the first one uniformly
        closest = dist_to(chosen[:1])[0].double()  # [m]
        for i in range(1, k):
            # float64 cumsum: with many rows a float32 running sum is too coarse for sampling.
            cum = torch.cumsum(closest, 0)
            cand = torch.searchsorted(cum, r[i] * cum[-1]).clamp_(max=m - 1)  # [t]
            cand_closest = torch.minimum(closest.unsqueeze(0), dist_to(cand).double())  # [t, m]
            best = cand_closest.sum(1).argmin()
            chosen[i] = cand[best]
            closest = cand_closest[best]
        return x[chosen]

    def _ward_merge(self, c: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
        """Merge the pair of clusters whose merge raises the inertia least, until ``k`` remain.

        For fixed labels, merging clusters ``i`` and ``j`` (centroids ``c`` ``[k', F]``, sizes
        ``counts`` ``[k']``) raises the inertia by exactly ``n_i n_j / (n_i + n_j) ||c_i - c_j||^2``
        (Ward); empty clusters cost nothing and go first. Returns ``[k, F]`` float32.
        """
        c, n = c.double(), counts.double()
        inf = float("inf")
        alive = torch.ones(c.shape[0], dtype=torch.bool, device=self.device)
        sq = c.pow(2).sum(1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * c @ c.T).clamp_min_(0.0)
        cost = n.unsqueeze(1) * n.unsqueeze(0) / (n.unsqueeze(1) + n.unsqueeze(0)).clamp_min(1.0) * d  # [k', k']
        cost.fill_diagonal_(inf)
        for _ in range(c.shape[0] - k):
            i, j = divmod(int(_argmin(cost)), cost.shape[1])
            c[i] = (n[i] * c[i] + n[j] * c[j]) / (n[i] + n[j]).clamp_min(1.0)
            n[i] += n[j]
            alive[j] = False
            cost[j, :] = inf
            cost[:, j] = inf
            row = n[i] * n / (n[i] + n).clamp_min(1.0) * (c - c[i]).pow(2).sum(1)
            row = row.masked_fill_(~alive, inf)
            row[i] = inf
            cost[i, :] = row
            cost[:, i] = row
        return c[alive].to(torch.float32)

    def _init_centroids(self, sample: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``[k, F]`` float32 initial centroids from the (shifted, randomly ordered) ``sample`` ``[m, F]``.

        Greedy k-means++ picks ``k + spare`` centroids on the first ``seed_rows`` rows; a few Lloyd
        iterations there, then Ward merges down to ``k``.
        """
        s = sample[: max(self.k, self.seed_rows)]
        k2 = min(self.k + self.n_spare, s.shape[0])
        c = self._greedy_pp(s, k2, gen)
        if k2 == self.k:
            return c.to(torch.float32)
        res = self._lloyd(self._in_memory(s), c.to(torch.float32), 5, s)
        return self._ward_merge(res.start, res.counts, self.k)

    # ------------------------------------------------------------------ fit

    def _tick(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a handful per fit, only for the phase timings
        return time.perf_counter()

    @torch.no_grad()
    def fit(self, chunks: ChunkSource, *, init_sample: int = 100_000) -> StreamingKMeans:
        """Fit on streamed data.

        Args:
            chunks: zero-arg callable returning a fresh iterable of ``[n_i, F]`` float tensors;
                it is called once per pass (1 sampling pass + up to ``max_iter`` Lloyd passes).
                A single tensor or a re-iterable (e.g. a list) also works.
            init_sample: rows sampled uniformly in the first pass, for the seeding and the
                Lloyd iterations in memory (memory: ``init_sample x F`` floats).
        """
        if isinstance(chunks, Iterator):
            # A generator would silently be empty from the second pass on.
            raise TypeError("fit() reads the data several times: pass a callable returning a fresh iterable")
        if init_sample < self.k:
            raise ValueError(f"init_sample must be >= k={self.k}, got {init_sample}")
        gen = torch.Generator().manual_seed(self.seed)
        t0 = self._tick()
        sample = self._sample_pass(chunks, init_sample, gen)
        assert self._shift is not None
        sample -= self._shift
        t1 = self._tick()
        c = self._init_centroids(sample, gen)
        t2 = self._tick()
        pool = sample[: max(self.k, self.seed_rows)]  # the rows that re-seed empty clusters
        if self.sample_iter:
            res = self._lloyd(self._in_memory(sample), c, self.sample_iter, pool)
            c, self.n_sample_iter_ = res.start, res.iters
        # Only the re-seeding rows stay in memory for the full passes.
        pool = pool.clone()
        del sample
        t3 = self._tick()

        res = self._lloyd(self._streamed(chunks), c, self.max_iter, pool)
        self.n_iter_ = res.iters
        if res.measured is not None:
            # The centroids a pass measured (the best one), so inertia_ is exact for them.
            c, inertia = res.measured
        else:
            # Every pass had empty clusters: take the re-seeded centroids and score them.
            c = res.start
            inertia = float(self._e_step(self._shifted(chunks), c).inertia(c))
        self.centroids = c + self._shift
        self._centred = (self.centroids, c)
        self.inertia_ = inertia
        t4 = self._tick()
        self.timings_ = {"sample_pass": t1 - t0, "seeding": t2 - t1, "sample_lloyd": t3 - t2, "full_passes": t4 - t3}
        return self

    # ------------------------------------------------------------------ inference

    def _check_fitted(self) -> torch.Tensor:
        if self.centroids is None or self._shift is None:
            raise RuntimeError("StreamingKMeans is not fitted")
        if self._centred is not None and self._centred[0] is self.centroids:
            return self._centred[1].to(self.device)
        return self.centroids.to(self.device) - self._shift.to(self.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid unit of each row: ``[n, F]`` -> ``[n]`` int64 (on ``x``'s device)."""
        c = self._check_fitted()
        c_t, c_sq = c.T.contiguous(), c.pow(2).sum(1)
        out = [self._labels(xc, c_t, c_sq) for xc in self._shifted(x)]
        labels = torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=self.device)
        return labels.to(torch.as_tensor(x).device)

    @torch.no_grad()
    def score(self, chunks: ChunkSource) -> float:
        """Total inertia (sum of squared distances to the nearest centroid) over ``chunks``."""
        c = self._check_fitted()
        return float(self._e_step(self._shifted(chunks), c).inertia(c))

    def cluster_usage(self, labels: torch.Tensor) -> dict:
        """How evenly units are used: ``labels`` ``[n]`` -> used count, perplexity, largest share.

        Perplexity is ``exp(entropy)`` of the unit distribution: ``k`` for uniform use, 1 when a
        single unit takes everything.
        """
        counts = torch.bincount(torch.as_tensor(labels).flatten().long().cpu(), minlength=self.k).double()
        p = counts / counts.sum().clamp_min(1.0)
        nz = p[p > 0]
        return {
            "used": int((counts > 0).sum()),
            "k": self.k,
            "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
            "max_fraction": float(p.max()) if p.numel() else 0.0,
        }


# ---------------------------------------------------------------------- unit-quality metrics


def _joint_counts(units: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Joint count table ``[n_labels, n_units]`` over positions with ``label >= 0``."""
    u = np.asarray(units.cpu() if isinstance(units, torch.Tensor) else units).reshape(-1)
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if u.shape != lab.shape:
        raise ValueError(f"units and labels differ in length: {u.shape[0]} vs {lab.shape[0]}")
    keep = lab >= 0  # negative labels mark padding / unaligned frames
    u, lab = u[keep], lab[keep]
    _, ui = np.unique(u, return_inverse=True)
    _, li = np.unique(lab, return_inverse=True)
    n_u, n_l = (int(ui.max()) + 1, int(li.max()) + 1) if u.size else (0, 0)
    return np.bincount(li * n_u + ui, minlength=n_l * n_u).reshape(n_l, n_u).astype(np.float64)


def pnmi(units: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Phone-normalised mutual information ``I(label; unit) / H(label)`` (HuBERT, Sec. IV-F).

    Args:
        units: ``[n]`` discrete units (e.g. k-means labels of frames).
        labels: ``[n]`` reference labels (e.g. frame-level phones); positions with ``label < 0``
            are ignored.
    Returns:
        A value in ``[0, 1]``: the fraction of label uncertainty removed by knowing the unit.
        0.0 when there is no data or the label is constant (nothing to explain).
    """
    joint = _joint_counts(units, labels)
    n = joint.sum()
    if n == 0:
        return 0.0
    p = joint / n
    p_l = p.sum(1)
    p_u = p.sum(0)
    h_l = -float(np.sum(p_l[p_l > 0] * np.log(p_l[p_l > 0])))
    if h_l <= 0:
        return 0.0
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(p_l, p_u)[nz])))
    return mi / h_l


def purity(units: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Phone purity (HuBERT): mean over frames of ``max_l P(label=l | unit)`` = sum_u max_l n(l,u) / n.

    Positions with ``label < 0`` are ignored; 0.0 when there is no data.
    """
    joint = _joint_counts(units, labels)
    n = joint.sum()
    return float(joint.max(0).sum() / n) if n > 0 else 0.0
