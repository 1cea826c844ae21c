"""The Objective contract: forward(batch) -> ObjectiveOutput(loss, metrics), after_step(step)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from mmssl.encoder import Encoder
from mmssl.types import Batch, ObjectiveOutput


@dataclass
class PrepareContext:
    """What an objective may use before training starts (e.g. to fit discrete-unit targets).

    iter_split(split) yields whole, uncropped batches of a split in a fixed order, each with
    ``sample_id`` [B]; ``barrier`` synchronises ranks; only ``is_main`` writes shared files."""

    iter_split: Callable[[str], Iterable[Batch]]
    device: torch.device
    run_dir: Path
    cache_dir: Path
    data_fingerprint: str
    is_main: bool = True
    barrier: Callable[[], None] = lambda: None
    log: Callable[[dict[str, Any]], None] = lambda m: None
    info: dict[str, Any] = field(default_factory=dict)


class Objective(nn.Module):
    """Owns its encoders (``towers``), heads, teachers and targets."""

    name: str = ""
    #: modalities an objective accepts; checked by ``supports`` before anything is built.
    num_modalities: int = 1

    def __init__(self) -> None:
        super().__init__()
        self.towers = nn.ModuleDict()

    @classmethod
    def supports(cls, modalities: list[str]) -> str | None:
        """None if the objective works with these modalities, else a one-line reason."""
        if len(modalities) != cls.num_modalities:
            return f"objective {cls.name!r} takes {cls.num_modalities} modality(ies), got {len(modalities)}"
        return None

    def prepare(self, ctx: PrepareContext) -> dict[str, Any]:
        """Called once before the first step (and on resume). Returns metrics to log."""
        return {}

    def heads(self) -> dict[str, nn.Module]:
        """Modules exported under ``heads/`` beside the encoders."""
        return {}

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (EMA teachers, schedules)."""

    def forward(self, batch: Batch) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} does not define forward")

    @property
    def encoders(self) -> dict[str, Encoder]:
        return dict(self.towers.items())
