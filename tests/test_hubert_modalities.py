"""HuBERT on every adapter: per-token unit features aligned 1:1 with the encoder's tokens, units
fitted through the ``unit_targets`` cache and assigned at each step, a few optimizer steps per
modality, and the loss against a literal re-implementation of HuBERT's masked-prediction loss."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mmssl.config import compose
from mmssl.data.loader import iter_split, resolve_source
from mmssl.factory import build_encoder, build_objective, encoder_config
from mmssl.objectives.base import PrepareContext

MODALITIES = ["speech", "image", "text", "point", "eeg", "mri"]
# the default suite keeps one modality per test (the whole file takes minutes on 2 cores); -m slow runs all six
FAST = {"image"}
PARAMS = [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in MODALITIES]


def _setup(modality: str, cache_dir: Path, **objective: object):
    """A 1-block micro encoder under HuBERT with the modality's defaults, its preset, and a
    PrepareContext over the first 16 train items (two batches of 8)."""
    cfg = compose([f"modality={modality}", "objective=hubert", "model.depth=1"])
    mcfg = OmegaConf.to_container(cfg.modality[modality], resolve=True)
    enc = build_encoder(encoder_config(modality, "micro", mcfg, OmegaConf.to_container(cfg.model), "hubert"))
    ocfg = {**OmegaConf.to_container(cfg.objective, resolve=True), "k": 8, "final_dim": 16, "kmeans_iters": 5,
            **objective}
    obj = build_objective("hubert", ocfg, {modality: enc}, {modality: mcfg})
    src = resolve_source({"name": "default"}, [modality], mcfg["preset"], cache_dir)
    whole = [b for _, b in zip(range(2), iter_split(src, "train", batch_size=8, buffer=8))]
    ctx = PrepareContext(iter_split=lambda split: iter(whole), device=torch.device("cpu"), run_dir=cache_dir,
                         cache_dir=cache_dir / "hubert-modalities", data_fingerprint=f"test-{modality}-{objective}")
    max_len = mcfg.get("max_len") or enc.config["preprocessing"].get("max_len")
    # a batch cut to the encoder's input size (point: a subset of each cloud, EEG: a 2 s crop), unlike
    # the whole items the units were fitted on
    train = next(iter(iter_split(src, "train", batch_size=6, buffer=6, max_len=max_len)))
    return obj, enc, ctx, train


@pytest.mark.parametrize("modality", PARAMS)
def test_unit_features_align_with_the_tokens(modality: str, cache_dir: Path) -> None:
    _, enc, _, batch = _setup(modality, cache_dir)
    feats, pad = enc.adapter.unit_features(batch)
    tok = enc.adapter.tokenize(batch)
    assert feats.shape[:2] == tok.pad.shape and torch.equal(pad, tok.pad)
    assert torch.equal((~pad).sum(1), enc.adapter.num_tokens(batch))
    assert torch.isfinite(feats.float()).all()
    assert feats.shape[-1] >= 1 and (~pad).any()
    # the features describe the tokens' content: not one constant vector
    real = feats[~pad].float()
    assert real.std(0).max() > 0


def _literal_hubert_loss(proj: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """HuBERT's masked-prediction loss written out token by token: for every hidden real token, the
    cosine similarity of its projection with every unit embedding over the temperature, and minus the
    log-softmax at its unit; the mean over those tokens."""
    terms = []
    for b, n in hidden.nonzero().tolist():
        cos = torch.stack([F.cosine_similarity(proj[b, n], e, dim=0) for e in emb]) / temperature
        terms.append(-(cos[labels[b, n]] - torch.logsumexp(cos, 0)))
    return torch.stack(terms).mean()


def _step_and_replay(obj, enc, batch, seed: int = 5):
    """The objective's output in eval mode (no dropout), and the same step replayed by hand with the
    same mask draw: (output, tokens, hidden real tokens [B, N], the student's last layer [B, N, D])."""
    obj.eval()
    torch.manual_seed(seed)
    got = obj(batch)
    torch.manual_seed(seed)
    tok = enc.adapter.tokenize(batch)
    hidden = enc.adapter.make_mask(tok, obj.mask_ratio) & ~tok.pad
    return got, tok, hidden, enc.encode(tok, hidden, "replace").last


def _nearest(feats: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Brute-force nearest centroid of each row: argmin of the squared distance, in float64."""
    d = ((feats.double()[..., None, :] - centroids.double()) ** 2).sum(-1)
    return d.argmin(-1)


@pytest.mark.parametrize("modality", PARAMS)
def test_steps_and_loss_against_the_literal_loss(modality: str, cache_dir: Path) -> None:
    torch.manual_seed(0)
    obj, enc, ctx, batch = _setup(modality, cache_dir, assign="online")
    info = obj.prepare(ctx)
    assert info["targets_assign"] == "online" and info["targets_k"] == 8
    out_dir = Path(info["targets_dir"])
    assert (out_dir / "meta.json").exists()  # fitted through the unit_targets cache

    # the labels: the nearest cached centroid of each token's feature (or the id's frequency rank)
    feats, pad = enc.adapter.unit_features(batch)
    labels = obj.labels(batch, enc.adapter.tokenize(batch).index, pad)
    if (out_dir / "centroids.safetensors").exists():
        expect = _nearest(feats, load_file(str(out_dir / "centroids.safetensors"))["centroids"])
        agree = (labels == expect)[~pad].float().mean()
        assert agree > 0.999, agree  # ties at float rounding only
    else:
        vocab = load_file(str(out_dir / "vocab.safetensors"))
        rank = {int(i): int(u) for i, u in zip(vocab["ids"], vocab["units"])}
        expect = torch.tensor([[rank.get(int(i), 7) for i in row] for row in feats[..., 0]])
        assert torch.equal(labels[~pad], expect[~pad])
    assert bool((labels[pad] == -100).all())

    # the loss against the literal formula, with the same mask draw, in eval mode (no dropout)
    got, _, hidden, last = _step_and_replay(obj, enc, batch)
    ref = _literal_hubert_loss(obj.final_proj(last), obj.label_embeddings, labels, hidden, 0.1)
    assert got.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert 0.3 < float(got.metrics["mask_fraction"]) < 0.8

    # a few optimizer steps: finite losses, and the encoder and the unit embeddings move
    obj.train()
    before = {n: p.detach().clone() for n, p in obj.named_parameters()}
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        out = obj(batch)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    moved = [n for n, p in obj.named_parameters() if not torch.equal(before[n], p)]
    assert "label_embeddings" in moved and any(n.startswith("towers.") for n in moved)


def test_several_codebooks_and_the_topic_head_against_the_literal_loss(cache_dir: Path) -> None:
    """MS-HuBERT's codebooks (k=[8, 4]: one k-means each, losses summed) and HuBERTopic's head (an LDA
    topic per item over its bag of codebook-0 units, predicted from the mean output token)."""
    from mmssl.objectives.unit_topics import fit_topics

    torch.manual_seed(0)
    obj, enc, ctx, batch = _setup("image", cache_dir, assign="online", k=[8, 4], topics=3)
    info = obj.prepare(ctx)
    assert (info["targets_k"], info["targets_k_1"], info["targets_topics"]) == (8, 4, 3)
    assert info["targets_dir"] != info["targets_dir_1"]
    assert set(obj.heads()) == {"hubert", "hubert_1", "hubert_topic"}

    # the topics: each train item's bag of units counted by brute force, then the LDA's argmax
    ids, bags = [], []
    cents = load_file(str(Path(info["targets_dir"]) / "centroids.safetensors"))["centroids"]
    for b in ctx.iter_split("train"):
        f, p = enc.adapter.unit_features(b)
        near = _nearest(f, cents)
        ids += b["sample_id"].tolist()
        bags += [torch.bincount(near[i][~p[i]], minlength=8).double() for i in range(len(near))]
    expect = fit_topics(torch.stack(bags).numpy(), 3, seed=0)
    assert obj.topic_table.lookup(torch.tensor(ids)).tolist() == expect.tolist()

    got, tok, hidden, last = _step_and_replay(obj, enc, batch)
    ref = sum(_literal_hubert_loss(proj(last), emb, obj.labels(batch, tok.index, tok.pad, i), hidden, 0.1)
              for i, (proj, emb) in enumerate([(obj.final_proj, obj.label_embeddings),
                                                (obj.extra[0].final_proj, obj.extra[0].label_embeddings)]))
    pooled = torch.stack([last[i][~tok.pad[i]].mean(0) for i in range(len(last))])
    topic = obj.topic_table.lookup(batch["sample_id"])
    ref = ref + 0.1 * F.cross_entropy(obj.topic_head(pooled), topic)
    assert got.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert got.metrics["loss_masked_sum"].item() == pytest.approx(
        (got.metrics["loss_masked"] + got.metrics["loss_masked_1"]).item(), rel=1e-6)
    calls = []

    def counted(f):
        return lambda b: calls.append(1) or f(b)

    for t in obj.targets:  # both codebooks label from one computation of the features per step
        t.features = counted(t.features)
    torch.manual_seed(5)
    again = obj(batch)
    assert len(calls) == 1 and again.loss.item() == pytest.approx(got.loss.item(), rel=1e-6)

    obj.train()
    before = {n: p.detach().clone() for n, p in obj.named_parameters()}
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        out = obj(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    moved = {n for n, p in obj.named_parameters() if not torch.equal(before[n], p)}
    assert {"label_embeddings", "extra.0.label_embeddings", "topic_head.weight"} <= moved


def test_table_units_give_each_item_its_bag_and_lists_are_checked() -> None:
    """A unit table's rows as bags of units (the topic model's documents); a layer list that does not
    match the codebooks is refused."""
    from mmssl.objectives.hubert import _int_list, _Target
    from mmssl.objectives.unit_targets import UnitTable
    from mmssl.objectives.unit_topics import bag_of_units

    units = torch.tensor([0, 2, 2, 1, 1, 1, 0])  # item 5: [0, 2, 2], item 3: [1, 1, 1, 0]
    table = UnitTable(units, torch.tensor([5, 3]), torch.tensor([0, 3]), torch.tensor([3, 4]), {"k": 3})
    ids, counts = bag_of_units(_Target(Path("."), {"k": 3}, units=table).sample_units, 3)
    got = {int(i): c.tolist() for i, c in zip(ids, counts)}
    assert got == {5: [1.0, 0.0, 2.0], 3: [1.0, 3.0, 0.0]}
    assert _int_list([100, 500], "k") == [100, 500] and _int_list(None, "k") == []
    with pytest.raises(ValueError, match="integer or a list"):
        _int_list([100, 1.5], "k")
    cfg = compose(["modality=image", "objective=hubert", "model.depth=1"])
    mcfg = OmegaConf.to_container(cfg.modality.image, resolve=True)
    enc = build_encoder(encoder_config("image", "micro", mcfg, OmegaConf.to_container(cfg.model), "hubert"))
    with pytest.raises(ValueError, match="lists 3 layers for 2 codebooks"):
        build_objective("hubert", {"k": [8, 4], "layer": [1, 2, 3], "targets": "layer"}, {"image": enc}, {"image": mcfg})
