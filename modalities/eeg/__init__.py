"""EEG: recordings of any montage, channel count, rate and length -> channel-patch tokens with 4D
(electrode x, y, z, time) positions (REVE); electrode coordinates of the 10-05 system ship as package
data (electrodes_1005.tsv)."""
import mmssl.modalities.eeg.data  # noqa: F401  (registers the EEG data presets)
from mmssl.modalities.eeg.adapter import EEGAdapter

__all__ = ["EEGAdapter"]
