"""Two CPU processes (gloo, torchrun's environment variables): features gathered with gradients, the
full global-batch loss on every rank, DDP gradient averaging -> the loss and parameter gradients of one
process on the whole batch. Also checks that a gather without gradients does not get there.

The workers are this file run as a script (``python tests/test_gather_ddp.py OUT``) with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set by torchrun, and write their results to OUT/rank{r}.pt."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from mmssl.objectives.contrastive_loss import clip_loss, cloob_loss, normalise
from mmssl.train.gather import gather_no_grad, gather_with_grad, rank_world

WORLD = 2
GLOBAL_BATCH = 8


class TwoTowers(nn.Module):
    """Two linear 'towers' to a shared 4-d space and one learnable log scale (CLIP's logit scale, or
    CLOOB's inverse temperature when that is learnable)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tower_a = nn.Linear(6, 4)
        self.tower_b = nn.Linear(5, 4)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return normalise(self.tower_a(xa)), normalise(self.tower_b(xb)), self.log_scale


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def loss_of(kind: str, fa: torch.Tensor, fb: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    if kind == "clip":
        return clip_loss(fa, fb, log_scale)
    return cloob_loss(fa, fb, inv_tau=log_scale.exp(), beta=8.0)


def results(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"loss": loss.detach().clone()}
    out.update({n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


def _worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mmssl.train.distributed import init_distributed, shutdown

    info = init_distributed("cpu")
    rank, world = rank_world()
    assert (rank, world) == (info.rank, WORLD)
    xa, xb = global_batch()
    b = GLOBAL_BATCH // world
    xa, xb = xa[rank * b:(rank + 1) * b], xb[rank * b:(rank + 1) * b]
    saved: dict[str, torch.Tensor] = {}
    for kind in ("clip", "cloob"):
        for gather in ("grad", "nograd"):
            model = DDP(TwoTowers())
            fa, fb, log_scale = model(xa, xb)
            if gather == "grad":
                all_a, all_b = gather_with_grad(fa), gather_with_grad(fb)
            else:  # open_clip's default: gathered copies without gradients, own slice put back
                all_a, all_b = (torch.cat([gather_no_grad(f)[:rank * b], f, gather_no_grad(f)[(rank + 1) * b:]])
                                for f in (fa, fb))
            loss = loss_of(kind, all_a, all_b, log_scale)
            loss.backward()  # DDP averages the parameter gradients over the ranks here
            saved.update({f"{kind}/{gather}/{k}": v for k, v in results(model, loss).items()})
    saved["gathered_a"] = gather_no_grad(fa)
    torch.save(saved, out_dir / f"rank{rank}.pt")
    shutdown(info)


def test_gather_with_grad_ddp_equals_single_process(tmp_path: Path) -> None:
    # torchrun, as a user launches it: --standalone rendezvous picks its own free port (a port chosen
    # here and released before the workers bind it was a race, and raw env rendezvous hung once in CI)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           __file__, str(tmp_path)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    # the reference: one process, the whole batch, no gather
    xa, xb = global_batch()
    ref: dict[str, dict[str, torch.Tensor]] = {}
    for kind in ("clip", "cloob"):
        model = TwoTowers()
        fa, fb, log_scale = model(xa, xb)
        loss = loss_of(kind, fa, fb, log_scale)
        loss.backward()
        ref[kind] = results(model, loss)
    feats_a = normalise(TwoTowers().tower_a(xa)).detach()

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["gathered_a"], feats_a)  # rank order
        for kind in ("clip", "cloob"):
            for name, want in ref[kind].items():
                torch.testing.assert_close(got[f"{kind}/grad/{name}"], want, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, k=kind, n=name, r=rank: f"{k} {n} rank {r}: {m}")
            # without gradients through the gather the tower gradients are wrong (the loss is not)
            torch.testing.assert_close(got[f"{kind}/nograd/loss"], ref[kind]["loss"])
            diff = (got[f"{kind}/nograd/tower_a.weight"] - ref[kind]["tower_a.weight"]).abs().max()
            assert diff > 1e-3, kind


def test_gather_is_identity_in_one_process() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert rank_world() == (0, 1)
    assert gather_with_grad(x) is x
    y = gather_no_grad(x)
    assert not y.requires_grad and torch.equal(y, x)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
