"""The modality-agnostic trainer."""
