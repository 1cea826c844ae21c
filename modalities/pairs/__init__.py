"""Paired modalities: embedded image-text and audio-text data sets for contrastive training
(CLIP / CLAP / CLOOB). No adapter of its own: each side uses its modality's adapter and codec."""
import mmssl.modalities.pairs.data  # noqa: F401  (registers the scene-captions and sound-captions presets)
