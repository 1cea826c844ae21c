"""Point clouds [B, P, 3]: Point-MAE-style group tokens (farthest point sampling, kNN groups, a
mini-PointNet per group), Chamfer reconstruction; readers for .npy, .ply and .off files."""
import mmssl.modalities.point.data  # noqa: F401  (registers the point-synth preset)
from mmssl.modalities.point.adapter import PointAdapter
from mmssl.modalities.point.chamfer import chamfer_l2, masked_chamfer_l2

__all__ = ["PointAdapter", "chamfer_l2", "masked_chamfer_l2"]
