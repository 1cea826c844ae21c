"""Modality adapters (installed as ``mmssl.modalities``)."""
from mmssl.modalities.base import ModalityAdapter

__all__ = ["ModalityAdapter"]
