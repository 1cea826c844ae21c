"""Utterance-level topic targets from discrete units (HuBERTopic, Maekaku et al., 2023).

Each training item is a document whose words are its units; latent Dirichlet allocation
(scikit-learn's, batch variational Bayes) over the items' bags of units gives each item a topic
mixture, and its most probable topic is its label. Fitted once per unit table and cached beside
mmssl's unit tables (``<units>-<hash>.topics-T<T>-s<seed>-i<iters>-<assign>.safetensors`` + ``.json``)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import save_file

from mmssl.errors import BadFileError, read_json_object, read_safetensors

SampleUnits = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # -> (sample ids [B], units [B, N])


class TopicTable(torch.nn.Module):
    """The topic label of each training sample id, as non-persistent buffers (rebuilt from the cache)."""

    def __init__(self, sample_ids: torch.Tensor, topics: torch.Tensor, meta: dict[str, Any]) -> None:
        super().__init__()
        n = int(sample_ids.max()) + 1 if sample_ids.numel() else 0
        row = torch.full((n,), -1, dtype=torch.long)
        row[sample_ids.long()] = torch.arange(sample_ids.numel())
        self.register_buffer("row", row, persistent=False)
        self.register_buffer("topics", topics.long(), persistent=False)
        self.meta = meta

    def lookup(self, sample_id: torch.Tensor) -> torch.Tensor:
        """sample_id: [B] -> topic labels [B] int64."""
        sid = sample_id.long().clamp(0, max(self.row.numel() - 1, 0))
        r = self.row[sid]
        torch._assert_async(((sample_id < self.row.numel()) & (r >= 0)).all(),
                            "a training sample has no topic label: the topics were fitted on other data")
        return self.topics[r.clamp_min(0)]


def bag_of_units(sample_units: SampleUnits, k: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (sample ids [S], counts [S, k] float64: how often each unit occurs in each item)."""
    ids, rows = [], []
    for sid, units in sample_units():
        units = units.cpu().long()
        real = units >= 0
        counts = torch.zeros(units.shape[0], k, dtype=torch.float64)
        counts.scatter_add_(1, units.clamp_min(0), real.double())
        ids.append(sid.cpu().long())
        rows.append(counts)
    if not ids:
        raise ValueError("the train split has no items to fit topics on")
    return torch.cat(ids).numpy(), torch.cat(rows).numpy()


def fit_topics(counts: np.ndarray, topics: int, seed: int = 0, max_iter: int = 20) -> np.ndarray:
    """counts [S, k] -> each item's most probable topic [S] int64 under an LDA with ``topics`` topics."""
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import LatentDirichletAllocation

    lda = LatentDirichletAllocation(n_components=topics, learning_method="batch", max_iter=max_iter,
                                    random_state=seed)
    mix = lda.fit_transform(csr_matrix(counts))
    return mix.argmax(1).astype(np.int64)


def _usage(labels: np.ndarray, topics: int) -> dict[str, Any]:
    p = np.bincount(labels, minlength=topics) / max(len(labels), 1)
    nz = p[p > 0]
    return {"used": int((p > 0).sum()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
            "max_fraction": float(p.max()) if len(p) else 0.0}


def topics_path(cache_root: Path, units_dir: Path, topics: int, seed: int, assign: str, max_iter: int) -> Path:
    """Where the topics of the units in ``units_dir`` are cached: beside mmssl's own unit tables (never
    inside a user's ``targets_dir``), named by everything that makes them."""
    where = hashlib.sha1(str(Path(units_dir).resolve()).encode()).hexdigest()[:8]
    return Path(cache_root) / f"{Path(units_dir).name}-{where}.topics-T{topics}-s{seed}-i{max_iter}-{assign}"


def fit_or_load_topics(sample_units: SampleUnits, stem: Path, k: int, topics: int, seed: int = 0,
                       max_iter: int = 20, is_main: bool = True,
                       barrier: Callable[[], None] = lambda: None) -> TopicTable:
    """The topic table cached at ``stem`` (``topics_path``): fitted by the main rank on the first call
    (written atomically), read afterwards; a cached table of other units (k, item count) is refused."""
    weights, meta_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    if is_main and not meta_path.exists():
        stem.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(stem) + ".lock"):
            if not meta_path.exists():
                ids, counts = bag_of_units(sample_units, k)
                labels = fit_topics(counts, topics, seed, max_iter)
                meta = {"topics": topics, "seed": seed, "max_iter": max_iter, "k": k, "num_samples": len(ids),
                        **_usage(labels, topics)}
                tmp = weights.with_name(weights.name + ".tmp")
                save_file({"sample_ids": torch.from_numpy(ids), "topics": torch.from_numpy(labels)}, str(tmp))
                os.replace(tmp, weights)
                tmp = meta_path.with_name(meta_path.name + ".tmp")
                tmp.write_text(json.dumps(meta, indent=2))
                os.replace(tmp, meta_path)  # last: its presence says the pair is whole
    barrier()
    meta = read_json_object(meta_path, "a topic table's meta", ("topics", "k"))
    if int(meta["k"]) != k or int(meta["topics"]) != topics:
        raise BadFileError(meta_path, f"holds {meta['topics']} topics over k={meta['k']} units, this run "
                                      f"wants {topics} over k={k}: delete it to refit")
    t = read_safetensors(weights, "a topic table")
    if "sample_ids" not in t or "topics" not in t:
        raise BadFileError(weights, "lacks sample_ids or topics (expected a topic table)")
    return TopicTable(t["sample_ids"], t["topics"], meta)
