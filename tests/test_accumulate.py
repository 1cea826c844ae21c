"""trainer.accumulate=N: feature accumulation for contrastive objectives equals the N-times larger batch
in loss and in every parameter gradient (open_clip's accum_freq, with the temperature's gradient taken
once); plain accumulation equals the big batch where the loss is a mean over items."""
from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from mmssl.config import compose, to_dict
from mmssl.factory import build_encoder, build_objective, encoder_config
from mmssl.objectives.base import Objective
from mmssl.train import accumulate
from mmssl.types import Batch, ObjectiveOutput

SMALL = {"dim": 32, "depth": 2, "heads": 2, "ffn_dim": 64}
N, B = 4, 4  # 4 micro-batches of 4 against one batch of 16


def _objective(name: str, mods: tuple[str, str], small: dict[str, Any] = SMALL, **over: object) -> Objective:
    cfg = compose([f"modality=[{','.join(mods)}]", f"objective={name}"])
    mcfg = {m: to_dict(cfg.modality[m]) for m in mods}
    torch.manual_seed(0)
    encs = {m: build_encoder(encoder_config(m, "micro", mcfg[m], small, name)) for m in mods}
    ocfg = dict(to_dict(cfg.objective), embed_dim=16, **over)
    return build_objective(name, ocfg, encs, mcfg).train()


def _text(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    lens = torch.randint(4, 9, (n,), generator=g)
    text = torch.zeros(n, 9, dtype=torch.long)
    for i, k in enumerate(lens.tolist()):
        text[i, :k] = torch.randint(1, 2000, (k,), generator=g)
    return {"text": text, "text_len": lens}


def _batch(mods: tuple[str, str], n: int = N * B) -> Batch:
    g = torch.Generator().manual_seed(1)
    b = _text(n, g)
    if "image" in mods:
        b["image"] = torch.rand(n, 3, 32, 32, generator=g)
    if "speech" in mods:
        b["speech"] = torch.randn(n, 4000, generator=g) * 0.1
        b["speech_len"] = torch.full((n,), 4000)
    return b


def _split(batch: Batch, n: int) -> list[Batch]:
    size = next(iter(batch.values())).shape[0] // n
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(n)]


def _grads(obj: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}


def _none() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _sync(i: int, n: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


CASES = [pytest.param("clip", ("image", "text"), {}, id="clip"),
         pytest.param("cloob", ("image", "text"), {"learn_inv_tau": True, "learn_beta": True}, id="cloob",
                      marks=pytest.mark.slow),
         pytest.param("clap", ("speech", "text"), {}, id="clap", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("name", "mods", "over"), CASES)
def test_feature_accumulation_equals_the_big_batch(name: str, mods: tuple[str, str], over: dict[str, Any]) -> None:
    obj = _objective(name, mods, **over)
    batch = _batch(mods)
    ref = obj(batch).loss
    ref.backward()
    want = _grads(obj)
    obj.zero_grad(set_to_none=True)

    loss, metrics = accumulate.features(obj, _split(batch, N), _none, _sync, torch.device("cpu"))
    got = _grads(obj)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert float(metrics["accumulated_items"]) == N * B
    assert set(got) == set(want)
    temps = [n for n in want if n.startswith("head.log_")]
    assert temps, "the loss's own temperature takes a gradient"
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{name} {n}: {m}")

    # averaging four small-batch losses (plain accumulation) loses negatives: another loss and gradient
    obj.zero_grad(set_to_none=True)
    small, _ = accumulate.plain(obj, iter(_split(batch, N)), N, _none, _sync, torch.device("cpu"))
    assert abs(float(small) - float(ref.detach())) > 1e-3
    key = next(n for n in want if n.startswith("towers."))
    assert (obj.get_parameter(key).grad - want[key]).abs().max() > 1e-6


@pytest.mark.slow
def test_feature_accumulation_replays_dropout() -> None:
    """With dropout on, each re-run with gradients draws the same features as its cached pass (the RNG
    state restored), so every pass computes the same loss, and the global RNG ends where the cached
    passes left it."""
    obj = _objective("clip", ("image", "text"), small=dict(SMALL, dropout=0.2))
    batches = _split(_batch(("image", "text")), N)
    torch.manual_seed(5)
    with torch.no_grad():
        cache = accumulate.FeatureCache()
        for b in batches:
            obj(b, cache=cache)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    _, metrics = accumulate.features(obj, batches, _none, _sync, torch.device("cpu"))
    assert float(metrics["accumulate_replay_gap"]) == 0.0
    assert torch.equal(torch.get_rng_state(), after)
    # without the replay the features would differ: dropout is really drawing
    with torch.no_grad():
        a, b = obj.features(batches[0])["image"], obj.features(batches[0])["image"]
    assert (a - b).abs().max() > 1e-4


class _MeanObjective(Objective):
    """A loss that is a mean over items: ||embed(x) - 1||^2 per item, averaged."""

    name = "mean_toy"

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.towers["image"] = encoder

    def forward(self, batch: Batch) -> ObjectiveOutput:
        per_item = (self.towers["image"].embed(batch) - 1.0).square().mean(-1)
        return ObjectiveOutput(per_item.mean(), {"items": float(per_item.shape[0])})


def test_plain_accumulation_equals_the_big_batch_for_a_per_item_mean() -> None:
    cfg = compose(["modality=image", "objective=mae"])
    torch.manual_seed(0)
    obj = _MeanObjective(build_encoder(encoder_config("image", "micro", to_dict(cfg.modality.image), SMALL, "mae")))
    batch = {"image": torch.rand(N * B, 3, 32, 32, generator=torch.Generator().manual_seed(2))}
    ref = obj(batch).loss
    ref.backward()
    want = _grads(obj)
    obj.zero_grad(set_to_none=True)
    loss, metrics = accumulate.plain(obj, iter(_split(batch, N)), N, _none, _sync, torch.device("cpu"))
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert float(metrics["items"]) == B
    got = _grads(obj)
    assert set(got) == set(want)
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
