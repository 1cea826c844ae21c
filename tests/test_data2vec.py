"""data2vec against its formulation on hand-made tensors; the EMA teacher is a copy that follows the
student only through its update rule; a resumed run restores the teacher exactly."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmssl.backbone import BackboneConfig
from mmssl.encoder import Encoder
from mmssl.lora import apply_lora
from mmssl.objectives.data2vec import Data2Vec, data2vec_targets, instance_norm_tokens, regression_loss, spread
from mmssl.objectives.ema import EMATeacher, ema_cosine, ema_linear
from tests.test_mae import Toy


def toy_encoder(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    enc = Encoder(Toy(32, {"P": 6}), BackboneConfig(dim=32, depth=3, heads=4, ffn_dim=64))
    enc.config = {"size": "micro"}
    return enc


def toy_batch(B: int = 3, N: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"toy": torch.randn(B, N, 6, generator=g), "toy_len": torch.tensor([N, N - 3, N - 1][:B])}


# -- the EMA teacher -------------------------------------------------------------------------------------
def test_teacher_is_a_frozen_copy_that_moves_only_by_its_rule() -> None:
    student = toy_encoder()
    teacher = EMATeacher(student)
    s_ptrs = {p.data_ptr() for p in student.parameters()}
    assert not s_ptrs & {p.data_ptr() for p in teacher.parameters()}  # never an alias
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.module.training  # no dropout in the teacher, whatever the objective's mode
    before = {n: p.clone() for n, p in teacher.module.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[n], p) for n, p in teacher.module.named_parameters())
    teacher.update(student, 0.9)
    for (n, t), s in zip(teacher.module.named_parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * before[n] + 0.1 * s, rtol=0, atol=1e-6)


def test_teacher_follows_a_lora_student_through_its_merged_weights() -> None:
    student = toy_encoder()
    teacher = EMATeacher(student)
    apply_lora(student.backbone, ("qkv", "proj"), rank=2, alpha=4)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    qkv = student.backbone.blocks[0].attn.qkv
    merged = qkv.base.weight + qkv.delta_weight()
    t0 = teacher.module.backbone.blocks[0].attn.qkv.weight.clone()
    teacher.update(student, 0.5)
    torch.testing.assert_close(teacher.module.backbone.blocks[0].attn.qkv.weight, 0.5 * t0 + 0.5 * merged)


def test_momentum_schedules() -> None:
    assert ema_linear(0, 0.999, 0.9999, 100) == pytest.approx(0.999)
    assert ema_linear(50, 0.999, 0.9999, 100) == pytest.approx(0.99945)
    assert ema_linear(100, 0.999, 0.9999, 100) == pytest.approx(0.9999)
    assert ema_linear(500, 0.999, 0.9999, 100) == pytest.approx(0.9999)
    # DINO: 1 - (1 - m0) (cos(pi t / T) + 1) / 2
    assert ema_cosine(0, 100, 0.996) == pytest.approx(0.996)
    assert ema_cosine(50, 100, 0.996) == pytest.approx(0.998)
    assert ema_cosine(25, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert ema_cosine(100, 100, 0.996) == pytest.approx(1.0)


# -- targets -------------------------------------------------------------------------------------------
def test_encoder_exposes_each_blocks_ffn_output_before_the_residual() -> None:
    enc = toy_encoder().eval()
    seen: list[torch.Tensor] = []
    hooks = [b.ffn.register_forward_hook(lambda m, i, o: seen.append(o)) for b in enc.backbone.blocks]
    out = enc(toy_batch(), return_ffn=True, return_layers=True)
    for h in hooks:
        h.remove()
    assert len(out.ffn) == 3
    for f, s in zip(out.ffn, seen):
        torch.testing.assert_close(f, s)
    # pre-norm: block output = (its input + attention) + ffn, so the FFN output is not the block output
    assert not torch.allclose(out.ffn[-1], out.layers[-1])


def test_targets_match_the_data2vec_formulation_by_hand() -> None:
    # two samples, 3 tokens, 2 channels; the second sample's last token is padding
    f1 = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]], [[2.0, 0.0], [4.0, 2.0], [100.0, 100.0]]])
    f2 = torch.tensor([[[0.0, 1.0], [0.0, 3.0], [3.0, 2.0]], [[1.0, 1.0], [3.0, 3.0], [-50.0, 7.0]]])
    f0 = torch.full_like(f1, 9.0)  # below the top 2: must not count
    pad = torch.tensor([[False, False, False], [False, False, True]])

    def inorm(x: torch.Tensor, n_real: list[int]) -> torch.Tensor:
        out = torch.zeros_like(x)
        for b, n in enumerate(n_real):
            for c in range(x.shape[2]):
                v = x[b, :n, c]
                mu, var = v.mean(), ((v - v.mean()) ** 2).mean()
                out[b, :, c] = (x[b, :, c] - mu) / math.sqrt(var + 1e-5)
        return out

    want = (inorm(f1, [3, 2]) + inorm(f2, [3, 2])) / 2
    got = data2vec_targets([f0, f1, f2], pad, 2, "instance")
    torch.testing.assert_close(got[~pad], want[~pad])
    # sample 1, channel 0 over its two real tokens [2, 4]: (2 - 3) / 1 = -1 in f1, and [1, 3] -> -1 in f2
    assert got[1, 0, 0].item() == pytest.approx(-1.0, abs=1e-4)

    def lnorm(x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5)

    torch.testing.assert_close(data2vec_targets([f0, f1, f2], pad, 2, "layer"), (lnorm(f1) + lnorm(f2)) / 2)
    # top_k above the depth is clamped: all three blocks
    torch.testing.assert_close(data2vec_targets([f0, f1, f2], pad, 10, "none"), (f0 + f1 + f2) / 3)
    # a final layer norm after averaging
    torch.testing.assert_close(data2vec_targets([f1, f2], pad, 2, "none", "layer"), lnorm((f1 + f2) / 2))
    # padding never moves the statistics of real tokens
    f1b = f1.clone()
    f1b[1, 2] = -1e4
    torch.testing.assert_close(instance_norm_tokens(f1b, pad)[~pad], instance_norm_tokens(f1, pad)[~pad])


def test_regression_loss_is_summed_over_dimensions_and_scaled() -> None:
    p = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.5, 0.0]])
    # MSE: row 0 = 4 * 1 / 2; row 1 = (0 + 9 + 0.25 + 0) / 2
    torch.testing.assert_close(regression_loss(p, t, "mse", 0.0), torch.tensor([2.0, 4.625]))
    # smooth L1, beta 2: |d| < 2 -> d^2 / 4, else |d| - 1: row 1 = 0 + 2 + 0.0625 + 0
    torch.testing.assert_close(regression_loss(p, t, "smooth_l1", 2.0), torch.tensor([0.5, 1.03125]))
    assert spread(torch.ones(5, 3)) == pytest.approx(1e-3, rel=1e-3)  # collapsed: sqrt(0 + 1e-6)


# -- the objective -------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_objective_regresses_the_teachers_targets_on_hidden_tokens(version: int) -> None:
    obj = Data2Vec(("toy", toy_encoder()), {"mask_ratio": 0.5, "top_k": 2, "target_norm": "instance",
                                           "loss": "mse", "version": version, "num_masks": 3,
                                           "decoder_depth": 2, "decoder_kernel": 3, "decoder_groups": 4})
    obj.train()
    batch = toy_batch()
    torch.manual_seed(5)
    out = obj(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss > 0
    assert all(p.grad is None for p in obj.teacher.parameters())  # nothing flows into the teacher
    assert obj.encoder.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert float(out.metrics["target_var"]) > 0.5  # instance-normalised targets: unit spread per channel
    if version == 1:
        # by hand, with the same mask: teacher targets, student on replace-masked tokens, linear head
        torch.manual_seed(5)
        tok = obj.encoder.adapter.tokenize(batch)
        hidden = obj.encoder.adapter.make_mask(tok, 0.5) & ~tok.pad
        with torch.no_grad():
            t_out = obj.teacher.module.encode(tok, return_ffn=True)
            y = sum(instance_norm_tokens(f, tok.pad) for f in t_out.ffn[-2:]) / 2
            pred = obj.head(obj.encoder.encode(tok, hidden, "replace").last)
        want = ((pred[hidden] - y[hidden]) ** 2).sum(-1).mean() / math.sqrt(32)
        assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    else:
        # three masks per sample, each hiding about half of that sample's real tokens
        assert float(out.metrics["mask_fraction"]) == pytest.approx(0.5, abs=0.1)


def test_after_step_moves_the_teacher_by_the_annealed_momentum() -> None:
    obj = Data2Vec(("toy", toy_encoder()), {"mask_ratio": 0.5, "ema_decay": 0.9, "ema_end_decay": 0.99,
                                           "ema_anneal_steps": 10})
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(1.0)
    t0 = obj.teacher.module.backbone.norm.weight.clone()
    obj.after_step(5)  # momentum 0.9 + (0.99 - 0.9) * 5 / 10 = 0.945
    s = obj.encoder.backbone.norm.weight
    torch.testing.assert_close(obj.teacher.module.backbone.norm.weight, 0.945 * t0 + 0.055 * s)


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="target_norm"):
        Data2Vec(("toy", toy_encoder()), {"mask_ratio": 0.5, "target_norm": "batch"})
    with pytest.raises(ValueError, match="loss"):
        Data2Vec(("toy", toy_encoder()), {"mask_ratio": 0.5, "loss": "l3"})
    with pytest.raises(ValueError, match="mask_ratio"):
        Data2Vec(("toy", toy_encoder()), {})


# -- resume ----------------------------------------------------------------------------------------------
def _overrides(data: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["objective=data2vec", "data=shards", f"data.path={data}", f"run_dir={run}", f"trainer.max_steps={steps}",
            "trainer.batch_size=8", "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.num_workers=0",
            "trainer.progress=false", "trainer.tensorboard=false", "trainer.ckpt_every=3", "model.depth=2",
            "model.dim=64", "model.heads=2", "model.ffn_dim=128", "modality.speech.adapter.pos_conv_kernel=16",
            "modality.speech.adapter.pos_conv_groups=4", "objective.ema_decay=0.9", "objective.ema_end_decay=0.99",
            *extra]


def test_resume_restores_the_teacher_exactly(packed: Path, tmp_path: Path, cache_dir: Path) -> None:
    from safetensors.torch import load_file

    from mmssl.cli import main

    full = tmp_path / "full"
    assert main(["pretrain", *_overrides(packed, full, 6)]) == 0
    cut = tmp_path / "cut"
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("encoders", "heads", "plots", "metrics.jsonl"))
    shutil.rmtree(cut / "checkpoints" / "last")
    shutil.copytree(cut / "checkpoints" / "step_3", cut / "checkpoints" / "last")
    shutil.rmtree(cut / "checkpoints" / "step_6")
    assert main(["pretrain", *_overrides(packed, cut, 6), "resume=true"]) == 0

    def rows(run: Path) -> dict[int, dict]:
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    a, b = rows(full), rows(cut)
    for s in (4, 5, 6):  # the targets come from the teacher: equal losses need the teacher restored
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], abs=1e-5)
        assert b[s]["target_var"] == pytest.approx(a[s]["target_var"], abs=1e-5)
    wa = load_file(str(full / "checkpoints" / "last" / "model.safetensors"))
    wb = load_file(str(cut / "checkpoints" / "last" / "model.safetensors"))
    teacher_keys = [k for k in wa if k.startswith("teacher.")]
    assert teacher_keys and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in teacher_keys)
    # and the teacher moved away from the student's starting point during training
    init = load_file(str(full / "encoders_init" / "speech" / "model.safetensors"))
    assert any(not torch.allclose(wa["teacher.module." + k], v) for k, v in init.items())
