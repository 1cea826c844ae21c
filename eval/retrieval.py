"""Cross-modal retrieval of a contrastive pair (CLIP's protocol): Recall@K in both directions.

Each item of a split is a pair (a_i, b_i), embedded by the two towers into the shared space. In
``i2t`` every a_i queries all b_j; in ``t2i`` every b_i queries all a_j (``a`` is the first modality of
``modality=[a,b]``, which plays "image"). A query scores a hit at K when one of its K most
cosine-similar gallery items has the query's *key*: items whose captions are identical token
sequences share a key, so retrieving another image with the very same caption counts as correct
(synthetic captions repeat; counting only the item's own partner would punish a perfect model).
Without a text tower the key is ``sample_id``: exact-pair retrieval.

Queries and galleries are deduplicated (``Relevance``): in i2t each distinct file queries the distinct
captions, so a caption shared by many items is one gallery entry and R@5 means five different
captions; in t2i every item's caption queries the distinct files, and a file packed with several
captions (COCO-style rows, ``file_id``) is one gallery entry relevant to each of its captions.

Ties are handled pessimistically, so the metric is deterministic and a collapsed embedding cannot
score by luck: a query's rank is 1 + the number of gallery items with a *different* key whose
similarity is >= that of the best same-key item, less ``TIE_TOL``. Hence R@K = 0 for constant embeddings
whenever more than K - 1 items carry other keys. The tolerance makes identical inputs tie whatever batch
they were embedded in: the same input's embedding differs in its last bits from one batch size to another
(BLAS kernels), and an exact >= then let the batch size decide between identical items.

``run_retrieval`` writes ``out/retrieval.json`` (the six recalls for the trained pair and its step-0
twin ``encoders_init``, mean/median ranks, the recall a random ranking would get given the key
multiplicities, bootstrap intervals of R@1) and ``out/retrieval.png``."""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmssl.data.loader import DataSource, iter_split
from mmssl.eval.protocol import RANDOM_INIT, TEXT_KIND, PairEval, figure
from mmssl.eval.stats import bootstrap_ci

# Queries per chunk are chosen so the [chunk, n] similarity matrix stays near this many elements
# (64 MiB of float32): n = 10k galleries take ~1,700 queries at a time.
_SIM_ELEMENTS = 1 << 24


def caption_keys(ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Group ids of captions: ids int64 [n, L] (padded), lens [n] -> keys int64 [n] in [0, #distinct),
    equal exactly where the first ``lens[i]`` ids are the same sequence (padding is ignored)."""
    if ids.dim() != 2 or lens.shape != (ids.shape[0],):
        raise ValueError(f"caption_keys needs ids [n, L] and lens [n], got {tuple(ids.shape)} and {tuple(lens.shape)}")
    if ids.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    lens = lens.long()
    valid = torch.arange(ids.shape[1]).unsqueeze(0) < lens.unsqueeze(1)
    # -1 beyond the length (never a token id), and the length in front: "a" and "a <pad id 0>" differ
    rows = torch.cat([lens.unsqueeze(1), torch.where(valid, ids.long(), torch.full_like(ids, -1, dtype=torch.long))], 1)
    return torch.unique(rows, dim=0, return_inverse=True)[1]


#: cosine similarities closer than this to a query's best relevant one tie with it (float32 noise is ~1e-7)
TIE_TOL = 1e-5


def first_hit_ranks(query: torch.Tensor, gallery: torch.Tensor, rel_q: torch.Tensor, rel_g: torch.Tensor,
                    chunk: int | None = None) -> torch.Tensor:
    """query [m, E], gallery [n, E]; the relevant (query, gallery) pairs as index lists rel_q [P], rel_g [P]
    -> rank [m] int64 (1 = best) of each query's best-scoring relevant gallery item by cosine similarity,
    ties counted against the query (module doc). Every query needs a relevant item. Chunks of ``chunk``
    queries run on the gallery's device."""
    if not (torch.isfinite(query).all() and torch.isfinite(gallery).all()):
        raise ValueError("retrieval embeddings hold NaN or inf: the encoder diverged")
    dev = gallery.device
    g = F.normalize(gallery.float(), dim=1)
    m, n = query.shape[0], gallery.shape[0]
    step = chunk or max(1, min(m, _SIM_ELEMENTS // max(n, 1)))
    rel_q, rel_g = rel_q.to(dev).long(), rel_g.to(dev).long()
    ranks = torch.empty(m, dtype=torch.long)
    for i in range(0, m, step):
        q = F.normalize(query[i:i + step].to(dev).float(), dim=1)
        sim = q @ g.T  # [c, n]
        inside = (rel_q >= i) & (rel_q < i + q.shape[0])
        same = torch.zeros_like(sim, dtype=torch.bool)
        same[rel_q[inside] - i, rel_g[inside]] = True  # [c, n] relevant gallery items
        if not same.any(1).all():
            raise ValueError("a query has no relevant gallery item")
        best = sim.masked_fill(~same, float("-inf")).amax(1, keepdim=True)  # [c, 1]
        ranks[i:i + step] = (1 + ((sim >= best - TIE_TOL) & ~same).sum(1)).cpu()
    return ranks


def recall_at(ranks: torch.Tensor, ks: Sequence[int], weights: torch.Tensor | None = None) -> dict[int, float]:
    """ranks [n] (and optional query weights [n]) -> {K: (weighted) fraction of queries with rank <= K}."""
    w = torch.ones(ranks.shape, dtype=torch.float64) if weights is None else weights.double()
    return {int(k): float(((ranks <= int(k)).double() * w).sum() / w.sum()) for k in ks}


@dataclass
class Relevance:
    """Who retrieves whom, from each item's caption key and content group (the file it came from).

    i2t: queries = distinct content groups (an image once, however many captions it has), gallery =
    distinct captions (a caption once, however many items share it); relevant = the captions the group
    has. t2i: queries = distinct captions weighted by how many items carry them (every item's caption
    queries, as COCO's protocol does; equal captions give equal queries), gallery = distinct groups;
    relevant = the groups with that caption. Index tensors point at each unique's first item."""

    group_first: torch.Tensor   # [G] item index of each distinct group
    key_first: torch.Tensor     # [C] item index of each distinct caption
    key_count: torch.Tensor     # [C] items per caption (t2i query weights)
    pair_g: torch.Tensor        # [P] group of each distinct (group, caption) pair
    pair_k: torch.Tensor        # [P] caption of that pair

    @classmethod
    def of(cls, keys: torch.Tensor, groups: torch.Tensor) -> Relevance:
        def first(inv: torch.Tensor, k: int) -> torch.Tensor:
            idx = torch.full((k,), keys.numel(), dtype=torch.long)
            return idx.scatter_reduce(0, inv, torch.arange(keys.numel()), "amin")

        _, ginv = torch.unique(groups, return_inverse=True)
        _, kinv, kcount = torch.unique(keys, return_inverse=True, return_counts=True)
        pairs = torch.unique(torch.stack([ginv, kinv], 1), dim=0)
        return cls(first(ginv, int(ginv.max()) + 1), first(kinv, int(kinv.max()) + 1), kcount, pairs[:, 0], pairs[:, 1])

    def chance(self, ks: Sequence[int]) -> dict[str, dict[int, float]]:
        """Expected R@K of a uniformly random ranking per direction: a query with r relevant items
        among n misses the top K with probability C(n-r, K) / C(n, K)."""
        def one(r: torch.Tensor, n: int, w: torch.Tensor | None) -> dict[int, float]:
            out = {}
            for k in ks:
                miss = torch.ones(r.shape, dtype=torch.float64)
                for t in range(min(int(k), n)):
                    miss = miss * ((n - r - t).clamp(min=0) / (n - t))
                hit = 1 - miss
                out[int(k)] = float(hit.mean() if w is None else (hit * w).sum() / w.sum())
            return out

        G, C = self.group_first.numel(), self.key_first.numel()
        per_g = torch.bincount(self.pair_g, minlength=G).double()
        per_k = torch.bincount(self.pair_k, minlength=C).double()
        return {"i2t": one(per_g, C, None), "t2i": one(per_k, G, self.key_count.double())}


def direction_ranks(a: torch.Tensor, b: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor | None = None,
                    chunk: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Paired embeddings a [n, E], b [n, E] (row i of each is one item), caption keys [n], content groups
    [n] (default: every item its own) -> {"i2t": (ranks, None), "t2i": (ranks, query weights)} (see
    ``Relevance``)."""
    if a.shape[0] != b.shape[0] or keys.shape != (a.shape[0],):
        raise ValueError(f"retrieval needs a [n, E], b [n, E], keys [n]; got {tuple(a.shape)}, {tuple(b.shape)}, "
                         f"{tuple(keys.shape)}")
    rel = Relevance.of(keys, torch.arange(keys.numel()) if groups is None else groups)
    ga, kb = rel.group_first.to(a.device), rel.key_first.to(b.device)
    return {"i2t": (first_hit_ranks(a[ga], b[kb], rel.pair_g, rel.pair_k, chunk), None),
            "t2i": (first_hit_ranks(b[kb], a[ga], rel.pair_k, rel.pair_g, chunk), rel.key_count)}


def rank_metrics(ranks: dict[str, tuple[torch.Tensor, torch.Tensor | None]], ks: Sequence[int],
                 prefix: str = "") -> dict[str, float]:
    """{direction: (ranks [q], weights [q] | None)} -> {prefix+direction_R@K, ..._mean_rank,
    ..._median_rank} (weights count each query that many times)."""
    out: dict[str, float] = {}
    for name, (r, w) in ranks.items():
        out.update({f"{prefix}{name}_R@{k}": v for k, v in recall_at(r, ks, w).items()})
        flat = r if w is None else r.repeat_interleave(w.long())
        out[f"{prefix}{name}_mean_rank"] = float(flat.double().mean())
        out[f"{prefix}{name}_median_rank"] = float(flat.double().quantile(0.5))
    return out


def retrieval_metrics(a: torch.Tensor, b: torch.Tensor, keys: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                      groups: torch.Tensor | None = None, chunk: int | None = None) -> dict[str, float]:
    """Paired embeddings a [n, E], b [n, E], caption keys [n] (and content groups [n]) -> ``{i2t_R@K,
    t2i_R@K for K in ks, i2t_mean_rank, i2t_median_rank, t2i_mean_rank, t2i_median_rank}`` (``Relevance``)."""
    return rank_metrics(direction_ranks(a, b, keys, groups, chunk), ks)


# -- the evaluator --------------------------------------------------------------------------------------
@torch.no_grad()
def embed_split(pairs: dict[str, Any], source: DataSource, split: str, batch_size: int, device: torch.device,
                max_len: dict[str, int | None], bad: Counter, text: str | None = None) -> dict[str, Any]:
    """One pass over a split, every pair embedding both of its modalities ->
    ``{"emb": {pair name: {m: [n, E] float32 cpu}}, "sample_id": [n], "caption": [n, L], "caption_len": [n]}``
    (the token ids of modality ``text``, the text tower, where given; padded to the longest caption)."""
    emb: dict[str, dict[str, list[torch.Tensor]]] = {p: {} for p in pairs}
    ids: list[torch.Tensor] = []
    fids: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    for batch in iter_split(source, split, batch_size, bad, max_len=max_len):
        b = {k: v.to(device) for k, v in batch.items()}
        for name, pair in pairs.items():
            for m in pair.modalities:
                emb[name].setdefault(m, []).append(pair.embed(m, b).float().cpu())
        ids.append(batch["sample_id"])
        if "file_id" in batch:
            fids.append(batch["file_id"])
        if text is not None and text in batch:
            texts += [row[:int(n)] for row, n in zip(batch[text], batch[f"{text}_len"])]
    if not ids:
        raise ValueError(f"split {split!r} of {source.root} has no usable samples")
    out: dict[str, Any] = {"emb": {p: {m: torch.cat(v) for m, v in e.items()} for p, e in emb.items()},
                           "sample_id": torch.cat(ids)}
    if fids and sum(f.numel() for f in fids) == out["sample_id"].numel():
        out["file_id"] = torch.cat(fids)
    if texts:
        lens = torch.tensor([t.numel() for t in texts], dtype=torch.long)
        padded = torch.zeros(len(texts), int(lens.max()), dtype=torch.long)
        for i, t in enumerate(texts):
            padded[i, :t.numel()] = t
        out["caption"], out["caption_len"] = padded, lens
    return out


def run_retrieval(path: str | Path, out: str | Path, source: DataSource, cfg: dict[str, Any],
                  device: torch.device, batch_size: int = 32, cache_dir: Path | None = None) -> dict[str, Any]:
    """Retrieval between the two towers of the contrastive run ``path`` on split ``cfg["split"]`` of
    ``source`` (a DataSource holding both modalities) -> the result dict, also written to
    ``out/retrieval.json`` and plotted in ``out/retrieval.png``. ``cfg``: split, ks, bootstrap
    (resamples for the R@1 intervals; 0: none), defaults in configs/eval/retrieval.yaml. ``cache_dir`` is
    unused: the embeddings are not cached (one pass over one split)."""
    ev = PairEval("retrieval", path, source, cfg, device)
    pair = ev.pair
    a, b = pair.modalities
    missing = [m for m in (a, b) if m not in source.modalities]
    if missing:
        raise ValueError(f"retrieval of {a}+{b} needs a data set with both; {source.root} is read as "
                         f"{'+'.join(source.modalities)}")
    split = str(ev.ecfg["split"])
    ks = sorted({int(k) for k in ev.ecfg["ks"]})
    if ks[0] < 1:
        raise ValueError(f"eval.ks must be at least 1, got {ks}")
    n_boot = int(ev.ecfg["bootstrap"] or 0)
    text = next(iter(ev.towers(TEXT_KIND)), None)  # captions key the hits

    bad: Counter = Counter()
    data = embed_split(ev.twins, source, split, batch_size, device, {m: pair.input_size(m) for m in pair.modalities},
                       bad, text)
    if text is not None:
        keys, key_kind = caption_keys(data["caption"], data["caption_len"]), "caption"
    else:
        keys, key_kind = data["sample_id"], "sample_id"
    # items packed from one file with several captions (COCO-style rows) are one image, not several
    groups = data.get("file_id", data["sample_id"])
    rel = Relevance.of(keys, groups)

    result: dict[str, Any] = {
        **ev.header(f"{a}+{b}"), "split": split, "ks": ks,
        "key": key_kind,
        "key_note": ("a hit is any gallery item whose caption (token ids as the text tower reads them) equals "
                     "the query's" if key_kind == "caption" else
                     "no text tower: a hit is the query's own partner (exact-pair retrieval)"),
        "ties": "pessimistic: other-key items scoring >= the best same-key item rank before it",
        "protocol": ("i2t: each distinct file (an image once) queries the distinct captions; t2i: every item's "
                     "caption queries the distinct files; relevant = a caption the file carries"),
    }
    for prefix, emb in data["emb"].items():
        ranks = direction_ranks(emb[a].to(device), emb[b].to(device), keys, groups)  # similarities on the device
        result.update(rank_metrics(ranks, ks, prefix))
        if n_boot and prefix == "":  # queries resampled: the interval covers test-set sampling only
            for name, (r, w) in ranks.items():
                hits = (r <= 1).float() if w is None else (r <= 1).float().repeat_interleave(w.long())
                result[f"{name}_R@1_ci95"] = list(bootstrap_ci(hits, n_boot=n_boot))
    for name, per_k in rel.chance(ks).items():
        for k, v in per_k.items():
            result[f"{name}_chance_R@{k}"] = v
    result["chance_R@1"] = result["i2t_chance_R@1"]
    result.update({"n_items": int(keys.numel()), "n_captions": int(keys.unique().numel()),
                   "n_groups": int(rel.group_first.numel()),
                   "skipped_samples": dict(bad), "logit_scale": _float_or_none(getattr(pair, "logit_scale", None))})
    where = ev.write(out, result, plot_retrieval)
    print(f"retrieval ({a}->{b} / {b}->{a}, {result['n_items']} items, {result['n_captions']} distinct "
          f"{key_kind}s): i2t R@1 {result['i2t_R@1']:.3f} | t2i R@1 {result['t2i_R@1']:.3f} | random init "
          f"{result['random_init_i2t_R@1']:.3f} / {result['random_init_t2i_R@1']:.3f} | chance "
          f"{result['chance_R@1']:.3f} -> {where}", file=sys.stdout, flush=True)
    return result


def _float_or_none(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def plot_retrieval(r: dict[str, Any], path: Path) -> None:
    """Grouped bars: R@K of both directions, trained against random init, chance as ticks."""
    ks = r["ks"]
    groups = [(d, k) for d in ("i2t", "t2i") for k in ks]
    width = 0.38
    with figure(path, figsize=(1.2 + 0.9 * len(groups), 3.4)) as ax:
        for j, (prefix, name, colour) in enumerate([("", "trained", "tab:blue"),
                                                    (RANDOM_INIT, "random init", "tab:gray")]):
            xs = [i + (j - 0.5) * width for i in range(len(groups))]
            vals = [r[f"{prefix}{d}_R@{k}"] for d, k in groups]
            ax.bar(xs, vals, width, color=colour, label=name)
            for x, v in zip(xs, vals):
                ax.text(x, v + 0.02, f"{v:.2f}", ha="center", fontsize=7)
        for i, (d, k) in enumerate(groups):
            ax.hlines(r.get(f"{d}_chance_R@{k}", r.get(f"chance_R@{k}", 0.0)), i - 0.45, i + 0.45, colors="k",
                      lw=0.8, ls="--", label="chance" if i == 0 else None)
        a, b = r["modalities"]
        ax.set_xticks(range(len(groups)), [f"{a}→{b}\nR@{k}" if d == "i2t" else f"{b}→{a}\nR@{k}" for d, k in groups])
        ax.set_ylim(0, 1.25)  # room for the legend above the bars
        ax.set_ylabel("recall")
        ax.set_title(f"retrieval, {r['n_items']} items, {r['n_captions']} distinct {r['key']}s ({r['split']})",
                     fontsize=9)
        ax.legend(loc="upper left", fontsize=7, ncol=3)
