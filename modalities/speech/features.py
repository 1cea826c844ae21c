"""Hand-made speech features, frame-aligned with the conv front-end (n_fft = window = 400, hop 320,
center=False gives floor((L-400)/320)+1 frames, exactly the front-end's count)."""
from __future__ import annotations

import torch
import torchaudio

SAMPLE_RATE = 16000
WIN = 400
HOP = 320


def num_frames(num_samples: torch.Tensor | int) -> torch.Tensor | int:
    """Frames of the 20 ms front-end for a waveform of ``num_samples`` samples (0 when shorter than a window)."""
    if isinstance(num_samples, torch.Tensor):
        return torch.where(num_samples >= WIN, torch.div(num_samples - WIN, HOP, rounding_mode="floor") + 1, 0)
    return (num_samples - WIN) // HOP + 1 if num_samples >= WIN else 0


class MFCC(torch.nn.Module):
    """wav [B, T] -> MFCC [B, N, n_mfcc * (1 + 2 * deltas)] (deltas and delta-deltas optional)."""

    def __init__(self, n_mfcc: int = 13, deltas: bool = True, n_mels: int = 40) -> None:
        super().__init__()
        self.deltas = deltas
        self.mfcc = torchaudio.transforms.MFCC(
            sample_rate=SAMPLE_RATE, n_mfcc=n_mfcc,
            melkwargs=dict(n_fft=WIN, win_length=WIN, hop_length=HOP, n_mels=n_mels, center=False))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        m = self.mfcc(wav.float())  # [B, n_mfcc, N]
        if self.deltas:
            d1 = torchaudio.functional.compute_deltas(m)
            d2 = torchaudio.functional.compute_deltas(d1)
            m = torch.cat([m, d1, d2], 1)
        return m.transpose(1, 2)


class LogMel(torch.nn.Module):
    """wav [B, T] -> log-mel [B, N, n_mels], frame-aligned with the front-end."""

    def __init__(self, n_mels: int = 80) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=WIN, win_length=WIN, hop_length=HOP, n_mels=n_mels, center=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(wav.float()) + 1e-6).transpose(1, 2)


def per_utterance(fn: torch.nn.Module, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a frame feature to each utterance at its own length, so padding never enters its deltas
    or statistics. wav: [B, T], lengths: [B] -> (features [B, N, F], pad [B, N]) with N = frames of T."""
    n = num_frames(lengths)
    N = int(num_frames(wav.shape[1]))
    outs = []
    for i in range(wav.shape[0]):
        L = int(lengths[i])
        f = fn(wav[i:i + 1, :max(L, WIN)])[0]
        outs.append(torch.nn.functional.pad(f, (0, 0, 0, N - f.shape[0])))
    feats = torch.stack(outs)
    pad = torch.arange(N, device=wav.device)[None] >= n[:, None]
    return feats.masked_fill(pad[..., None], 0.0), pad
