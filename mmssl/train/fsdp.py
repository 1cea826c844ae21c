"""Fully sharded data parallel training on PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

``shard(objective)`` shards, in place and bottom-up, every transformer block of every tower (students,
EMA teachers and frozen teachers alike: each ``blocks`` / ``resblocks`` list's members), then the
objective as the root, which holds the rest (adapters, projections, decoders, heads, mask embeddings).
A block's parameters are gathered only while it runs; the root's for the whole objective forward, so an
objective may call any adapter or encoder method inside its ``forward``. Parameters are ``DTensor``
shards on dimension 0; teacher and student shards line up element for element, so an EMA update is a
``lerp_`` on the local shards (``local``; ``mmssl.objectives.ema``).

What FSDP2 cannot shard stays replicated: scalar parameters (a contrastive logit scale;
``fully_shard`` refuses 0-d parameters). Their gradients are averaged across ranks here
(``average_replicated_grads``), as DDP would.

On CUDA the blocks compute in bf16 and reduce gradients in bf16 (``MixedPrecisionPolicy``) while the
sharded master weights and the optimizer stay float32; on CPU everything is float32, so a CPU run under
FSDP equals the DDP run.

``checkpoint_activations`` recomputes each trainable block's activations in the backward
(``torch.utils.checkpoint``, non-reentrant, the RNG state preserved so dropout draws the same) by
patching the block instance's ``forward``: parameter names are unchanged, so checkpoints, EMA twins
and exports are the same with and without it.

Calls outside the objective's forward that need the root's parameters gathered (the monitor's k-NN
embeddings) go through ``call_unsharded``; the export gathers a full state dict (``full_state``).
"""
from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

BLOCK_LISTS = ("blocks", "resblocks")  # mmssl's backbone, timm ViTs; open_clip's transformers


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """Every member of every ``blocks`` / ``resblocks`` ModuleList under ``module``, innermost lists
    first (each module once)."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            for b in m:
                if id(b) not in seen:
                    seen.add(id(b))
                    found.append(b)
    return found


def checkpoint_activations(module: nn.Module) -> int:
    """Recompute the activations of every transformer block with trainable parameters in the backward
    (module docstring). -> the number of blocks."""
    n = 0
    for block in transformer_blocks(module):
        if not any(p.requires_grad for p in block.parameters()) or getattr(block, "_mmssl_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]
        block._mmssl_checkpointed = True  # type: ignore[attr-defined]
        n += 1
    return n


def replicated_params(module: nn.Module) -> set[nn.Parameter]:
    """The parameters FSDP2 cannot shard (0-d) and keeps whole on every rank."""
    return {p for p in module.parameters() if p.dim() == 0}


def broadcast_from_rank0(module: nn.Module) -> None:
    """Every parameter and buffer as rank 0 holds it (what DDP does when it wraps): sharding then cuts
    the same tensors on every rank."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute and gradient reduction on CUDA, float32 elsewhere (master weights float32 always)."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    return MixedPrecisionPolicy()


def _run(self: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def shard(objective: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``objective`` in place (module docstring); -> the same module, now an ``FSDPModule``."""
    broadcast_from_rank0(objective)
    mp = mixed_precision(device)
    for block in transformer_blocks(objective):
        fully_shard(block, mp_policy=mp)
    objective.run_unsharded = types.MethodType(_run, objective)  # type: ignore[assignment]
    fully_shard(objective, mp_policy=mp, ignored_params=replicated_params(objective))
    register_fsdp_forward_method(objective, "run_unsharded")
    return objective


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def call_unsharded(objective: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the root's parameters gathered, as inside the objective's forward
    (blocks gather their own when called). The plain call where ``objective`` is not sharded."""
    if is_sharded(objective):
        return objective.run_unsharded(fn, *args, **kwargs)  # type: ignore[operator]
    return fn(*args, **kwargs)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def average_replicated_grads(module: nn.Module) -> None:
    """All-reduce (mean) the gradients of the parameters FSDP2 leaves replicated, in parameter order
    (the same on every rank)."""
    world = dist.get_world_size()
    for p in module.parameters():
        if p.dim() == 0 and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def clip_grad_norm(module: nn.Module, max_norm: float, as_shards: int = 0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over sharded and replicated gradients: the global L2 norm
    (shards' squares summed across ranks, replicated gradients counted once), every gradient scaled
    by min(1, max_norm / (norm + 1e-6)). -> the norm before clipping, a plain scalar tensor.

    ``as_shards=W`` (DDP: whole gradients, the same on every rank): the same sum, in the same order, as
    W FSDP ranks would make it: each non-scalar gradient cut in W dim-0 chunks as ``fully_shard`` cuts
    it, chunk r's squares summed into rank r's partial sum, the partial sums added in rank order (an
    all-reduce of two values is that sum exactly), no communication."""
    sharded, whole = [], []
    for p in module.parameters():
        if p.grad is not None:
            (sharded if isinstance(p.grad, DTensor) or (as_shards and p.grad.dim() > 0) else whole).append(p.grad)
    dev = next((local(g).device for g in sharded + whole), torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    if as_shards:
        parts = [torch.zeros((), dtype=torch.float32, device=dev) for _ in range(as_shards)]
        for g in sharded:
            for r, chunk in enumerate(torch.chunk(g, as_shards, dim=0)):
                parts[r] += chunk.float().square().sum()
        for part in parts:
            sq += part
    else:
        for g in sharded:
            sq += local(g).float().square().sum()
        if sharded and dist.is_initialized():
            dist.all_reduce(sq)
    for g in whole:
        sq += g.float().square().sum()
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in sharded + whole:
        local(g).mul_(coef.to(local(g).dtype))
    return norm


def full_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The objective's whole state dict gathered (a collective: every rank calls it), on the CPU; full
    tensors on rank 0, an empty dict elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class StateView(nn.Module):
    """A stand-in for a sharded module when it is written out: its full state dict and its ``config``
    (what ``mmssl.export.save_encoder`` / ``save_heads`` read)."""

    def __init__(self, state: dict[str, torch.Tensor], config: Any = None) -> None:
        super().__init__()
        self._full = state
        if config is not None:
            self.config = config

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._full)


def view_of(part: nn.Module, objective: nn.Module, full: dict[str, torch.Tensor]) -> StateView:
    """``part`` (a tower or head, inside ``objective`` or built around its modules) as a StateView of
    ``full`` (``full_state(objective)``): each of its tensors found by identity in the objective."""
    fqn = {id(t): k for k, t in objective.state_dict(keep_vars=True).items()}
    mine = {}
    for k, t in part.state_dict(keep_vars=True).items():
        if id(t) not in fqn:
            raise KeyError(f"{k!r} of {type(part).__name__} is not a tensor of the objective")
        mine[k] = full[fqn[id(t)]]
    return StateView(mine, getattr(part, "config", None))
