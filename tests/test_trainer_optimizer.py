"""The trainer's AdamW: fused on the CPU as on CUDA, and the same updates as torch's per-tensor loop."""
from __future__ import annotations

import torch
from torch import nn

from mmssl.train.trainer import fused_adamw, param_groups


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8))


def test_fused_on_cpu() -> None:
    assert fused_adamw(torch.device("cpu"))
    assert not fused_adamw(torch.device("meta"))


def test_fused_cpu_adamw_matches_the_per_tensor_loop() -> None:
    """Ten steps with weight decay on the matrices only (param_groups): fused and for-loop AdamW move the
    weights alike to float rounding, so switching the CPU path to fused changes no result."""
    models = [_model(0), _model(0)]
    opts = [torch.optim.AdamW(param_groups(m, 0.05), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, fused=f)
            for m, f in zip(models, (True, False))]
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, y = torch.randn(12, 16, generator=g), torch.randn(12, 8, generator=g)
        for m, o in zip(models, opts):
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    start = _model(0)
    for (name, a), b, s in zip(models[0].named_parameters(), models[1].parameters(), start.parameters()):
        moved = (b - s).abs().max().item()
        assert moved > 1e-3, name  # the steps did move the weights
        assert (a - b).abs().max().item() < 1e-5 * max(1.0, moved), name
