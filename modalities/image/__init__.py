"""Image: [B, 3, H, W] in [0, 1], non-overlapping patch tokens (ViT / MAE), timm ViT weights convert."""
import mmssl.modalities.image.data  # noqa: F401  (registers the image data presets)
from mmssl.modalities.image.adapter import ImageAdapter

__all__ = ["ImageAdapter"]
