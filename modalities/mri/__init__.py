"""MRI: cases of co-registered 3D contrasts (T1, T1ce, T2, FLAIR by default) with a presence mask, 3D
patch tokens per contrast (BM-MAE style); any subset of contrasts goes through one model."""
import mmssl.modalities.mri.data  # noqa: F401  (registers the mri-synth preset)
from mmssl.modalities.mri.adapter import MRIAdapter
from mmssl.modalities.mri.data import MRICodec, read_case, write_nifti

__all__ = ["MRIAdapter", "MRICodec", "read_case", "write_nifti"]
