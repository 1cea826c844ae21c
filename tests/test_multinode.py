"""Shards split across nodes x ranks x loader workers: every training sample read once per epoch.

The deal itself (no processes), the TrainStream of every slot of a 2-rank x 2-worker job read in one
process, and a real 2-"node" localhost job under torchrun's c10d rendezvous whose loader workers log
the sample ids they yield (the ``MMSSL_KEY_LOG`` debug hook of mmssl/data/loader.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmssl.data.loader import DataSource, TrainStream, iter_split
from mmssl.data.shards import load_meta, read_samples, split_paths
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eeg64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The EEG generator at 64 train items: 8 shards of 8."""
    from mmssl.modalities.eeg.data import EEGSynthPreset

    root = tmp_path_factory.mktemp("eeg") / "set"
    EEGSynthPreset().build(root, seed=0, sizes={"train": 64, "val": 4, "test": 4})
    return root


@pytest.mark.parametrize("n_shards", [8, 5, 3])
@pytest.mark.parametrize("world,roles", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_deal_gives_each_shard_once_per_epoch(eeg64: Path, n_shards: int, world: int, roles: int) -> None:
    src = DataSource(eeg64, load_meta(eeg64), ["eeg"])
    streams = [TrainStream(src, 4, None, seed=5, rank=k, num_roles=roles, world=world) for k in range(world)]
    for s in streams:
        s.shards = s.shards[:n_shards]  # 8 is a multiple of 2 and 4 slots, 5 and 3 are not (3 < 4 and 6 slots)
    seen: dict[int, Counter] = {}
    for s in streams:
        for role in range(roles):
            for rnd in range(3 * n_shards):
                epoch, shard = s.deal(role, rnd)
                seen.setdefault(epoch, Counter())[shard.name] += 1
    # the cards dealt are 0 .. 3 n_shards x slots - 1: epochs 0 .. 3 x slots - 1 in full, each shard once
    complete = [e for e in sorted(seen) if sum(seen[e].values()) == n_shards]
    assert complete == list(range(3 * world * roles)), seen
    for e in complete:
        assert set(seen[e].values()) == {1} and len(seen[e]) == n_shards
    # the permutation differs between epochs (or the shards would always reach the same slots)
    if n_shards == 8:
        assert streams[0].epoch_order(0) != streams[0].epoch_order(1)


def test_every_slot_of_a_two_rank_two_worker_job_reads_each_sample_once(eeg64: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSSL_KEY_LOG", str(tmp_path / "keys"))
    src = DataSource(eeg64, load_meta(eeg64), ["eeg"])
    ids = Counter()
    for rank in (0, 1):
        stream = TrainStream(src, 4, 500, seed=1, rank=rank, num_roles=2, world=2)
        for role in (0, 1):
            stream.role_shift = role  # the in-process stand-in for loader worker `role`
            it = iter(stream)
            for _ in range(2 * 2):  # 8 shards / 4 slots = 2 rounds of 2 batches each
                ids.update(next(it)["sample_id"].tolist())
    want = {it["sample_id"] for it in read_samples(split_paths(eeg64, "train"), src.decode, Counter())}
    assert len(want) == 64 and set(ids) == want and set(ids.values()) == {1}
    # the debug hook wrote the same ids, tagged epoch 0, one file per (rank, role)
    logs = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert logs == [f"keys-rank{k}-role{r}.tsv" for k in (0, 1) for r in (0, 1)]
    rows = [ln.split("\t") for p in (tmp_path / "keys").iterdir() for ln in p.read_text().splitlines()]
    assert {r[0] for r in rows} == {"0"} and Counter(int(r[2]) for r in rows) == ids


def test_a_rank_outside_the_world_is_refused(eeg64: Path) -> None:
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        TrainStream(DataSource(eeg64, load_meta(eeg64), ["eeg"]), 4, None, seed=0, rank=2, num_roles=1, world=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_read_every_sample_once_per_epoch(packed: Path, tmp_path: Path, cache_dir: Path) -> None:
    """Two torchrun launchers (``--nnodes=2 --nproc-per-node=1``, c10d rendezvous on localhost) train
    ``mmssl pretrain`` with one loader worker per rank; the ids the workers yielded, tagged epoch 0,
    are every train sample exactly once."""
    meta = load_meta(packed)
    sizes = [sum(1 for _ in read_samples([p], lambda r: r, Counter())) for p in split_paths(packed, "train")]
    bs = 6
    assert all(n % bs == 0 for n in sizes), sizes  # so the epoch drops nothing (the remainder rule)
    steps = sum(sizes) // bs // 2 + 1  # one epoch per rank, and a step into the next
    run, keys = tmp_path / "run", tmp_path / "keys"
    env = dict(os.environ, OMP_NUM_THREADS="1", MMSSL_CACHE=str(cache_dir), MMSSL_KEY_LOG=str(keys))
    port = _free_port()
    ov = tiny_overrides(packed, run, steps=steps, **{"objective": "mae", "trainer.batch_size": str(bs),
                                                   "trainer.num_workers": "1", "trainer.threads": "1"})
    ov = [o for o in ov if not o.startswith(("objective.k=", "objective.kmeans_iters="))]  # HuBERT's keys
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mn-test",
                               f"--node-rank={n}", "-m", "mmssl.cli", "pretrain", *ov],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2500:] for o in outs)
    assert json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in keys.iterdir()) == ["keys-rank0-role0.tsv", "keys-rank1-role0.tsv"]
    epoch0 = Counter()
    per_rank = {}
    for p in keys.iterdir():
        rows = [ln.split("\t") for ln in p.read_text().splitlines()]
        mine = [int(r[2]) for r in rows if r[0] == "0"]
        per_rank[p.name] = set(mine)
        epoch0.update(mine)
    want = {int(b) for batch in iter_split(DataSource(packed, meta, ["speech"]), "train") for b in batch["sample_id"]}
    assert len(want) == sum(sizes) == int(meta["splits"]["train"]["count"])
    assert set(epoch0) == want, (sorted(want - set(epoch0)), sorted(set(epoch0) - want))  # nothing missing
    assert set(epoch0.values()) == {1}                                                    # nothing twice
    assert all(per_rank.values())                                                         # both nodes read
