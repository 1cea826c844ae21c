"""Every single-modality adapter under every teacher-student objective: one real optimizer step on a
batch of its embedded preset (the contract end to end), the teacher moving only through its update."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmssl.config import compose
from mmssl.data.loader import iter_split, resolve_source
from mmssl.factory import build_encoder, build_objective, encoder_config
from mmssl.registry import OBJECTIVES

MODALITIES = ["speech", "image", "text", "eeg", "point", "mri"]
OBJECTIVE_RUNS = [("data2vec", []), ("data2vec", ["objective.version=2", "objective.num_masks=2"])]
if "distill" in OBJECTIVES:
    OBJECTIVE_RUNS.append(("distill", []))


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("objective,extra", OBJECTIVE_RUNS, ids=lambda x: "-".join(x) if isinstance(x, list) else x)
def test_one_step_on_the_embedded_preset(modality: str, objective: str, extra: list[str], cache_dir: Path) -> None:
    torch.manual_seed(0)
    cfg = compose([f"modality={modality}", f"objective={objective}", "model.depth=2", *extra])
    mcfg = OmegaConf.to_container(cfg.modality[modality], resolve=True)
    enc = build_encoder(encoder_config(modality, "micro", mcfg, OmegaConf.to_container(cfg.model), objective))
    obj = build_objective(objective, OmegaConf.to_container(cfg.objective, resolve=True), {modality: enc},
                          {modality: mcfg})
    src = resolve_source({"name": "default"}, [modality], mcfg["preset"], cache_dir)
    max_len = mcfg.get("max_len") or enc.config["preprocessing"].get("max_len")
    batch = next(iter(iter_split(src, "val", batch_size=6, buffer=6, max_len=max_len)))
    batch = {k: v for k, v in batch.items() if k not in ("label", "sample_id")}

    from mmssl.objectives.base import PrepareContext

    obj.prepare(PrepareContext(iter_split=lambda s: iter(()), device=torch.device("cpu"), run_dir=Path("."),
                               cache_dir=cache_dir, data_fingerprint="x", total_steps=10, steps_per_epoch=5))
    obj.train()
    teacher = {n: p.clone() for n, p in obj.teacher.named_parameters()}
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    out = obj(batch)
    assert torch.isfinite(out.loss), (modality, objective, out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    obj.before_step(0)
    opt.step()
    # before the update the teacher is untouched by the optimizer step
    assert all(torch.equal(teacher[n], p) for n, p in obj.teacher.named_parameters())
    obj.after_step(0)
    assert any(not torch.equal(teacher[n], p) for n, p in obj.teacher.named_parameters())
    for k, v in out.metrics.items():
        assert torch.isfinite(torch.as_tensor(v, dtype=torch.float32)).all(), k
