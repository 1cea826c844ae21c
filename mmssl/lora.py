"""LoRA (Hu et al. 2021): a frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / r) B A``.

Generic over any module tree: ``apply_lora`` wraps every ``nn.Linear`` whose attribute name is one of
``targets`` (the backbone's attention projections ``qkv`` and ``proj`` by default), ``merge_lora``
folds the updates back into plain ``nn.Linear`` weights (for export: the merged model has the
original architecture and state-dict keys), ``count_trainable`` counts what an optimizer would see.
B starts at zero, so a freshly wrapped model computes exactly what the base model computes."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * dropout(x) A^T B^T. x: [..., in] -> [..., out].

    A: [rank, in] (Kaiming-uniform, as peft/loralib), B: [out, rank] (zeros). The base layer's
    parameters are frozen; their previous ``requires_grad`` is restored by ``merged()``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._base_requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update [out, in] that ``merged()`` adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.dropout(x) @ self.lora_A.to(x.dtype).t()
        return self.base(x) + (low @ self.lora_B.to(x.dtype).t()) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight W + (alpha / r) B A (summed in float32)."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None,
                        device=b.weight.device, dtype=b.weight.dtype)
        out.weight.copy_((b.weight.float() + self.delta_weight().float()).to(b.weight.dtype))
        if b.bias is not None:
            out.bias.copy_(b.bias)
        for n, p in out.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, True))
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, child)


def apply_lora(module: nn.Module, targets: Sequence[str] = ("qkv", "proj"), rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Wrap, in place, every ``nn.Linear`` under ``module`` whose attribute name is in ``targets``
    (``backbone.blocks.3.attn.qkv`` matches ``qkv``) -> the qualified names wrapped, in order.

    Only the wrapped layers' base weights are frozen here; freezing the rest of the model is the
    caller's choice (``mark_only_lora_trainable``). Raises if nothing matched or if a layer is
    wrapped already (stacked adapters would silently change the scaling)."""
    targets = tuple(targets)
    if any(isinstance(m, LoRALinear) for m in module.modules()):
        raise ValueError("module already has LoRA layers: merge_lora it first")
    names = [n for n, m in module.named_modules()
             if n and isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if not names:
        raise ValueError(f"no nn.Linear named one of {list(targets)} under {type(module).__name__}")
    for n in names:
        base = module.get_submodule(n)
        assert isinstance(base, nn.Linear)
        _set_child(module, n, LoRALinear(base, rank, alpha, dropout))
    return names


def merge_lora(module: nn.Module) -> list[str]:
    """Fold every LoRA update into its base weight and put plain ``nn.Linear`` layers back (same
    state-dict keys as before ``apply_lora``) -> the qualified names merged."""
    names = [n for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _set_child(module, n, module.get_submodule(n).merged())  # type: ignore[operator]
    return names


def lora_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA factor (A and B) under ``module``."""
    for n, p in module.named_parameters():
        if n.rpartition(".")[2] in ("lora_A", "lora_B"):
            yield n, p


def mark_only_lora_trainable(module: nn.Module) -> None:
    """requires_grad only on the LoRA factors under ``module`` (loralib's ``mark_only_lora_as_trainable``)."""
    lora = {id(p) for _, p in lora_parameters(module)}
    for p in module.parameters():
        p.requires_grad_(id(p) in lora)


def count_trainable(module: nn.Module) -> int:
    """Number of scalar parameters with requires_grad (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
