"""The per-modality data codec contract: file/bytes <-> tensors, and batching.

A codec lives beside its adapter (``Adapter.codec``), so the data pipeline, the packer and the
evaluators stay modality-agnostic."""
from __future__ import annotations

from typing import Any, Protocol

import torch

from mmssl.types import Batch


class Codec(Protocol):
    modality: str
    #: file suffixes ``mmssl data pack`` reads for this modality
    suffixes: tuple[str, ...]

    def read_file(self, path: str) -> dict[str, Any]:
        """A raw file -> an item of modality fields (numpy arrays); raises BadSample."""

    def encode(self, item: dict[str, Any]) -> dict[str, Any]:
        """An item -> webdataset fields (``ext -> bytes``)."""

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """webdataset fields -> an item of tensors; raises BadSample."""

    def length(self, item: dict[str, Any]) -> int:
        """Size used for length bucketing."""

    def collate(self, items: list[dict[str, Any]], max_len: int | None, generator: torch.Generator | None,
                keep_frame_labels: bool = True) -> Batch:
        """Items -> a padded Batch; random crops to ``max_len`` when given."""
