"""How the objective is spread over the processes: ``trainer.strategy=ddp|fsdp``.

- ``ddp`` (the default): every rank holds the whole objective and its optimizer state;
  DistributedDataParallel all-reduces the gradients. Checkpoints are one safetensors file written by
  rank 0.
- ``fsdp``: FSDP2 shards every transformer block and the rest of the objective across the ranks
  (``mmssl.train.fsdp``); parameters, gradients and optimizer state live in shards. Checkpoints are
  sharded ``torch.distributed.checkpoint`` folders, resumable at another world size. In one process
  there is nothing to shard: the objective runs as it is, its checkpoints still in the sharded format.

``trainer.activation_checkpointing=true`` recomputes each trainable block's activations in the backward
under either strategy.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mmssl.errors import ConfigError
from mmssl.train import fsdp
from mmssl.train.distributed import DistInfo

STRATEGIES = ("ddp", "fsdp")


class Strategy:
    """The wrapping, gradient synchronisation and clipping of one strategy (module docstring)."""

    def __init__(self, t: dict[str, Any], dist_info: DistInfo, device: torch.device) -> None:
        self.name = str(t.get("strategy") or "ddp")
        if self.name not in STRATEGIES:
            raise ConfigError(f"trainer.strategy={self.name!r}: choose one of {', '.join(STRATEGIES)}")
        self.t, self.dist, self.device = t, dist_info, device
        self.activation_checkpointing = bool(t.get("activation_checkpointing", False))
        self.model: nn.Module | None = None

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are torch.distributed.checkpoint folders (fsdp, any world size)."""
        return self.name == "fsdp"

    @property
    def sharded(self) -> bool:
        """Whether the parameters are sharded across processes now."""
        return self.name == "fsdp" and self.dist.enabled

    def check(self, objective: nn.Module) -> None:
        """One-line refusals of what the strategy cannot run, before anything is written."""
        if self.name != "fsdp":
            return
        if self.t.get("peft") not in (None, "none", "null", False):
            raise ConfigError("trainer.peft=lora runs under trainer.strategy=ddp (its merged teacher twins "
                              "are not sharded); drop trainer.strategy=fsdp")
        drops = [float(getattr(e, "backbone_cfg", None).layer_drop) for e in objective.encoders.values()
                 if getattr(e, "backbone_cfg", None) is not None]
        if any(d > 0 for d in drops):
            raise ConfigError(f"model.layer_drop={max(drops)} under trainer.strategy=fsdp: ranks would skip "
                              f"different blocks and wait for each other's shards forever; set model.layer_drop=0")

    def prepare(self, objective: nn.Module) -> nn.Module:
        """Activation checkpointing, then (fsdp) the sharding; before the optimizer is built, since
        sharding replaces the parameters. -> the objective (the same module)."""
        if self.activation_checkpointing:
            fsdp.checkpoint_activations(objective)
        if self.sharded:
            fsdp.shard(objective, self.device)
        return objective

    def wrap(self, objective: nn.Module) -> nn.Module:
        """The module the step calls: DDP around the objective (ddp, several processes), else the
        objective itself (fsdp shards in place)."""
        if self.name == "ddp" and self.dist.enabled:
            # blocks skipped by layer drop leave parameters without gradients on some ranks
            unused = bool(self.t.get("find_unused_parameters", False)) or any(
                getattr(e, "backbone_cfg", None) is not None and e.backbone_cfg.layer_drop > 0
                for e in objective.encoders.values())
            self.model = DDP(objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             broadcast_buffers=False, find_unused_parameters=unused)
        else:
            self.model = objective
        return self.model

    def sync(self, i: int, n: int) -> contextlib.AbstractContextManager:
        """DDP: skip the all-reduce on all but the last of ``n`` micro-batches. FSDP2 reduce-scatters each
        micro-batch's gradients into the shards (its own accumulation); nothing to skip."""
        if isinstance(self.model, DDP) and i < n - 1:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, objective: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` (inf: measure only) -> the total gradient norm before clipping."""
        if self.sharded:
            fsdp.average_replicated_grads(objective)
            return fsdp.clip_grad_norm(objective, max_norm)
        if self.dist.enabled:
            # the norm summed shard by shard, as FSDP sums it: a clipped 2-process DDP run and FSDP run stay
            # bit for bit equal (a last-bit change in the coefficient grows to 1e-4 in a DINO loss in 20 steps)
            return fsdp.clip_grad_norm(objective, max_norm, as_shards=self.dist.world)
        return torch.nn.utils.clip_grad_norm_(objective.parameters(), max_norm)

    def call(self, objective: nn.Module) -> Callable[..., Any]:
        """How code outside the objective's forward calls into it (the monitor's embeddings)."""
        return lambda fn, *a, **k: fsdp.call_unsharded(objective, fn, *a, **k)
