"""Speech: 16 kHz waveforms, a wav2vec 2.0 / HuBERT convolutional front-end, 20 ms frames."""
from mmssl.modalities.speech.adapter import SpeechAdapter

__all__ = ["SpeechAdapter"]
