"""HuBERT continued from a converted fairseq HuBERT (``init=``): the run predicts units with the
checkpoint's own ``final_proj`` and ``label_embs_concat``. The step-0 unit logits of a real
``mmssl pretrain ... init=OUT objective.targets=layer`` run, captured inside the objective's forward,
equal fairseq's formula (``HubertModel.compute_nce``: cosine similarity between ``final_proj(x)`` and
each label embedding, over ``logit_temp`` 0.1) computed from the checkpoint file's tensors, the label
Dictionary giving each unit's row."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_convert_fairseq import FINAL, K_UNITS, ORDER, write_hubert_checkpoint

from mmssl.cli import main


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A perturbed HuBERT checkpoint in fairseq's layout (K_UNITS units, 4 special rows, permuted
    dict.km.txt order), converted with ``mmssl convert``."""
    root = tmp_path_factory.mktemp("init-heads")
    src = root / "hubert_tiny.pt"
    _, sd = write_hubert_checkpoint(src, seed=11)
    assert main(["convert", str(src), str(root / "out"), "format=fairseq"]) == 0
    return root / "out", sd


def run_overrides(packed: Path, init: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["modality=speech", "objective=hubert", f"init={init}", "objective.targets=layer", "objective.layer=1",
            "data=shards", f"data.path={packed}", f"run_dir={run_dir}", f"trainer.max_steps={steps}",
            "trainer.batch_size=8", "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.num_workers=0",
            "trainer.progress=false", "trainer.tensorboard=false", "objective.kmeans_iters=5", *extra]


def test_init_defaults_follow_the_head(converted, packed, tmp_path) -> None:
    """resolve(): k, final_dim and temperature come from heads/hubert; targets=layer without a teacher
    clusters the init encoder; a different k on the command line is kept and named in one line."""
    from mmssl.config import resolve

    out, _ = converted
    spec = resolve(run_overrides(packed, out, tmp_path / "r", 1))
    o = spec.cfg.objective
    assert (o.k, o.final_dim, o.temperature, o.teacher) == (K_UNITS, FINAL, 0.1, str(out))
    spec = resolve(run_overrides(packed, out, tmp_path / "r", 1, "objective.k=7"))
    assert spec.cfg.objective.k == 7
    lines = [n for n in spec.notes if "start fresh" in n]
    assert len(lines) == 1 and "objective.k=7 (the head's: 12)" in lines[0]


@pytest.mark.slow  # a real 1-step run with k-means on the init encoder's layer: ~10 s on 2 busy cores
def test_step0_logits_are_the_checkpoints_heads(converted, packed, tmp_path, cache_dir, monkeypatch, capsys) -> None:
    import mmssl.objectives.hubert as hub

    out, sd = converted
    seen: dict[str, Any] = {}
    hooked: list[object] = []
    real_logits, real_forward = hub.unit_logits, hub.HuBERT.forward

    def logits_spy(proj, embeddings, temperature, target=None):
        y = real_logits(proj, embeddings, temperature, target)
        if "logits" not in seen:
            seen.update(logits=y.detach().clone(), emb=embeddings.detach().clone(), temp=temperature)
        return y

    def forward_spy(self, batch):
        if not hooked:  # the frames final_proj reads at step 0 (a hook returning None keeps the output)
            hooked.append(self.final_proj.register_forward_hook(
                lambda m, i, o: None if "x" in seen else seen.update(x=i[0].detach().clone())))
        return real_forward(self, batch)

    monkeypatch.setattr(hub, "unit_logits", logits_spy)
    monkeypatch.setattr(hub.HuBERT, "forward", forward_spy)
    assert main(["pretrain", *run_overrides(packed, out, tmp_path / "run", 1)]) == 0
    err = capsys.readouterr().err
    assert "initialised the hubert head from" in err
    # the reference: fairseq's compute_nce formula on the checkpoint file's own tensors
    rows = [4 + ORDER.index(u) for u in range(K_UNITS)]  # label u -> its Dictionary row
    emb = sd["label_embs_concat"][rows]
    x = seen["x"].reshape(-1, seen["x"].shape[-1])
    proj = F.linear(x, sd["final_proj.weight"], sd["final_proj.bias"])
    ref = torch.cosine_similarity(proj.float()[:, None, :], emb.float()[None, :, :], dim=-1) / 0.1
    assert torch.equal(seen["emb"], emb) and seen["temp"] == 0.1
    assert seen["logits"].shape == (x.shape[0], K_UNITS)
    diff = float((seen["logits"] - ref).abs().max())
    print(f"step-0 unit logits vs fairseq's formula on the checkpoint's heads: max|diff| = {diff:.2e}")
    assert diff < 1e-4
