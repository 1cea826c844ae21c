"""The ModalityAdapter contract (DESIGN.md): raw batch -> tokens, targets, masks, views, baselines.

Adapters know nothing about objectives. Every method takes the dict batch of the data pipeline."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mmssl.types import Batch, Tokens

if TYPE_CHECKING:
    from mmssl.data.codec import Codec

#: a probe variant's batch transform: batch -> (the altered batch, which items it keeps [B] bool)
ProbeTransform = Callable[[Batch], tuple[Batch, torch.Tensor]]


class ModalityAdapter(nn.Module, ABC):
    """Base class. Subclasses set ``name`` and ``dim`` and implement the abstract methods.

    ``content_position`` (optional) is a module ``(x [B,N,D], pad [B,N]) -> [B,N,D]`` for position
    encodings computed from content (HuBERT's convolutional relative position). The Encoder applies it
    *after* masking, so hidden content never leaks back through it."""

    name: str = ""
    #: what kind of signal the modality is, for objectives that pair kinds rather than names (CLAP pairs
    #: an ``audio`` tower with a ``text`` one): audio | text | image | point | signal | volume
    kind: str = ""
    #: the modality's data codec (file/bytes <-> tensors, batching; ``mmssl.data.codec.Codec``), set by
    #: each adapter module beside its class: the data pipeline, the packer and the evaluators reach a
    #: modality's data only through it
    codec: ClassVar[Codec | None] = None
    unit_features_id: str = ""

    def __init__(self, dim: int, cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.cfg = dict(cfg or {})
        # An instance attribute, not a class default: nn.Module registers a submodule assigned later
        # in _modules, where a class attribute of the same name would shadow it.
        self.content_position: nn.Module | None = None

    @abstractmethod
    def tokenize(self, batch: Batch) -> Tokens:
        """-> Tokens(x [B,N,D], pos [B,N,D], pad [B,N], index [B,N,k])."""

    @abstractmethod
    def targets(self, batch: Batch, tokens: Tokens | None = None) -> torch.Tensor:
        """-> [B, N, P] per-token reconstruction targets, aligned with ``tokenize``. ``tokens``, when
        given, are ``tokenize(batch)``'s: an adapter may reuse what tokenising computed (point: the
        group centres, so farthest-point sampling runs once per step)."""

    @property
    def target_dim(self) -> int:
        """Width P of the per-token predictions ``recon_loss`` expects: the target width for regression
        targets, the vocabulary size for discrete ids."""
        raise TypeError(f"modality {self.name!r} defines no reconstruction target width")

    @property
    def coord_dim(self) -> int:
        """Width C of ``Tokens.coords``, for adapters whose ``tokenize`` fills it (point: 3, the group
        centres): what an objective may ask the encoder to locate (MAE's ``locate_weight``)."""
        raise TypeError(f"modality {self.name!r} defines no token coordinates")

    @abstractmethod
    def recon_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pred, target: [B, N, P]; mask: [B, N] bool (True = count) -> scalar."""

    @abstractmethod
    def make_mask(self, tokens: Tokens, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """-> [B, N] bool, True = hidden; about ``ratio`` of the non-padding tokens; never padding."""

    def corrupt(self, batch: Batch, token_mask: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[Batch, torch.Tensor]:
        """Input corruption for replacement-style masked modelling (BERT's 80/10/10), given the hidden
        tokens token_mask [B, N]: -> (batch with some hidden inputs altered, replace [B, N] bool: the
        hidden tokens the Encoder swaps for its mask embedding). The default alters nothing and
        replaces every hidden token."""
        return batch, token_mask

    @abstractmethod
    def views(self, batch: Batch, n_global: int, n_local: int) -> list[Batch]:
        """-> n_global + n_local stochastic views of the batch (global ones first)."""

    def cross_views(self, batch: Batch) -> tuple[Batch, Batch]:
        """-> two decoupled views of every item for cross-view reconstruction (Point-PQAE): different,
        overlapping crops, each of which ``tokenize`` places in its own frame, so neither view's
        tokens say where the other lies; ``relative_position`` does."""
        raise TypeError(f"modality {self.name!r} defines no decoupled cross views")

    def relative_position(self, source: Batch, target: Batch, target_tokens: Tokens) -> torch.Tensor:
        """-> [B, N_t, R] where each token of view ``target`` (``target_tokens = tokenize(target)``)
        lies as seen from view ``source``'s frame: the queries of a cross-view decoder."""
        raise TypeError(f"modality {self.name!r} defines no relative positions between views")

    @property
    def relative_dim(self) -> int:
        """Width R of ``relative_position``."""
        raise TypeError(f"modality {self.name!r} defines no relative positions between views")

    @abstractmethod
    def baseline_features(self, batch: Batch) -> torch.Tensor:
        """-> [B, F] a classical hand-made feature, for context beside learned features."""

    def unit_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (features [B, N, F], pad [B, N]): hand-made per-token features aligned with the tokens of
        ``tokenize``; first-iteration targets for discrete-unit objectives (HuBERT's MFCC k-means)."""
        raise TypeError(f"modality {self.name!r} defines no per-token unit features")

    def num_tokens(self, batch: Batch) -> torch.Tensor:
        """-> [B] int64 number of non-padding tokens per sample, without running the network."""
        t = self.tokenize(batch)
        return (~t.pad).sum(1)

    def probe_variants(self) -> dict[str, ProbeTransform]:
        """Named views of the data the linear probe also reports (e.g. each MRI contrast alone): each
        transform alters a batch and says which items it keeps. Default: none."""
        return {}

    def token_rate(self) -> float | None:
        """Tokens per second of input for time series (speech: 50 frames/s), else None: recorded with
        discrete-unit targets so a unit table is never reused at another frame rate."""
        return None

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing this adapter expects, written into an export's config.json."""
        return {}


def local_view_side(side: int, patch: int, local_size: int | None) -> int:
    """Side of a local (multi-crop) view of a patched grid: ``local_size`` when set (a multiple of
    ``patch``), else half of ``side`` rounded down to whole patches, at least one patch."""
    if local_size is not None:
        s = int(local_size)
        if s % patch:
            raise ValueError(f"views.local_size {s} is not divisible by the patch size {patch}")
        return s
    return max(patch, (side // 2) // patch * patch)
