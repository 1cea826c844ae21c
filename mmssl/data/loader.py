"""Data sources and streams.

Training reads the train split as an infinite, resumable stream: each loader worker plays a *role*;
role r of rank k is the *slot* s = k x roles + r of S = world x roles slots across the whole job (every
node, rank and worker). Shards are dealt to the slots like cards from an endless deck: the deck is
epoch 0's shard permutation, then epoch 1's, ... (each drawn with a generator seeded by (seed, epoch)
only, so every rank draws the same one), and round j of slot s reads the deck's card j x S + s. So in
every epoch each shard is read by exactly one slot, once: no overlap between nodes, ranks or workers,
nothing missing. The remainder rule: when the shard count N is not a multiple of S, the deal simply
runs on into the next epoch's permutation (a round's cards may belong to two epochs); no shard is read
twice before all N have been read once, and N < S works too. Within a round the shard is shuffled
with a generator seeded by (seed, rank, role, round), bucketed by length into batches, and the
``len % batch_size`` samples left over (a random choice each round) are left out of that round: a
shard whose usable samples are a multiple of the batch size gives every one of them. So the stream is
a function of (seed, step, world size, workers), every rank gets the same number of batches (it is
infinite), and a batch's position (role, round, batch within round) travels with it, which is all
resume needs. webdataset's own node splitter, error handler and shard-count check are not used
(DESIGN.md "Data").

Debug hook: with ``MMSSL_KEY_LOG=DIR`` in the environment, every slot appends one line per sample it
yields, ``epoch<TAB>round<TAB>sample_id``, to ``DIR/keys-rank<k>-role<r>.tsv`` (written by the loader
worker as the batch leaves it; a mixture's epoch column is -1). Off (and free) when unset; it is what
tests/test_multinode.py counts.

Several sources (``data.sources=[{...,weight:w}, ...]``, e.g. new data with replay of the old): each
round first draws the source with a generator seeded by (seed, rank, role, round), then one shard of it
(with replacement: a weighted mixture has no epochs, so the exactly-once deal above applies to a single
source only). Source i is drawn
with probability proportional to w_i / (mean batches per shard of source i), so w_i / sum(w) is the
expected fraction of *batches* from source i whatever the sources' shard sizes; the stream is still a
function of (seed, step) and resume state is unchanged. A mixture's train split is the union of its
sources' train splits (sample ids offset so they stay unique: per-sample targets such as HuBERT's
units stay right); validation, test and probes use the first source."""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmssl.data.shards import BadSample, load_meta, read_samples, split_paths
from mmssl.registry import MODALITIES, PRESETS
from mmssl.types import Batch

#: an input size (image side, text context, audio samples) for every modality, or one per modality
MaxLen = int | None | dict[str, int | None]


def _seed(*parts: Any) -> int:
    return int(hashlib.sha1("-".join(map(str, parts)).encode()).hexdigest()[:15], 16)


@dataclass
class MixPart:
    """One source of a mixture: its data (sample ids offset), its weight and a display label."""

    source: DataSource
    weight: float
    label: str


@dataclass
class DataSource:
    """A resolved data set: where its shards are, its meta, the codecs of its modalities.

    A mixture (``data.sources``) is the DataSource of its first source with ``mixture`` set: every
    split but train reads that first source."""

    root: Path
    meta: dict[str, Any]
    modalities: list[str]
    #: added to every sample id (a mixture's parts after the first), and the ids' bound before it
    sid_offset: int = 0
    sid_bound: int | None = None
    mixture: list[MixPart] | None = None

    @property
    def codecs(self) -> dict[str, Any]:
        return {m: MODALITIES.get(m).codec for m in self.modalities}

    @property
    def fingerprint(self) -> str:
        """Identifies the data: generated presets by what made them, packed shards also by location."""
        counts = sorted((s, v.get("count")) for s, v in self.meta["splits"].items())
        where = "" if self.meta.get("generator_version") else str(self.root.resolve())
        one = f"{_seed(self.meta.get('name'), self.meta.get('generator_version'), self.meta.get('seed'), counts, where):x}"
        if not self.mixture:
            return one
        # every source (as data, without its id offset) and its weight
        return f"{_seed('mixture', [(p.source.primary.fingerprint, p.weight) for p in self.mixture]):x}"

    @property
    def primary(self) -> DataSource:
        """The data itself without the mixture: the first source (what evaluation reads)."""
        return DataSource(self.root, self.meta, self.modalities)

    def train_count(self) -> int:
        """Train items: summed over a mixture's sources."""
        parts = [p.source for p in self.mixture] if self.mixture else [self]
        return sum(int((s.meta.get("splits") or {}).get("train", {}).get("count") or 0) for s in parts)

    @property
    def num_classes(self) -> int:
        return len(self.meta.get("classes") or [])

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for codec in self.codecs.values():
            item.update(codec.decode(raw))
        try:
            sid = int(raw["sid"])
        except (KeyError, ValueError):
            raise BadSample(f"missing_field: {raw.get('__key__')}: no integer sid") from None
        if self.sid_bound is not None and not 0 <= sid < self.sid_bound:
            # a mixture keeps ids unique by offsets from the meta counts; an id outside them would collide
            raise ValueError(f"{self.root}: sample id {sid} outside 0..{self.sid_bound - 1} (meta.json's train count): "
                             f"a data set in data.sources needs ids 0..count-1, as `mmssl data pack` writes")
        item["sample_id"] = sid + self.sid_offset
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


SOURCE_KEYS = ("name", "path", "preset", "seed", "weight", "label")


def resolve_source(data_cfg: dict[str, Any], modalities: list[str], preset: str | None,
                   cache_dir: Path) -> DataSource:
    """``data.name=default`` -> the modality's embedded preset (generated on first use);
    ``data.name=shards data.path=DIR`` -> packed shards; ``data.sources=[{name:..,weight:..}, ...]`` ->
    a weighted mixture of such sources (see the module docstring)."""
    if data_cfg.get("sources"):
        return resolve_mixture(data_cfg, modalities, preset, cache_dir)
    return _resolve_one(data_cfg, modalities, preset, cache_dir)


def resolve_mixture(data_cfg: dict[str, Any], modalities: list[str], preset: str | None,
                    cache_dir: Path) -> DataSource:
    entries = data_cfg["sources"]
    if not isinstance(entries, (list, tuple)):
        raise ValueError("data.sources must be a list such as [{name:default,weight:0.8},{name:shards,path:DIR,weight:0.2}]")  # noqa: TRY004
    parts: list[MixPart] = []
    offset = 0
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"data.sources[{i}] must be a mapping such as {{name:shards,path:DIR,weight:0.5}}, got {e!r}")  # noqa: TRY004
        unknown = sorted(set(e) - set(SOURCE_KEYS))
        if unknown:
            raise ValueError(f"data.sources[{i}]: unknown key {unknown[0]!r}; keys: {', '.join(SOURCE_KEYS)}")
        w = e.get("weight", 1.0)
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"data.sources[{i}]: weight must be a number, got {w!r}") from None
        if not (w > 0 and w < float("inf")):
            raise ValueError(f"data.sources[{i}]: weight must be a positive number, got {e.get('weight')!r}")
        if e.get("preset") and e.get("name", "default") != "default":
            raise ValueError(f"data.sources[{i}]: preset= goes with name=default (an embedded preset), not name={e['name']}")
        sub = {k: v for k, v in data_cfg.items() if k not in ("sources", "path", "name")}
        sub.update({k: v for k, v in e.items() if k not in ("weight", "label", "preset")})
        sub.setdefault("name", "default")
        try:
            src = _resolve_one(sub, modalities, e.get("preset") or preset, cache_dir)
        except (ValueError, KeyError, FileNotFoundError) as err:
            msg = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
            raise ValueError(f"data.sources[{i}]: {msg}") from None
        count = int((src.meta.get("splits") or {}).get("train", {}).get("count") or 0)
        if count <= 0:
            raise ValueError(f"data.sources[{i}]: {src.root} has no train split to mix")
        src.sid_offset, src.sid_bound = offset, count
        offset += count
        parts.append(MixPart(src, w, str(e.get("label") or src.meta.get("name") or src.root.name)))
    labels = [p.label for p in parts]
    for i, p in enumerate(parts):
        if labels.count(p.label) > 1:  # the same data set twice (e.g. two seeds): tell them apart
            p.label = f"{p.label}#{i}"
    first = parts[0].source
    return DataSource(first.root, first.meta, modalities, mixture=parts)


def _resolve_one(data_cfg: dict[str, Any], modalities: list[str], preset: str | None,
                 cache_dir: Path) -> DataSource:
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


def batches_per_shard(count: int, num_shards: int, batch_size: int) -> float:
    """Mean full batches per shard of a split of ``count`` items written round-robin into ``num_shards``."""
    base, extra = divmod(count, max(num_shards, 1))
    return sum((base + (k < extra)) // batch_size for k in range(num_shards)) / max(num_shards, 1)


def mixture_probs(source: DataSource, batch_size: int) -> torch.Tensor:
    """Per-round draw probabilities of a mixture's sources: w_i / (mean batches per shard of source i),
    normalised, so that source i gives a fraction w_i / sum(w) of the batches in expectation."""
    assert source.mixture
    rates = []
    for i, p in enumerate(source.mixture):
        tr = p.source.meta["splits"]["train"]
        b = batches_per_shard(int(tr["count"]), len(tr["shards"]), batch_size)
        if b <= 0:
            raise ValueError(f"data.sources[{i}] ({p.label}): its train shards hold fewer than one batch of "
                             f"{batch_size}: pack fewer, larger shards or lower trainer.batch_size")
        rates.append(p.weight / b)
    probs = torch.tensor(rates, dtype=torch.float64)
    return probs / probs.sum()


class TrainStream(IterableDataset):
    """Infinite batches of the train split (see module docstring). Batches carry ``_role``,
    ``_round``, ``_next`` (the role's position after this batch) and ``_bad`` (samples skipped);
    from a mixture also ``_source`` (the index of the source they came from)."""

    def __init__(self, source: DataSource, batch_size: int, max_len: MaxLen, seed: int, rank: int,
                 num_roles: int, role_shift: int = 0, start: dict[int, tuple[int, int]] | None = None,
                 on_error: str = "skip", bucket: bool = True, world: int | None = None) -> None:
        self.source, self.batch_size, self.max_len = source, batch_size, max_len
        self.bucket = bucket
        self.seed, self.rank, self.num_roles, self.role_shift = seed, rank, num_roles, role_shift
        # the job's process count: the started process group's (read here, in the main process), else 1
        if world is None:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world} processes")
        self.world = int(world)
        self.key_log = os.environ.get("MMSSL_KEY_LOG") or None
        self.start = dict(start or {})
        self.on_error = on_error
        self.shards = split_paths(source.root, "train")
        self.parts = [(p.source, split_paths(p.source.root, "train")) for p in source.mixture or []]
        self.probs = mixture_probs(source, batch_size) if source.mixture else None

    def pick(self, g: torch.Generator) -> tuple[int | None, DataSource, Path]:
        """A mixture's round: the source drawn with the round's generator, then one of its shards ->
        (source index, source, shard)."""
        assert self.probs is not None
        which = int(torch.multinomial(self.probs, 1, generator=g))
        src, shards = self.parts[which]
        return which, src, shards[int(torch.randint(len(shards), (1,), generator=g))]

    def epoch_order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s shard permutation: the same on every rank and worker (seed and epoch only)."""
        g = torch.Generator().manual_seed(_seed(self.seed, "epoch", epoch))
        return torch.randperm(len(self.shards), generator=g).tolist()

    def deal(self, role: int, rnd: int) -> tuple[int, Path]:
        """A single source's round ``rnd`` of slot (rank, role) -> (epoch, shard): card
        rnd x slots + slot of the deck of per-epoch permutations (module docstring)."""
        slots = self.world * self.num_roles
        card = rnd * slots + self.rank * self.num_roles + role
        epoch, i = divmod(card, len(self.shards))
        return epoch, self.shards[self.epoch_order(epoch)[i]]

    def __iter__(self) -> Iterator[Batch]:
        wi = get_worker_info()
        role = ((wi.id if wi else 0) + self.role_shift) % self.num_roles
        rnd, k0 = self.start.get(role, (0, 0))
        while True:
            g = torch.Generator().manual_seed(_seed(self.seed, self.rank, role, rnd))
            if self.probs is not None:
                which, src, shard = self.pick(g)
                epoch = -1
            else:
                which, src = None, self.source
                epoch, shard = self.deal(role, rnd)
            bad: Counter = Counter()
            items = list(read_samples([shard], src.decode, bad, self.on_error))
            items = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
            nb = len(items) // self.batch_size
            if nb == 0:
                raise ValueError(f"shard {shard} has {len(items)} usable samples, fewer than one batch "
                                 f"of {self.batch_size}: pack fewer, larger shards")
            # drop a random remainder, then (unless the objective needs i.i.d. batches) bucket by length so
            # batches carry little padding
            items = items[: nb * self.batch_size]
            if self.bucket:
                items = sorted(items, key=src.length)
            order = torch.randperm(nb, generator=g).tolist()
            for k in range(k0, nb):
                chunk = items[order[k] * self.batch_size:(order[k] + 1) * self.batch_size]
                cg = torch.Generator().manual_seed(_seed(self.seed, self.rank, role, rnd, k))
                batch = src.collate(chunk, self.max_len, cg, keep_frame_labels=False)
                nxt = (rnd, k + 1) if k + 1 < nb else (rnd + 1, 0)
                batch["_role"] = torch.tensor(role)
                batch["_next"] = torch.tensor(nxt)
                batch["_bad"] = torch.tensor(sum(bad.values()) if k == 0 else 0)
                if which is not None:
                    batch["_source"] = torch.tensor(which)
                if self.key_log:
                    self._log_keys(role, epoch, rnd, batch["sample_id"])
                yield batch
            rnd, k0 = rnd + 1, 0


    def _log_keys(self, role: int, epoch: int, rnd: int, ids: torch.Tensor) -> None:
        """The MMSSL_KEY_LOG debug hook (module docstring): one line per sample yielded."""
        path = Path(self.key_log) / f"keys-rank{self.rank}-role{role}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("".join(f"{epoch}\t{rnd}\t{i}\n" for i in ids.tolist()))


def train_loader(stream: TrainStream, num_workers: int, pin_memory: bool | None = None) -> DataLoader:
    """The training DataLoader: decoding and collation in ``num_workers`` processes, 2 batches prefetched
    per worker, and (``pin_memory``, default: when CUDA is available) batches in page-locked memory, so
    the trainer's ``.to(device, non_blocking=True)`` really overlaps the copy with the step (from
    pageable memory that copy is synchronous)."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    # An own generator: the DataLoader would otherwise draw its worker base seed from the global RNG,
    # which a resumed run restores, and one extra draw would shift every later mask and dropout.
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=bool(pin_memory),
                      prefetch_factor=2 if num_workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(_seed(stream.seed, stream.rank, "loader")))


def iter_split(source: DataSource, split: str, batch_size: int = 32, bad: Counter | None = None,
               on_error: str = "skip", buffer: int = 512, max_len: MaxLen = None) -> Iterator[Batch]:
    """Every usable sample of a split once, in a fixed order, in batches of similar length. Skipped
    samples are counted in ``bad``. Whole items unless ``max_len`` is given (the encoder's input size,
    e.g. an image side): then the codec cuts deterministically (no generator). A mixture's train
    split is its sources' train splits one after another (ids offset); its other splits the first source's."""
    bad = bad if bad is not None else Counter()
    if source.mixture and split == "train":
        for p in source.mixture:
            yield from iter_split(p.source, split, batch_size, bad, on_error, buffer, max_len)
        return
    buf: list[dict[str, Any]] = []

    def flush() -> Iterator[Batch]:
        buf.sort(key=source.length)
        for i in range(0, len(buf), batch_size):
            yield source.collate(buf[i:i + batch_size], max_len, None)
        buf.clear()

    if source.mixture:
        source = source.primary
    for item in read_samples(split_paths(source.root, split), source.decode, bad, on_error):
        buf.append(item)
        if len(buf) >= buffer:
            yield from flush()
    yield from flush()
