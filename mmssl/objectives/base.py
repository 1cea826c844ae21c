"""The Objective contract: forward(batch) -> ObjectiveOutput(loss, metrics), after_step(step)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmssl.encoder import Encoder
from mmssl.modalities.base import ModalityAdapter
from mmssl.registry import MODALITIES
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
    #: the run's length in optimizer steps and one pass over the train split in steps (all ranks,
    #: accumulation included): what step-based schedules (EMA momentum, temperatures) are measured in
    total_steps: int = 0
    steps_per_epoch: int = 0


class Objective(nn.Module):
    """Owns its encoders (``towers``), heads, teachers and targets."""

    name: str = ""
    #: modalities an objective accepts; checked by ``supports`` before anything is built.
    num_modalities: int = 1

    def __init__(self) -> None:
        super().__init__()
        self.towers = nn.ModuleDict()

    #: (adapter member, what it provides): a member every modality must define for this objective,
    #: e.g. ("unit_features", "frame-level unit features"); None: no requirement.
    needs: tuple[str, str] | None = None

    #: whether training batches group items of similar length (less padding); objectives that compare
    #: items within a batch (contrastive) need i.i.d. batches: a length that tracks a caption word
    #: ("short", "long") would otherwise never be a negative
    bucket_by_length: bool = True

    #: why ``forward`` cannot score held-out data (e.g. targets fitted on the train split only), so the
    #: training monitor logs this instead of a validation loss; None: it can.
    no_val_loss: str | None = None

    @classmethod
    def supports(cls, modalities: list[str]) -> str | None:
        """None if the objective works with these modalities, else a one-line reason."""
        if len(modalities) != cls.num_modalities:
            n = "one modality" if cls.num_modalities == 1 else f"{cls.num_modalities} modalities"
            return f"objective {cls.name!r} takes {n}, got {len(modalities)}"
        if cls.needs:
            member, what = cls.needs
            for m in modalities:
                if getattr(MODALITIES.get(m), member) is getattr(ModalityAdapter, member):
                    return f"objective {cls.name!r} needs {what}, which modality {m!r} lacks"
        return None

    @classmethod
    def build(cls, cfg: dict[str, Any], encoders: dict[str, Encoder]) -> Objective:
        """The objective over ``encoders`` (name -> Encoder); single-tower objectives take
        ``(name, encoder)`` and their config."""
        if cls.num_modalities != 1:
            raise TypeError(f"{cls.__name__} takes {cls.num_modalities} towers: it must define build()")
        return cls(next(iter(encoders.items())), cfg)  # type: ignore[call-arg]

    def prepare(self, ctx: PrepareContext) -> dict[str, Any]:
        """Called once before the first step (and on resume). Returns metrics to log."""
        return {}

    def heads(self) -> dict[str, nn.Module]:
        """Modules exported under ``heads/`` beside the encoders."""
        return {}

    def after_init(self) -> None:
        """Called once after ``init=`` loaded pretrained weights into the towers (not on resume): EMA
        teachers copy the new student here."""

    def before_step(self, step: int) -> None:
        """Called after the gradients are final (clipped) and before the optimizer step: e.g. DINO
        cancels the last layer's gradients during its first epoch."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (EMA teachers, schedules)."""

    def exported(self) -> dict[str, nn.Module]:
        """The encoders written to ``encoders/`` at the end of training (default: the towers, i.e. the
        students; DINO exports its teacher, as the paper evaluates it)."""
        return self.encoders

    def forward(self, batch: Batch) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} does not define forward")

    @property
    def encoders(self) -> dict[str, Encoder]:
        return dict(self.towers.items())
