"""Text: open_clip BPE token ids, learned token and position embeddings, masked language modelling."""
from mmssl.modalities.text import data  # noqa: F401  (registers the text-synth preset)
from mmssl.modalities.text.adapter import TextAdapter

__all__ = ["TextAdapter"]
