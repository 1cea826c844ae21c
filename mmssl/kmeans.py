"""Streaming k-means in torch, for HuBERT discrete-unit targets.

HuBERT clusters MFCC (iteration 1) or hidden-layer features (later iterations) of a
whole corpus into ``k`` units. The corpus rarely fits in memory, so :class:`StreamingKMeans`
only ever sees the data through a callable that yields chunks, one pass per Lloyd
iteration, and keeps nothing bigger than ``[k, F]`` statistics plus an ``init_sample`` row
sample for the k-means++ initialisation.

Also here: :func:`pnmi` and :func:`purity`, the unit-quality metrics of the HuBERT paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["StreamingKMeans", "pnmi", "purity"]

ChunkSource = Callable[[], Iterable[torch.Tensor]] | Iterable[torch.Tensor] | torch.Tensor


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _PassStats:
    """What one E-step pass over the data accumulates."""

    sums: torch.Tensor  # [k, F] float64, per-cluster sum of (shifted) rows
    counts: torch.Tensor  # [k] int64
    inertia: float
    far_x: torch.Tensor  # [m, F] float32, the m rows farthest from their centroid, descending
    far_d: torch.Tensor  # [m] float32, their squared distances
    far_lab: torch.Tensor  # [m] int64, their clusters


class StreamingKMeans:
    """Lloyd k-means over data streamed in chunks, with greedy k-means++ initialisation.

    Args:
        k: number of clusters.
        max_iter: maximum number of Lloyd passes over the data.
        tol: stop when the relative inertia change between two passes is below this.
        n_init_candidates: k-means++ candidates tried per centroid (default ``2 + log(k)``,
            as scikit-learn's greedy k-means++).
        seed: seeds the initial sample and k-means++ (results are deterministic for a seed).
        device: where distances are computed (default: cuda if available, else cpu).
        chunk_size: rows per distance matmul; bounds peak memory at ``chunk_size * k`` floats.

    After :meth:`fit`: ``centroids`` ``[k, F]`` float32, ``inertia_`` (sum of squared
    distances of the data to exactly these centroids), ``n_iter_`` (Lloyd passes run).
    """

    def __init__(
        self,
        k: int,
        *,
        max_iter: int = 30,
        tol: float = 1e-4,
        n_init_candidates: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        chunk_size: int = 65536,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if n_init_candidates is not None and n_init_candidates < 1:
            raise ValueError(f"n_init_candidates must be >= 1, got {n_init_candidates}")
        self.k = k
        self.max_iter = max_iter
        self.tol = tol
        self.n_init_candidates = n_init_candidates if n_init_candidates is not None else 2 + int(math.log(k))
        self.seed = seed
        self.device = torch.device(device) if device is not None else _default_device()
        self.chunk_size = chunk_size
        self.centroids: torch.Tensor | None = None
        self.inertia_: float = float("nan")
        self.n_iter_: int = 0
        # Internally all rows are shifted by the data mean: the ||x||^2 - 2xc + ||c||^2 trick
        # loses precision in float32 when ||x|| >> ||x - c|| (raw MFCC c0 is in the hundreds).
        self._shift: torch.Tensor | None = None  # [F] float32

    # ------------------------------------------------------------------ data plumbing

    def _rows(self, chunks: ChunkSource) -> Iterator[torch.Tensor]:
        """Yield ``[<=chunk_size, F]`` float32 tensors on ``self.device`` from any chunk source."""
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
            for start in range(0, t.shape[0], self.chunk_size):
                yield t[start : start + self.chunk_size].to(self.device, torch.float32)

    def _shifted(self, chunks: ChunkSource) -> Iterator[torch.Tensor]:
        assert self._shift is not None
        for x in self._rows(chunks):
            yield x - self._shift

    # ------------------------------------------------------------------ distances

    @staticmethod
    def _assign(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of each row.

        Args:
            x: ``[n, F]`` rows; c: ``[k, F]`` centroids; c_sq: ``[k]`` squared centroid norms.
        Returns:
            labels ``[n]`` int64 and exact squared distances ``[n]`` float32 to those centroids.
        """
        # ||x||^2 is constant per row, so it is not needed for the argmin.
        d = torch.addmm(c_sq.unsqueeze(0), x, c.T, beta=1.0, alpha=-2.0)  # [n, k]
        labels = d.argmin(dim=1)
        # Recompute the winning distance directly: the expanded form cancels badly and can go
        # negative, and the inertia we report should be the true sum of squares.
        dist = (x - c[labels]).pow(2).sum(dim=1)
        return labels, dist

    # ------------------------------------------------------------------ initialisation

    def _sample_pass(self, chunks: ChunkSource, init_sample: int, gen: torch.Generator) -> torch.Tensor:
        """First pass: data mean (sets ``_shift``) and a uniform sample of ``<= init_sample`` rows.

        Returns the sample ``[m, F]`` float32 on ``self.device``, not yet shifted.
        """
        # Uniform sampling without replacement in one pass: give every row an i.i.d. uniform
        # key and keep the rows with the smallest keys (a vectorised reservoir). Pieces are only
        # merged once they hold 2 x init_sample rows, so each row is copied O(1) times.
        keys: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        pending = 0
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        for x in self._rows(chunks):
            total = total + x.sum(0, dtype=torch.float64)
            n += x.shape[0]
            keys.append(torch.rand(x.shape[0], generator=gen).to(self.device))
            rows.append(x)
            pending += x.shape[0]
            if pending >= 2 * init_sample:
                all_keys = torch.cat(keys)
                keep = torch.topk(all_keys, init_sample, largest=False).indices
                keys, rows = [all_keys[keep]], [torch.cat(rows)[keep]]
                pending = init_sample
        if n == 0:
            raise ValueError("fit() got no data")
        if n < self.k:
            raise ValueError(f"need at least k={self.k} rows, got {n}")
        self._shift = (total / n).to(torch.float32)
        all_keys = torch.cat(keys)
        # Sorted by key, so the sample's row order (and thus k-means++) does not depend on how
        # topk happens to order its output.
        order = torch.argsort(all_keys)[:init_sample]
        return torch.cat(rows)[order]

    def _init_centroids(self, sample: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Greedy k-means++ (Arthur & Vassilvitskii, as in scikit-learn) on ``sample`` ``[m, F]``.

        Each step draws ``n_init_candidates`` points with probability proportional to their
        squared distance to the chosen centroids and keeps the one that lowers the potential
        most. Returns ``[k, F]`` float32 centroids (in the same coordinates as ``sample``).
        """
        m = sample.shape[0]
        x_sq = sample.pow(2).sum(1)  # [m]

        def sq_dist(rows: torch.Tensor) -> torch.Tensor:  # [t, F] -> [t, m]
            d = x_sq.unsqueeze(0) - 2.0 * rows @ sample.T + rows.pow(2).sum(1, keepdim=True)
            return d.clamp_min_(0.0)

        first = int(torch.randint(m, (1,), generator=gen))
        centers = [sample[first]]
        closest = sq_dist(sample[first : first + 1])[0].double()  # [m]
        potential = closest.sum()
        for _ in range(1, self.k):
            # float64 cumsum: with 1e5 rows a float32 running sum is too coarse for sampling.
            cum = torch.cumsum(closest, 0)
            r = (
                torch.rand(self.n_init_candidates, generator=gen, dtype=torch.float64).to(self.device)
                * potential
            )
            cand = torch.searchsorted(cum, r).clamp_(max=m - 1)
            cand_closest = torch.minimum(closest.unsqueeze(0), sq_dist(sample[cand]).double())  # [t, m]
            cand_pot = cand_closest.sum(1)
            best = int(cand_pot.argmin())
            centers.append(sample[cand[best]])
            closest, potential = cand_closest[best], cand_pot[best]
        return torch.stack(centers).to(torch.float32)

    # ------------------------------------------------------------------ Lloyd

    def _e_step(self, chunks: ChunkSource, c: torch.Tensor) -> _PassStats:
        """One pass: assign every row to ``c`` (shifted coords) and accumulate statistics."""
        k, f = c.shape
        c_sq = c.pow(2).sum(1)
        sums = torch.zeros(k, f, dtype=torch.float64, device=self.device)
        counts = torch.zeros(k, dtype=torch.int64, device=self.device)
        inertia = torch.zeros((), dtype=torch.float64, device=self.device)
        # Keep the k farthest rows seen so far: enough to re-seed even if every cluster empties.
        far_x = torch.empty(0, f, device=self.device)
        far_d = torch.empty(0, device=self.device)
        far_lab = torch.empty(0, dtype=torch.int64, device=self.device)
        for x in self._shifted(chunks):
            labels, dist = self._assign(x, c, c_sq)
            sums.index_add_(0, labels, x.double())
            counts += torch.bincount(labels, minlength=k)
            inertia += dist.sum(dtype=torch.float64)
            top = torch.topk(dist, min(k, dist.shape[0])).indices
            far_x, far_d, far_lab = (
                torch.cat([far_x, x[top]]),
                torch.cat([far_d, dist[top]]),
                torch.cat([far_lab, labels[top]]),
            )
            keep = torch.topk(far_d, min(k, far_d.shape[0])).indices  # sorted, descending
            far_x, far_d, far_lab = far_x[keep], far_d[keep], far_lab[keep]
        return _PassStats(sums, counts, float(inertia), far_x, far_d, far_lab)

    @staticmethod
    def _m_step(stats: _PassStats, c: torch.Tensor) -> torch.Tensor:
        """New centroids from pass statistics; empty clusters take the farthest rows.

        Like scikit-learn, a re-seeded row is also moved out of its old cluster's sums so the
        update stays a proper mean. A row is only taken from a cluster with more than one
        member, so re-seeding never empties another cluster.
        """
        sums, counts = stats.sums.clone(), stats.counts.clone()
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            far_lab = stats.far_lab.tolist()
            j = 0
            for e in empty:
                while j < len(far_lab) and int(counts[far_lab[j]]) <= 1:
                    j += 1
                if j == len(far_lab):
                    break  # fewer usable rows than empty clusters: leave the rest where they are
                old = far_lab[j]
                sums[old] -= stats.far_x[j].double()
                counts[old] -= 1
                sums[e] = stats.far_x[j].double()
                counts[e] = 1
                j += 1
        new = c.clone()
        nz = counts > 0
        new[nz] = (sums[nz] / counts[nz].unsqueeze(1)).to(torch.float32)
        return new

    @torch.no_grad()
    def fit(self, chunks: ChunkSource, *, init_sample: int = 100_000) -> StreamingKMeans:
        """Fit on streamed data.

        Args:
            chunks: zero-arg callable returning a fresh iterable of ``[n_i, F]`` float tensors;
                it is called once per pass (1 sampling pass + up to ``max_iter`` Lloyd passes).
                A single tensor or a re-iterable (e.g. a list) also works.
            init_sample: rows sampled uniformly in the first pass for k-means++.
        """
        if isinstance(chunks, Iterator):
            # A generator would silently be empty from the second pass on.
            raise TypeError("fit() reads the data several times: pass a callable returning a fresh iterable")
        if init_sample < self.k:
            raise ValueError(f"init_sample must be >= k={self.k}, got {init_sample}")
        gen = torch.Generator().manual_seed(self.seed)
        sample = self._sample_pass(chunks, init_sample, gen)
        assert self._shift is not None
        c = self._init_centroids(sample - self._shift, gen)
        del sample

        prev: float | None = None
        for it in range(1, self.max_iter + 1):
            stats = self._e_step(chunks, c)
            self.n_iter_ = it
            has_empty = bool((stats.counts == 0).any())
            converged = prev is not None and abs(prev - stats.inertia) <= self.tol * max(stats.inertia, 1e-30)
            if (converged or it == self.max_iter) and not has_empty:
                # Stop before the M-step so inertia_ describes exactly the centroids we keep.
                inertia = stats.inertia
                break
            c = self._m_step(stats, c)
            prev = stats.inertia
        else:
            # Last pass still had empty clusters: they were re-seeded, so score the result.
            inertia = self._e_step(chunks, c).inertia
        self.centroids = c + self._shift
        self.inertia_ = inertia
        return self

    # ------------------------------------------------------------------ inference

    def _check_fitted(self) -> torch.Tensor:
        if self.centroids is None or self._shift is None:
            raise RuntimeError("StreamingKMeans is not fitted")
        return self.centroids.to(self.device) - self._shift.to(self.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid unit of each row: ``[n, F]`` -> ``[n]`` int64 (on ``x``'s device)."""
        c = self._check_fitted()
        c_sq = c.pow(2).sum(1)
        out = [self._assign(xc, c, c_sq)[0] for xc in self._shifted(x)]
        labels = torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=self.device)
        return labels.to(torch.as_tensor(x).device)

    @torch.no_grad()
    def score(self, chunks: ChunkSource) -> float:
        """Total inertia (sum of squared distances to the nearest centroid) over ``chunks``."""
        c = self._check_fitted()
        c_sq = c.pow(2).sum(1)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for x in self._shifted(chunks):
            total += self._assign(x, c, c_sq)[1].sum(dtype=torch.float64)
        return float(total)

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
