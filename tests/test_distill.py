"""DINO-style self-distillation (objective=distill): the loss against DINO's own formulation written out
with loops, centring before sharpening, the centre update, the schedules, the EMA teacher's isolation,
the frozen last layer, a short CLI run that exports the teacher, and exact resume of teacher and centre."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mmssl.backbone import BackboneConfig
from mmssl.cli import main
from mmssl.encoder import Encoder
from mmssl.modalities.base import ModalityAdapter
from mmssl.objectives.base import PrepareContext
from mmssl.objectives.dino_loss import (batch_center, dino_loss, distinct_codes, logit_sum, teacher_temp_at,
                                       update_center)
from mmssl.objectives.distill import DINOHead, Distill, grouped_views
from mmssl.types import Batch, Tokens


# -- a toy adapter: rows of a [B, N, P] tensor are tokens; views are noisy crops ---------------------------
class Toy(ModalityAdapter):
    name = "toy"

    def __init__(self, dim: int, cfg: dict | None = None) -> None:
        super().__init__(dim, cfg)
        self.embed = nn.Linear(4, dim)
        self.pos_table = nn.Parameter(torch.randn(16, dim) * 0.02)

    def tokenize(self, batch: Batch) -> Tokens:
        x = batch["toy"]
        B, N = x.shape[:2]
        ar = torch.arange(N)
        return Tokens(self.embed(x), self.pos_table[:N][None].expand(B, -1, -1), torch.zeros(B, N, dtype=torch.bool),
                      ar[None, :, None].expand(B, -1, 1))

    def targets(self, batch, tokens=None):
        return batch["toy"]

    def recon_loss(self, pred, target, mask):
        return ((pred - target) ** 2).mean()

    def make_mask(self, tokens, ratio, generator=None):
        return torch.zeros_like(tokens.pad)

    def views(self, batch: Batch, n_global: int, n_local: int) -> list[Batch]:
        """Global: every token plus noise; local: a random run of half the tokens plus noise."""
        x = batch["toy"]
        N = x.shape[1]
        out = []
        for i in range(n_global + n_local):
            if i < n_global:
                v = x
            else:
                s = int(torch.randint(N - N // 2 + 1, ()))
                v = x[:, s:s + N // 2]
            out.append({"toy": v + 0.1 * torch.randn_like(v)})
        return out

    def baseline_features(self, batch):
        return batch["toy"].mean(1)


CFG = {"n_global": 2, "n_local": 2, "out_dim": 12, "head_hidden_dim": 16, "head_bottleneck_dim": 8}


def toy_distill(**cfg) -> Distill:
    torch.manual_seed(0)
    enc = Encoder(Toy(16), BackboneConfig(dim=16, depth=1, heads=2, ffn_dim=32))
    enc.config = {"size": "micro"}
    return Distill(("toy", enc), {**CFG, **cfg})


def toy_batch(B: int = 5, N: int = 8) -> Batch:
    return {"toy": torch.randn(B, N, 4, generator=torch.Generator().manual_seed(1))}


def prepare(obj: Distill, total: int = 100, per_epoch: int = 10) -> None:
    obj.prepare(PrepareContext(iter_split=lambda s: iter(()), device=torch.device("cpu"), run_dir=Path("."),
                               cache_dir=Path("."), data_fingerprint="x", total_steps=total,
                               steps_per_epoch=per_epoch))


# -- the loss ----------------------------------------------------------------------------------------------
def reference_dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
                        s_temp: float, t_temp: float) -> torch.Tensor:
    """facebookresearch/dino DINOLoss.forward, written out: loop over (teacher view iq, student view v),
    skip v == iq, sum_k -q log_softmax(s / s_temp) per item, mean over items, mean over pairs."""
    total, n = 0.0, 0
    for iq, t in enumerate(teacher):
        q = F.softmax((t - center) / t_temp, dim=-1)
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s / s_temp, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_loss_matches_dino_reference() -> None:
    g = torch.Generator().manual_seed(0)
    G, V, B, K = 2, 5, 3, 7
    s, t = torch.randn(V, B, K, generator=g), torch.randn(G, B, K, generator=g)
    c = torch.randn(K, generator=g) * 0.3
    res = dino_loss(s, t, c, 0.1, 0.05)
    ref = reference_dino_loss(list(s), list(t), c, 0.1, 0.05)
    assert torch.allclose(res.loss, ref, atol=1e-5), (res.loss, ref)
    # the KL is CE - H(q) pair by pair; each teacher view meets V - 1 students, so the means agree too
    assert torch.allclose(res.kl_teacher_student, res.loss - res.teacher_entropy, atol=1e-5)
    assert res.kl_teacher_student > 0


def test_loss_by_hand_and_same_view_pairs_excluded() -> None:
    """One teacher view (q = [1/4, 3/4]), two student views: only student view 1 is scored, so the loss
    is -(1/4 ln 1/3 + 3/4 ln 2/3) = ln 3 - 3/4 ln 2 whatever student view 0 says."""
    t = torch.tensor([[[0.0, 0.04 * math.log(3)]]])  # [G=1, B=1, K=2] at teacher temperature 0.04
    for view0 in ([100.0, -100.0], [-5.0, 5.0]):
        s = torch.tensor([[view0], [[0.0, 0.1 * math.log(2)]]])  # [V=2, B=1, K=2]: p_1 = [1/3, 2/3]
        res = dino_loss(s, t, torch.zeros(2), 0.1, 0.04)
        assert abs(float(res.loss) - (math.log(3) - 0.75 * math.log(2))) < 1e-5
        assert torch.allclose(res.teacher_probs[0, 0], torch.tensor([0.25, 0.75]))


def test_centring_comes_before_sharpening() -> None:
    """Subtracting the centre from the logits first: a centre equal to an item's logits makes its teacher
    distribution exactly uniform, at any temperature (sharpening first would not)."""
    t = torch.tensor([[[1.0, 3.0, -2.0], [0.5, 0.0, 0.2]]])  # [1, 2, 3]
    res = dino_loss(torch.randn(2, 2, 3), t, t[0, 0], 0.1, 0.04)
    assert torch.allclose(res.teacher_probs[0, 0], torch.full((3,), 1 / 3))
    assert abs(float(res.teacher_probs[0, 0].sum()) - 1) < 1e-6
    assert not torch.allclose(res.teacher_probs[0, 1], torch.full((3,), 1 / 3), atol=1e-2)
    assert abs(float(res.teacher_entropy) - (math.log(3) + float(torch.special.entr(res.teacher_probs[0, 1]).sum())) / 2) < 1e-5


def test_centre_update_formula() -> None:
    g = torch.Generator().manual_seed(3)
    c0, t = torch.randn(6, generator=g), torch.randn(2, 4, 6, generator=g)
    c = c0.clone()
    mean, n = batch_center(*logit_sum(t))
    update_center(c, mean, 0.9)
    assert int(n) == 8 and torch.allclose(c, 0.9 * c0 + 0.1 * t.reshape(-1, 6).mean(0), atol=1e-6)
    # a non-finite row (a broken input) is left out of the mean instead of poisoning the centre
    t[1, 2, 0] = float("nan")
    mean, n = batch_center(*logit_sum(t))
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1, 2] = False
    assert int(n) == 7 and torch.allclose(mean, t[keep].mean(0), atol=1e-6)
    assert float(distinct_codes(F.one_hot(torch.zeros(8, dtype=torch.long), 6).float())) == pytest.approx(1 / 6)


def test_forward_scores_against_the_old_centre_then_updates_it() -> None:
    obj = toy_distill(center_momentum=0.8)
    prepare(obj)
    obj.center.normal_()  # a non-trivial centre
    c0 = obj.center.clone()
    b = toy_batch()
    torch.manual_seed(5)
    out = obj(b)
    torch.manual_seed(5)  # the same views again
    views = obj.encoder.adapter.views(b, 2, 2)
    with torch.no_grad():
        s = obj._logits(obj.encoder, obj.head, views)
        t = obj._logits(obj.teacher.module.encoder, obj.teacher.module.head, views[:2])
    ref = reference_dino_loss(list(s), list(t), c0, 0.1, obj.teacher_temp_at(0))
    assert torch.allclose(out.loss, ref, atol=1e-5)
    assert torch.equal(obj.center, c0)  # the step is not done: a skipped (non-finite) step never moves it
    obj.after_step(0)
    assert torch.allclose(obj.center, 0.8 * c0 + 0.2 * t.reshape(-1, t.shape[-1]).mean(0), atol=1e-5)
    # a step of two micro-batches (accumulation): one update with the mean over both
    c1 = obj.center.clone()
    torch.manual_seed(6)
    obj(b)
    obj(toy_batch(B=3))
    torch.manual_seed(6)
    with torch.no_grad():
        t1 = obj._logits(obj.teacher.module.encoder, obj.teacher.module.head, obj.encoder.adapter.views(b, 2, 2)[:2])
        t2 = obj._logits(obj.teacher.module.encoder, obj.teacher.module.head,
                         obj.encoder.adapter.views(toy_batch(B=3), 2, 2)[:2])
    both = torch.cat([t1.reshape(-1, 12), t2.reshape(-1, 12)]).mean(0)
    obj.after_step(1)
    assert torch.allclose(obj.center, 0.8 * c1 + 0.2 * both, atol=1e-5)
    for k in ("teacher_entropy", "kl_teacher_student", "teacher_temp", "ema_momentum", "teacher_codes"):
        assert k in out.metrics
    obj.eval()
    c2 = obj.center.clone()
    with torch.no_grad():
        obj(b)
    obj.after_step(2)
    assert torch.equal(obj.center, c2)  # validation never moves the centre
    obj.train()
    with torch.no_grad():
        bad = obj({"toy": torch.full((2, 8, 4), float("nan"))})
    obj.after_step(3)
    assert not torch.isfinite(bad.loss) and torch.equal(obj.center, c2)  # nothing finite: the centre stays


def test_same_shape_views_share_one_pass_with_the_same_outputs() -> None:
    obj = toy_distill()
    obj.eval()
    torch.manual_seed(2)
    views = obj.encoder.adapter.views(toy_batch(), 2, 3)
    groups = grouped_views(views)
    assert [idx for idx, _ in groups] == [[0, 1], [2, 3, 4]]  # globals together, locals together
    with torch.no_grad():
        together = obj._logits(obj.encoder, obj.head, views)
        alone = torch.stack([obj.head(obj.encoder.embed(v)) for v in views])
    assert torch.allclose(together, alone, atol=1e-5)


def test_head_last_layer_rows_have_norm_one() -> None:
    torch.manual_seed(0)
    h = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4)
    with torch.no_grad():
        h.last_layer.weight.mul_(torch.rand(10, 1) * 5 + 0.1)  # rescaling a row changes nothing
        y = h(torch.randn(3, 8))
        z = F.normalize(h.mlp(torch.randn(3, 8)), dim=-1)
    assert y.shape == (3, 10) and float(y.abs().max()) <= 1 + 1e-5  # cosines of unit vectors
    assert abs(float(z.norm(dim=-1).mean()) - 1) < 1e-5
    assert sum(isinstance(m, nn.GELU) for m in h.mlp) == 2 and len([m for m in h.mlp if isinstance(m, nn.Linear)]) == 3



def test_head_batch_norm_uses_batch_statistics_in_eval_mode_too() -> None:
    """use_bn_in_head: what every item of the batch shares is normalised away, in the student (train
    mode) and the eval-mode teacher alike; without BN it is not."""
    torch.manual_seed(0)
    x, shift = torch.randn(6, 8), 3.0 * torch.randn(1, 8)
    bn = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.mlp) == 2
    for mode in (True, False):
        bn.train(mode)
        with torch.no_grad():
            assert torch.allclose(bn(x), bn(x + shift), atol=1e-4)
    plain = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x), plain(x + shift), atol=1e-2)


# -- schedules ---------------------------------------------------------------------------------------------
def test_schedules_at_given_steps() -> None:
    assert teacher_temp_at(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temp_at(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temp_at(30, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temp_at(99, 30, 0.04, 0.07) == pytest.approx(0.07)
    obj = toy_distill(teacher_temp_warmup_fraction=0.3, momentum_base=0.99)
    prepare(obj, total=100, per_epoch=10)
    assert obj.temp_warmup_steps == 30 and obj.freeze_last_layer_steps == 10  # null: one epoch
    assert obj.teacher_temp_at(15) == pytest.approx(0.055)
    assert obj.momentum_at(0) == pytest.approx(0.99)
    assert obj.momentum_at(50) == pytest.approx(0.995)  # halfway up the cosine from 0.99 to 1
    assert obj.momentum_at(100) == pytest.approx(1.0)
    obj2 = toy_distill(teacher_temp_warmup_steps=7, freeze_last_layer_steps=3)
    prepare(obj2, total=100, per_epoch=10)
    assert obj2.temp_warmup_steps == 7 and obj2.freeze_last_layer_steps == 3
    assert obj2.momentum_base == 0.996 and obj2.student_temp == 0.1 and obj2.center_momentum == 0.9  # the paper's


# -- the teacher -------------------------------------------------------------------------------------------
def test_teacher_is_a_separate_copy_without_gradients() -> None:
    obj = toy_distill()
    prepare(obj)
    student = {p.data_ptr() for p in [*obj.encoder.parameters(), *obj.head.parameters()]}
    teacher = list(obj.teacher.parameters())
    assert teacher and not student & {p.data_ptr() for p in teacher}
    assert all(not p.requires_grad for p in teacher)
    # the same values at the start: EMA of encoder and head both
    s_state = {**{f"encoder.{k}": v for k, v in obj.encoder.state_dict().items()},
               **{f"head.{k}": v for k, v in obj.head.state_dict().items()}}
    assert all(torch.equal(s_state[k], v) for k, v in obj.teacher.module.state_dict().items())
    obj.train()
    obj(toy_batch()).loss.backward()
    assert all(p.grad is None for p in teacher)
    assert obj.teacher.module.training is False
    assert set(obj.exported()["toy"].state_dict()) == set(obj.encoder.state_dict())
    assert obj.exported()["toy"] is obj.teacher.module.encoder  # DINO evaluates the teacher


def test_last_layer_gradients_cancelled_during_the_first_epoch_only() -> None:
    obj = toy_distill(freeze_last_layer_steps=2, momentum_base=0.5)
    prepare(obj)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    b = toy_batch()
    for step in range(3):
        w0, m0 = obj.head.last_layer.weight.detach().clone(), obj.head.mlp[0].weight.detach().clone()
        t0 = obj.teacher.module.head.mlp[0].weight.detach().clone()
        obj(b).loss.backward()
        obj.before_step(step)
        frozen = step < 2
        assert (obj.head.last_layer.weight.grad is None) == frozen
        assert obj.head.mlp[0].weight.grad is not None
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.after_step(step)
        assert torch.equal(obj.head.last_layer.weight, w0) == frozen
        assert not torch.equal(obj.head.mlp[0].weight, m0)
        # the teacher moved halfway to the student (momentum 0.5 at step 0 of a 100-step cosine)
        m = obj.momentum_at(step)
        assert torch.allclose(obj.teacher.module.head.mlp[0].weight, m * t0 + (1 - m) * obj.head.mlp[0].weight,
                              atol=1e-6)
    assert int(obj.steps_done) == 3


# -- through the CLI: a short run, the export, exact resume ----------------------------------------------
SMALL = ["modality=image", "objective=distill", "data=digits", "model.depth=1", "model.dim=32", "model.heads=2",
         "model.ffn_dim=64", "objective.n_local=1", "objective.out_dim=16", "objective.head_hidden_dim=32",
         "objective.head_bottleneck_dim=8", "trainer.batch_size=8", "trainer.num_workers=0",
         "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=1", "trainer.warmup_steps=1",
         "trainer.threads=1"]


def _steps(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_cli_run_exports_the_teacher_and_resumes_exactly(tmp_path: Path, cache_dir: Path) -> None:
    full = tmp_path / "full"
    assert main(["pretrain", *SMALL, f"run_dir={full}", "trainer.max_steps=4", "trainer.ckpt_every=2",
                 "objective.freeze_last_layer_steps=1"]) == 0
    steps = _steps(full)
    assert sorted(steps) == [1, 2, 3, 4]
    for r in steps.values():
        assert math.isfinite(r["loss"]) and 0 < r["teacher_entropy"] <= math.log(16) + 1e-4
        assert r["kl_teacher_student"] >= -1e-5 and 0.04 - 1e-6 <= r["teacher_temp"] <= 0.07 + 1e-6
    state = load_file(str(full / "checkpoints/last/model.safetensors"))
    assert float(state["center"].abs().sum()) > 0 and int(state["steps_done"]) == 4
    # the export is the teacher's encoder, which differs from the student's after EMA steps
    exported = load_file(str(full / "encoders/image/model.safetensors"))
    teacher = {k[len("teacher.module.encoder."):]: v for k, v in state.items()
               if k.startswith("teacher.module.encoder.")}
    student = {k[len("towers.image."):]: v for k, v in state.items() if k.startswith("towers.image.")}
    assert set(exported) == set(teacher) == set(student)
    assert all(torch.equal(exported[k], teacher[k]) for k in exported)
    assert any(not torch.equal(exported[k], student[k]) for k in exported)
    assert (full / "heads/dino_head.safetensors").exists() and (full / "heads/dino_head_teacher.json").exists()

    # interrupted after step 2, resumed: the same losses, the same teacher and centre at the end
    cut = tmp_path / "cut"
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("encoders", "heads", "plots", "metrics.jsonl"))
    shutil.rmtree(cut / "checkpoints" / "last")
    shutil.copytree(cut / "checkpoints" / "step_2", cut / "checkpoints" / "last")
    shutil.rmtree(cut / "checkpoints" / "step_4")
    assert main(["pretrain", *SMALL, f"run_dir={cut}", "trainer.max_steps=4", "trainer.ckpt_every=2",
                 "objective.freeze_last_layer_steps=1", "resume=true"]) == 0
    again = _steps(cut)
    assert sorted(again) == [3, 4]
    for s in (3, 4):
        assert abs(again[s]["loss"] - steps[s]["loss"]) < 1e-5
    resumed = load_file(str(cut / "checkpoints/last/model.safetensors"))
    for k in [k for k in state if k.startswith("teacher.") or k in ("center", "steps_done")]:
        assert torch.equal(resumed[k], state[k]), k  # same thread count, same order of operations


def test_checkpoint_round_trip_of_teacher_and_centre(tmp_path: Path) -> None:
    """The objective's state through the trainer's checkpoint files (safetensors), into a fresh objective."""
    from mmssl.train import checkpoint as ckpt

    obj = toy_distill(momentum_base=0.5)
    prepare(obj)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        obj(toy_batch()).loss.backward()
        obj.before_step(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.after_step(step)
    tmp = ckpt.tmp_dir(tmp_path, "last")
    ckpt.write_rank_state(tmp, 0, {})
    ckpt.finish(tmp, obj, opt, {"step": 2}, ["last"], tmp_path)
    fresh = toy_distill(momentum_base=0.5)
    torch.manual_seed(9)
    fresh.head.last_layer.weight.data.normal_()  # make sure loading, not chance, restores it
    assert not torch.equal(fresh.center, obj.center)
    ckpt.load(tmp_path / "last", fresh, None, 0, torch.device("cpu"))
    assert torch.equal(fresh.center, obj.center) and int(fresh.steps_done) == 2
    mine = dict(obj.teacher.named_parameters())
    assert all(torch.equal(p, mine[n]) for n, p in fresh.teacher.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(fresh.head.parameters(), obj.head.parameters()))


def test_defaults_by_encoder_size_yield_to_the_config() -> None:
    sizes = {"micro": {"out_dim": 20, "head_hidden_dim": 24, "n_local": 3}}
    a = toy_distill(out_dim=None, head_hidden_dim=None, n_local=None, sizes=sizes)
    assert a.head.config["out_dim"] == 20 and a.head.config["hidden_dim"] == 24 and a.n_local == 3
    assert a.center.shape == (20,)
    b = toy_distill(out_dim=7, n_local=None, head_hidden_dim=None, sizes={"tiny": sizes["micro"]})
    assert b.head.config["out_dim"] == 7 and b.head.config["hidden_dim"] == 2048 and b.n_local == 8  # the paper's


def test_micro_defaults_from_the_shipped_configs() -> None:
    """The micro entry of configs/objective/distill.yaml and image's micro views, as a run builds them;
    the command line still wins."""
    from mmssl.config import compose, to_dict
    from mmssl.factory import build_encoder, build_objective, encoder_config

    cfg = compose(["modality=image", "objective=distill", "objective.momentum_base=0.9"])
    mcfg = to_dict(cfg.modality.image)
    enc_cfg = encoder_config("image", "micro", mcfg, {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64}, "distill")
    views = enc_cfg["adapter"]["views"]
    # the size refines two scales and keeps every other view key of the modality's
    assert views["global_scale"] == [0.5, 1.0] and views["local_scale"] == [0.2, 0.5] and views["jitter_p"] == 0.8
    obj = build_objective("distill", to_dict(cfg.objective), {"image": build_encoder(enc_cfg)}, {"image": mcfg})
    assert obj.head.config["out_dim"] == 256 and obj.head.config["batch_norm"] is True
    assert obj.teacher_temp == obj.warmup_teacher_temp == 0.04 and obj.n_local == 2
    assert obj.momentum_base == 0.9  # the command line over the size's 0.98
