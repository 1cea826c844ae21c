"""Data sources and streams.

Training reads the train split as an infinite, resumable stream: each loader worker plays a *role*;
role r of rank k reads round after round, round j being one shard drawn with a generator seeded by
(seed, rank, role, j), shuffled, bucketed by length into batches. So the stream is a function of
(seed, step), every rank gets the same number of batches, and a batch's position (role, round, batch
within round) travels with it, which is all resume needs. webdataset's own node splitter, error
handler and shard-count check are not used (DESIGN.md "Data")."""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmssl.data.shards import BadSample, load_meta, read_samples, split_paths
from mmssl.registry import MODALITIES, PRESETS
from mmssl.types import Batch

#: an input size (image side, text context, audio samples) for every modality, or one per modality
MaxLen = int | None | dict[str, int | None]


def _seed(*parts: Any) -> int:
    return int(hashlib.sha1("-".join(map(str, parts)).encode()).hexdigest()[:15], 16)


@dataclass
class DataSource:
    """A resolved data set: where its shards are, its meta, the codecs of its modalities."""

    root: Path
    meta: dict[str, Any]
    modalities: list[str]

    @property
    def codecs(self) -> dict[str, Any]:
        return {m: MODALITIES.get(m).codec for m in self.modalities}

    @property
    def fingerprint(self) -> str:
        """Identifies the data: generated presets by what made them, packed shards also by location."""
        counts = sorted((s, v.get("count")) for s, v in self.meta["splits"].items())
        where = "" if self.meta.get("generator_version") else str(self.root.resolve())
        return f"{_seed(self.meta.get('name'), self.meta.get('generator_version'), self.meta.get('seed'), counts, where):x}"

    @property
    def num_classes(self) -> int:
        return len(self.meta.get("classes") or [])

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for codec in self.codecs.values():
            item.update(codec.decode(raw))
        try:
            item["sample_id"] = int(raw["sid"])
        except (KeyError, ValueError):
            raise BadSample(f"missing_field: {raw.get('__key__')}: no integer sid") from None
        if "cls" in raw:
            item["label"] = int(raw["cls"])
        if "fid" in raw:  # the source file of a pair packed with several captions (retrieval groups by it)
            item["file_id"] = int(raw["fid"])
        return item

    def length(self, item: dict[str, Any]) -> int:
        return max(c.length(item) for c in self.codecs.values())

    def collate(self, items: list[dict[str, Any]], max_len: MaxLen, g: torch.Generator | None,
                keep_frame_labels: bool = True) -> Batch:
        """``max_len``: one input size for every codec, or one per modality (a pair's towers differ:
        an image side beside a text context)."""
        batch: Batch = {}
        for m, codec in self.codecs.items():
            size = max_len.get(m) if isinstance(max_len, dict) else max_len
            batch.update(codec.collate(items, size, g, keep_frame_labels))
        batch["sample_id"] = torch.tensor([it["sample_id"] for it in items], dtype=torch.long)
        if all("label" in it for it in items):
            batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        if all("file_id" in it for it in items):
            batch["file_id"] = torch.tensor([it["file_id"] for it in items], dtype=torch.long)
        return batch


def paired_preset(modalities: list[str]) -> str:
    """The registered embedded preset whose ``modalities`` are exactly these (e.g. image + text)."""
    want = set(modalities)
    names = [n for n in PRESETS.names() if set(getattr(PRESETS.get(n), "modalities", ())) == want]
    if not names:
        hint = (f"pack pairs with `mmssl data pack modality=[{','.join(modalities)}] src=...` and pass "
                f"data=shards data.path=DIR" if "text" in modalities else
                "pass data=shards data.path=DIR with shards holding both modalities' fields per sample")
        raise ValueError(f"no embedded data set pairs {' and '.join(modalities)}; {hint}")
    return names[0]


def resolve_source(data_cfg: dict[str, Any], modalities: list[str], preset: str | None,
                   cache_dir: Path) -> DataSource:
    """``data.name=default`` -> the modality's embedded preset (generated on first use);
    ``data.name=shards data.path=DIR`` -> packed shards."""
    name = data_cfg.get("name", "default")
    if name == "default" and len(modalities) > 1:
        root = PRESETS.get(paired_preset(modalities))().ensure(cache_dir, seed=int(data_cfg.get("seed", 0)))
    elif name == "default":
        if not preset:
            raise ValueError(f"modality {modalities} has no embedded data preset; use data=shards data.path=DIR")
        root = PRESETS.get(preset)().ensure(cache_dir, seed=int(data_cfg.get("seed", 0)))
    elif name == "shards":
        if not data_cfg.get("path"):
            raise ValueError("data=shards needs data.path=DIR (made by `mmssl data pack`)")
        root = Path(data_cfg["path"])
        if not (root / "meta.json").exists():
            raise FileNotFoundError(f"{root} has no meta.json: pack it with `mmssl data pack`")
    else:
        root = PRESETS.get(name)().ensure(cache_dir, seed=int(data_cfg.get("seed", 0)))
    meta = load_meta(root)
    held = meta.get("modalities") or ([meta["modality"]] if meta.get("modality") else list(modalities))
    if len(modalities) > 1 and set(modalities) - set(held):
        raise ValueError(f"data set {root} holds {'+'.join(held)} data, not {'+'.join(modalities)} pairs")
    if meta.get("modality") and meta["modality"] not in modalities and set(meta.get("modalities", [meta["modality"]])) \
            .isdisjoint(modalities):
        raise ValueError(f"data set {root} holds {meta['modality']!r} data, not {', '.join(modalities)}")
    return DataSource(root, meta, modalities)


class TrainStream(IterableDataset):
    """Infinite batches of the train split (see module docstring). Batches carry ``_role``,
    ``_round``, ``_next`` (the role's position after this batch) and ``_bad`` (samples skipped)."""

    def __init__(self, source: DataSource, batch_size: int, max_len: MaxLen, seed: int, rank: int,
                 num_roles: int, role_shift: int = 0, start: dict[int, tuple[int, int]] | None = None,
                 on_error: str = "skip", bucket: bool = True) -> None:
        self.source, self.batch_size, self.max_len = source, batch_size, max_len
        self.bucket = bucket
        self.seed, self.rank, self.num_roles, self.role_shift = seed, rank, num_roles, role_shift
        self.start = dict(start or {})
        self.on_error = on_error
        self.shards = split_paths(source.root, "train")

    def __iter__(self) -> Iterator[Batch]:
        wi = get_worker_info()
        role = ((wi.id if wi else 0) + self.role_shift) % self.num_roles
        rnd, k0 = self.start.get(role, (0, 0))
        while True:
            g = torch.Generator().manual_seed(_seed(self.seed, self.rank, role, rnd))
            shard = self.shards[int(torch.randint(len(self.shards), (1,), generator=g))]
            bad: Counter = Counter()
            items = list(read_samples([shard], self.source.decode, bad, self.on_error))
            items = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
            nb = len(items) // self.batch_size
            if nb == 0:
                raise ValueError(f"shard {shard} has {len(items)} usable samples, fewer than one batch "
                                 f"of {self.batch_size}: pack fewer, larger shards")
            # drop a random remainder, then (unless the objective needs i.i.d. batches) bucket by length so
            # batches carry little padding
            items = items[: nb * self.batch_size]
            if self.bucket:
                items = sorted(items, key=self.source.length)
            order = torch.randperm(nb, generator=g).tolist()
            for k in range(k0, nb):
                chunk = items[order[k] * self.batch_size:(order[k] + 1) * self.batch_size]
                cg = torch.Generator().manual_seed(_seed(self.seed, self.rank, role, rnd, k))
                batch = self.source.collate(chunk, self.max_len, cg, keep_frame_labels=False)
                nxt = (rnd, k + 1) if k + 1 < nb else (rnd + 1, 0)
                batch["_role"] = torch.tensor(role)
                batch["_next"] = torch.tensor(nxt)
                batch["_bad"] = torch.tensor(sum(bad.values()) if k == 0 else 0)
                yield batch
            rnd, k0 = rnd + 1, 0


def train_loader(stream: TrainStream, num_workers: int) -> DataLoader:
    # An own generator: the DataLoader would otherwise draw its worker base seed from the global RNG,
    # which a resumed run restores, and one extra draw would shift every later mask and dropout.
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      prefetch_factor=2 if num_workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(_seed(stream.seed, stream.rank, "loader")))


def iter_split(source: DataSource, split: str, batch_size: int = 32, bad: Counter | None = None,
               on_error: str = "skip", buffer: int = 512, max_len: MaxLen = None) -> Iterator[Batch]:
    """Every usable sample of a split once, in a fixed order, in batches of similar length. Skipped
    samples are counted in ``bad``. Whole items unless ``max_len`` is given (the encoder's input size,
    e.g. an image side): then the codec cuts deterministically (no generator)."""
    bad = bad if bad is not None else Counter()
    buf: list[dict[str, Any]] = []

    def flush() -> Iterator[Batch]:
        buf.sort(key=source.length)
        for i in range(0, len(buf), batch_size):
            yield source.collate(buf[i:i + batch_size], max_len, None)
        buf.clear()

    for item in read_samples(split_paths(source.root, split), source.decode, bad, on_error):
        buf.append(item)
        if len(buf) >= buffer:
            yield from flush()
    yield from flush()
