"""Retrieval and zero-shot evaluators: Recall@K with caption keys and pessimistic ties on hand-built
embeddings, against a brute-force ranking and exact chance; CLIP's prompt ensembling; and both
``run_*`` end to end on a tiny image+text shard set with a fake pair whose answers are known."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmssl.eval import protocol, retrieval, zero_shot
from mmssl.eval.retrieval import Relevance, caption_keys, direction_ranks, first_hit_ranks, retrieval_metrics
from mmssl.eval.zero_shot import class_text_embeddings, confusion, per_class_accuracy, zero_shot_predict


# -- retrieval metrics ----------------------------------------------------------------------------------
def test_caption_keys_ignore_padding_only() -> None:
    ids = torch.tensor([[49406, 5, 6, 49407, 0], [49406, 5, 6, 49407, 9], [49406, 5, 7, 49407, 0],
                        [49406, 5, 6, 49407, 0], [49406, 5, 6, 49407, 0]])
    lens = torch.tensor([4, 4, 4, 4, 5])  # row 1: junk beyond its length; row 4: a real trailing id 0
    k = caption_keys(ids, lens)
    assert k.dtype == torch.long and k.shape == (5,)
    assert k[0] == k[1] == k[3]
    assert len({int(k[0]), int(k[2]), int(k[4])}) == 3
    assert caption_keys(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long)).numel() == 0


# items 0 and 1 share a caption (key 0): the text gallery holds it once (b0 stands for it).
# i2t (each image queries the 3 distinct captions b0, b2, b3; cosine similarities by hand):
#   a0 [0.6, 0.8]: b0 0.6, b2 0.8, b3 -0.6 -> its caption b0 is beaten by b2: rank 2
#   a1 [0, 1]:     b0 0.0, b2 1.0, b3 0.0  -> b0 beaten by b2 and tied with b3 (ties count against): 3
#   a2 [1, 0]:     b2 0.0, b0 1.0, b3 -1.0 -> b2 beaten by b0: 2;  a3 [-1, 0]: b3 1.0 first: 1
# t2i (each item's caption queries the 4 images; caption 0 twice, weight 2; b0 = [1, 0] queries for it):
#   caption 0 (relevant a0, a1): a2 1.0 > a0 0.6 -> rank 2;  caption 1 (b2 [0, 1], relevant a2): a1 1.0,
#   a0 0.8 > a2 0.0, a3 0.0 ties -> rank 4;  caption 2 (b3 [-1, 0], relevant a3): rank 1.
A = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
B = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
KEYS = torch.tensor([0, 0, 1, 2])


def test_recalls_by_hand_with_duplicates_and_a_wrong_caption_first() -> None:
    r = direction_ranks(A, B, KEYS)
    assert r["i2t"][0].tolist() == [2, 3, 2, 1] and r["i2t"][1] is None
    assert r["t2i"][0].tolist() == [2, 4, 1] and r["t2i"][1].tolist() == [2, 1, 1]
    m = retrieval_metrics(A * 3.0, B, KEYS, ks=(1, 2, 3))  # scale-free: cosine
    assert m["i2t_R@1"] == 0.25 and m["i2t_R@2"] == 0.75 and m["i2t_R@3"] == 1.0
    assert m["t2i_R@1"] == 0.25 and m["t2i_R@2"] == 0.75 and m["t2i_R@3"] == 0.75  # weighted: 1/4, 3/4, 3/4
    assert m["i2t_mean_rank"] == pytest.approx(2.0) and m["t2i_mean_rank"] == pytest.approx((2 + 2 + 4 + 1) / 4)


def test_a_file_with_several_captions_is_one_image() -> None:
    """COCO-style rows: items 0 and 1 are one file with two captions. i2t: the file queries once and
    either caption is a hit; t2i: the file is one gallery entry, relevant to both of its captions."""
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])   # identical image rows for the shared file
    b = torch.tensor([[0.9, 0.1], [0.8, -0.2], [0.0, 1.0]])  # two different captions of that image
    keys, groups = torch.tensor([0, 1, 2]), torch.tensor([7, 7, 9])
    m = retrieval_metrics(a, b, keys, ks=(1,), groups=groups)
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0
    # without groups each copy of the image competes with the other (a tie counted against): t2i fails
    assert retrieval_metrics(a, b, keys, ks=(1,))["t2i_R@1"] == pytest.approx(1 / 3)


def brute_ranks(q: torch.Tensor, g: torch.Tensor, relevant: list[set[int]]) -> list[int]:
    """Sort the gallery by similarity, irrelevant items first among equals; the first relevant position."""
    out = []
    for i in range(q.shape[0]):
        sims = [float(F.cosine_similarity(q[i].double(), g[j].double(), dim=0)) for j in range(g.shape[0])]
        order = sorted(range(len(sims)), key=lambda j: (-sims[j], j in relevant[i]))
        out.append(1 + next(p for p, j in enumerate(order) if j in relevant[i]))
    return out


def test_ranks_match_brute_force_in_any_chunking() -> None:
    g = torch.Generator().manual_seed(0)
    m, n = 20, 14
    q, gal = torch.randn(m, 5, generator=g), torch.randn(n, 5, generator=g)
    relevant = [set(torch.randperm(n, generator=g)[: 1 + i % 3].tolist()) for i in range(m)]
    rel_q = torch.tensor([i for i in range(m) for _ in relevant[i]])
    rel_g = torch.tensor([j for i in range(m) for j in sorted(relevant[i])])
    want = brute_ranks(q, gal, relevant)
    for chunk in (None, 1, 7, 19):
        assert first_hit_ranks(q, gal, rel_q, rel_g, chunk=chunk).tolist() == want


def test_constant_embeddings_score_no_lucky_hits_and_chance_is_exact() -> None:
    keys = torch.tensor([0, 0, 1, 2])
    const = torch.ones(4, 3)
    m = retrieval_metrics(const, const, keys, ks=(1, 2, 3))
    # ties count against: each image's caption ranks after the other 2 distinct captions: rank 3
    assert (m["i2t_R@1"], m["i2t_R@2"], m["i2t_R@3"]) == (0.0, 0.0, 1.0)
    ch = Relevance.of(keys, torch.arange(4)).chance((1, 2, 3))
    # i2t: one relevant caption among 3 distinct: K/3; t2i: caption 0 (weight 2) has 2 relevant images of 4
    assert [ch["i2t"][k] for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    for k in (1, 2, 3):  # t2i by enumerating every ordering of the 4 images
        hits = {c: sum(any(p in rel for p in perm[:k]) for perm in itertools.permutations(range(4))) / 24
                for c, rel in ((0, {0, 1}), (1, {2}), (2, {3}))}
        assert ch["t2i"][k] == pytest.approx((2 * hits[0] + hits[1] + hits[2]) / 4)


def test_nan_embeddings_are_refused() -> None:
    bad = A.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, B, KEYS)


# -- zero-shot ---------------------------------------------------------------------------------------

def _tower() -> nn.Module:
    """A stand-in tower: the Encoder contract's ``config`` (empty) and nothing else."""
    t = nn.Identity()
    t.config = {}
    return t

class LengthTextPair(nn.Module):
    """Text embedding = len * one-hot(len mod E), len = the caption's id count: unnormalised on purpose."""

    def __init__(self, E: int = 64) -> None:
        super().__init__()
        self.modalities = ["image", "text"]
        self.E = E
        self.encoders = nn.ModuleDict({"image": _tower(), "text": _tower()})

    def input_size(self, m: str) -> int | None:
        return 77 if m == "text" else None

    def embed(self, m: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lens = batch["text_len"]
        return F.one_hot(lens % self.E, self.E).float() * lens.unsqueeze(1).float()


def test_class_embeddings_average_normalised_prompts() -> None:
    from mmssl.modalities.text.data import encode_text

    classes, templates = ["cat", "hot air balloon", "x"], ["a {}", "a blurry photo of a {} in the dark"]
    pair = LengthTextPair()
    emb = class_text_embeddings(pair, "text", classes, templates, "cpu", batch_size=4)  # chunks split classes
    assert emb.shape == (3, 64)
    for c, name in enumerate(classes):
        la, lb = (encode_text(t.replace("{}", name)).numel() for t in templates)
        assert la != lb
        want = torch.zeros(64)
        want[la], want[lb] = 1 / math.sqrt(2), 1 / math.sqrt(2)  # equal weights despite lengths la << lb
        torch.testing.assert_close(emb[c], want)
    with pytest.raises(ValueError, match=r"\{\}"):
        class_text_embeddings(pair, "text", classes, ["no placeholder"], "cpu")


def test_zero_shot_predictions_and_accuracies_by_hand() -> None:
    cls_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    items = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.9], [-1.0, -0.2], [0.5, 0.4], [1.0, 1.0]])
    pred = zero_shot_predict(items, cls_emb)
    assert pred.tolist() == [0, 1, 2, 2, 0, 0]  # last: a tie of classes 0 and 1 -> the first
    labels = torch.tensor([0, 1, 1, 2, 1, 1])
    assert per_class_accuracy(pred, labels, ["a", "b", "c", "d"]) == {"a": 1.0, "b": 0.25, "c": 1.0, "d": None}
    assert confusion(pred, labels, 3) == [[1, 0, 0], [2, 1, 1], [0, 0, 1]]


# -- end to end on a tiny paired shard set ------------------------------------------------------------
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
CAPTIONS = ["a red square."] * 4 + ["a green square."] * 4 + ["a blue square."] * 2 + ["a blue circle."] * 2


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    from mmssl.data.shards import write_split
    from mmssl.modalities.image.data import ImageCodec
    from mmssl.modalities.text.data import TextCodec

    root = tmp_path_factory.mktemp("pairs")
    ic, tc = ImageCodec(), TextCodec()
    samples = []
    for i, cap in enumerate(CAPTIONS):
        c = cap.split()[1]
        px = np.broadcast_to(np.array(COLOURS[c], dtype=np.uint8)[:, None, None], (3, 8, 8)).copy()
        s = {**ic.encode({"image": px}), **tc.encode({"text": cap})}
        s.update({"__key__": f"{i:08d}", "sid": str(i).encode(), "cls": str(list(COLOURS).index(c)).encode()})
        samples.append(s)
    shards = write_split(samples, root / "test", num_shards=2)
    meta = {"name": "tiny-pairs", "modalities": ["image", "text"], "classes": list(COLOURS),
            "prompts": ["a photo of a {}.", "a {} thing."], "splits": {"test": {"shards": shards, "count": 12}},
            "bad_samples": {}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


class ColourPair(nn.Module):
    """Image -> one-hot of its dominant channel; text -> one-hot of the colour word it names, plus 0.1 on a
    fourth axis when it says "circle". ``constant``: every embedding the same (a collapsed model)."""

    def __init__(self, constant: bool = False) -> None:
        super().__init__()
        self.modalities = ["image", "text"]
        from mmssl.modalities.text.data import encode_text

        self.constant = constant
        self.encoders = nn.ModuleDict({"image": _tower(), "text": _tower()})
        self.word = {w: int(encode_text(w)[1]) for w in [*COLOURS, "circle"]}
        assert all(encode_text(w).numel() == 3 for w in self.word)  # one BPE id each
        self.seen: dict[str, set[str]] = {"image": set(), "text": set()}

    def input_size(self, m: str) -> int | None:
        return 8 if m == "image" else 77

    def embed(self, m: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.seen[m].update(batch)
        n = batch["sample_id"].shape[0] if "sample_id" in batch else batch["text"].shape[0]
        if self.constant:
            return F.normalize(torch.ones(n, 4), dim=1)
        e = torch.zeros(n, 4)
        if m == "image":
            assert batch["image"].shape[-1] == 8  # input_size applied
            e[torch.arange(n), batch["image"].mean((2, 3)).argmax(1)] = 1.0
        else:
            ids = batch["text"].masked_fill(torch.arange(batch["text"].shape[1]) >= batch["text_len"][:, None], 0)
            for c, w in enumerate(COLOURS):
                e[:, c] = (ids == self.word[w]).any(1).float()
            e[:, 3] = 0.1 * (ids == self.word["circle"]).any(1).float()
        return F.normalize(e, dim=1)


@pytest.fixture()
def fake_pairs(monkeypatch: pytest.MonkeyPatch) -> dict[str, ColourPair]:
    made = {"encoders": ColourPair(), "encoders_init": ColourPair(constant=True)}
    monkeypatch.setattr(protocol, "load_pair", lambda path, which, device: made[which])
    return made


def test_run_retrieval_end_to_end(pairs_root: Path, tmp_path: Path, fake_pairs: dict[str, ColourPair]) -> None:
    from mmssl.data.loader import DataSource
    from mmssl.data.shards import load_meta

    src = DataSource(pairs_root, load_meta(pairs_root), ["image", "text"])
    r = retrieval.run_retrieval("RUN", tmp_path, src, {"split": "test", "bootstrap": 200}, torch.device("cpu"), 5)
    assert json.loads((tmp_path / "retrieval.json").read_text()) == r
    assert (tmp_path / "retrieval.png").stat().st_size > 0
    assert r["n_items"] == 12 and r["n_captions"] == 4 and r["key"] == "caption" and r["modalities"] == ["image", "text"]
    # i2t: a "blue circle" image's own caption (cos 0.995) ranks behind both "blue square" captions (cos 1)
    assert r["i2t_R@1"] == pytest.approx(10 / 12) and r["i2t_R@5"] == 1.0
    # t2i: blue images tie for every blue caption, and two of the four carry the other blue caption
    assert r["t2i_R@1"] == pytest.approx(8 / 12) and r["t2i_R@10"] == 1.0
    # collapsed twin: i2t ranks 1 + 3 (every other distinct caption ties); t2i ranks 1 + 8 (red, green
    # captions: 4 relevant of 12 images) and 1 + 10 (blue captions: 2 relevant)
    assert r["random_init_i2t_R@1"] == 0.0 and r["random_init_i2t_R@5"] == 1.0
    assert r["random_init_t2i_R@5"] == 0.0 and r["random_init_t2i_R@10"] == pytest.approx(8 / 12)
    assert r["chance_R@1"] == pytest.approx(1 / 4)  # one relevant caption among 4 distinct
    assert r["t2i_chance_R@1"] == pytest.approx((8 * 4 / 12 + 4 * 2 / 12) / 12)
    lo, hi = r["i2t_R@1_ci95"]
    assert 0.4 < lo <= 10 / 12 <= hi <= 1.0
    assert fake_pairs["encoders"].seen["text"] >= {"text", "text_len"}


def test_run_zero_shot_end_to_end(pairs_root: Path, tmp_path: Path, fake_pairs: dict[str, ColourPair]) -> None:
    from mmssl.data.loader import DataSource
    from mmssl.data.shards import load_meta

    src = DataSource(pairs_root, load_meta(pairs_root), ["image", "text"])
    r = zero_shot.run_zero_shot("RUN", tmp_path, src, {"split": "test", "prompts": None}, torch.device("cpu"), 5)
    assert json.loads((tmp_path / "zero_shot.json").read_text()) == r
    assert (tmp_path / "zero_shot.png").stat().st_size > 0
    assert r["accuracy"] == 1.0 and r["n_items"] == 12 and r["num_classes"] == 3
    assert r["prompts"] == ["a photo of a {}.", "a {} thing."]
    # the collapsed twin ties every class and so always says "red" (4 of 12)
    assert r["random_init_accuracy"] == pytest.approx(4 / 12)
    assert r["random_init_per_class_accuracy"] == {"red": 1.0, "green": 0.0, "blue": 0.0}
    assert r["chance"] == pytest.approx(4 / 12)
    # only images were read from the shards: the text tower saw prompts, never the captions' sample ids
    assert "text" not in fake_pairs["encoders"].seen["image"] and "sample_id" not in fake_pairs["encoders"].seen["text"]


def test_zero_shot_refusals(pairs_root: Path, tmp_path: Path, fake_pairs: dict[str, ColourPair]) -> None:
    from mmssl.data.loader import DataSource
    from mmssl.data.shards import load_meta

    meta = {k: v for k, v in load_meta(pairs_root).items() if k != "prompts"}
    src = DataSource(pairs_root, meta, ["image", "text"])
    with pytest.raises(ValueError, match="prompts"):
        zero_shot.run_zero_shot("RUN", tmp_path, src, {}, torch.device("cpu"), 5)
    r = zero_shot.run_zero_shot("RUN", tmp_path, src, {"prompts": ["{}"]}, torch.device("cpu"), 5)
    assert r["prompts"] == ["{}"] and r["accuracy"] == 1.0
    fake_pairs["encoders"].modalities = ["image", "speech"]
    with pytest.raises(ValueError, match=r"text tower.*image\+speech"):
        zero_shot.run_zero_shot("RUN", tmp_path, src, {}, torch.device("cpu"), 5)


def test_real_pair_runs_match_direct_embeddings(pairs_root: Path, tmp_path: Path) -> None:
    """The lead's ``load_pair`` on a saved (untrained) clip run: the evaluators' numbers equal metrics
    computed from embeddings of one hand-collated batch, for the trained pair and its step-0 twin."""
    from mmssl.config import compose, to_dict
    from mmssl.data.loader import DataSource, iter_split
    from mmssl.data.shards import load_meta
    from mmssl.export import load_pair, save_encoder, save_heads
    from mmssl.factory import build_encoder, build_objective, encoder_config

    cfg = compose(["modality=[image,text]", "objective=clip"])
    mcfg = {m: to_dict(cfg.modality[m]) for m in ("image", "text")}
    for which, seed in (("encoders", 1), ("encoders_init", 0)):  # different weights: the twin must be the twin
        torch.manual_seed(seed)
        encs = {m: build_encoder(encoder_config(m, "micro", mcfg[m], {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64},
                                                "clip")) for m in mcfg}
        obj = build_objective("clip", dict(to_dict(cfg.objective), embed_dim=16), encs, mcfg).eval()
        for m, enc in obj.encoders.items():
            save_encoder(enc, tmp_path / "run" / which / m)
        save_heads(obj.heads(), tmp_path / "run" / ("heads" if which == "encoders" else "heads_init"))

    src = DataSource(pairs_root, load_meta(pairs_root), ["image", "text"])
    r = retrieval.run_retrieval(tmp_path / "run", tmp_path / "out", src, {"bootstrap": 0}, torch.device("cpu"), 5)
    z = zero_shot.run_zero_shot(tmp_path / "run", tmp_path / "out", src, {}, torch.device("cpu"), 5)
    whole = next(iter_split(src, "test", 12, max_len={"image": 32, "text": 77}))
    order = whole["sample_id"].argsort()
    keys = caption_keys(whole["text"], whole["text_len"])
    for prefix, which in (("", "encoders"), ("random_init_", "encoders_init")):
        pair = load_pair(tmp_path / "run", which=which)
        want = retrieval_metrics(pair.embed("image", whole), pair.embed("text", whole), keys)
        for k, v in want.items():
            assert r[prefix + k] == pytest.approx(v), (prefix, k)
        cls = class_text_embeddings(pair, "text", list(COLOURS), ["a photo of a {}.", "a {} thing."], "cpu")
        pred = zero_shot_predict(pair.embed("image", whole)[order], cls)
        assert z[prefix + "accuracy"] == pytest.approx(float((pred == whole["label"][order]).float().mean()))
    assert r["n_captions"] == 4


def test_identical_items_tie_whatever_their_last_bits() -> None:
    """An input embedded in two batches differs in its last bits; the relevant copy and an other-key
    copy of one image must tie (pessimistic rank 2) whichever of them came out a hair higher."""
    q = torch.tensor([[1.0, 0.0, 0.0]])
    base = torch.tensor([0.6, 0.8, 0.0])
    for eps in (3e-7, -3e-7):
        gal = torch.stack([base, base + torch.tensor([eps, 0.0, 0.0])])  # item 0 relevant, item 1 other key
        assert first_hit_ranks(q, gal, torch.tensor([0]), torch.tensor([0])).tolist() == [2]
    # a real difference still separates them
    gal = torch.stack([base, torch.tensor([0.5, 0.866, 0.0])])
    assert first_hit_ranks(q, gal, torch.tensor([0]), torch.tensor([0])).tolist() == [1]
