"""Speech adapter: waveform [B, T] at 16 kHz -> 20 ms frame tokens through a wav2vec 2.0 / HuBERT
convolutional feature encoder; the convolutional relative position is declared here and applied by the
Encoder after masking."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.modalities.base import ModalityAdapter
from mmssl.modalities.common import cpu_uniform, masked_mse, sincos
from mmssl.modalities.speech.features import HOP, MFCC, LogMel, num_frames, per_utterance
from mmssl.registry import MODALITIES
from mmssl.types import Batch, Tokens

# (channels, kernel, stride) of wav2vec 2.0 / HuBERT: 400-sample receptive field, 320-sample hop.
CONV_SHAPE = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2


class TimeNorm(nn.Module):
    """Per-channel normalisation over the real (non-padding) time steps of each utterance: HuBERT
    Base's first-layer GroupNorm(C, C), except that padding never enters the statistics, so a padded
    utterance gets exactly the features it gets alone. x: [B, C, T], valid: [B, 1, T] bool."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if valid is None:
            mean = x.mean(-1, keepdim=True)
            var = x.var(-1, keepdim=True, unbiased=False)
        else:
            w = valid.to(x.dtype)
            cnt = w.sum(-1, keepdim=True).clamp_min(1.0)
            mean = (x * w).sum(-1, keepdim=True) / cnt
            var = ((x - mean) * w).pow(2).sum(-1, keepdim=True) / cnt
        # the scale folded per channel first: one full-size multiply fewer, forward and backward
        return (x - mean) * (torch.rsqrt(var + self.eps) * self.weight[:, None]) + self.bias[:, None]


class ConvLayer(nn.Module):
    """Conv1d (no bias, as HuBERT) + optional norm + GELU. x: [B, C, T] -> [B, C', T']."""

    def __init__(self, c_in: int, c_out: int, k: int, s: int, norm: str | None, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, k, stride=s, bias=bias)
        self.kernel, self.stride = k, s
        self.norm_kind = norm
        if norm == "group_norm":  # one group per channel over time (HuBERT Base, first layer only)
            self.norm: nn.Module | None = TimeNorm(c_out)
        elif norm == "layer_norm":  # per frame over channels
            self.norm = nn.LayerNorm(c_out)
        else:
            self.norm = None

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths - self.kernel, self.stride, rounding_mode="floor") + 1

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_kind == "layer_norm":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)  # type: ignore[misc]
        elif self.norm_kind == "group_norm":
            valid = None if lengths is None else \
                (torch.arange(x.shape[-1], device=x.device)[None] < self.out_lengths(lengths)[:, None])[:, None]
            x = self.norm(x, valid)  # type: ignore[misc]
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    """wav [B, T] (+ lengths [B]) -> frames [B, N, C], N = floor((T - 400) / 320) + 1."""

    def __init__(self, channels: int | list[int], norm: str, bias: bool = False) -> None:
        super().__init__()
        widths = [int(channels)] * len(CONV_SHAPE) if isinstance(channels, int) else [int(c) for c in channels]
        if len(widths) != len(CONV_SHAPE):
            raise ValueError(f"frontend_channels needs one width or {len(CONV_SHAPE)}, got {len(widths)}")
        if norm not in ("group_norm", "layer_norm", "none"):
            raise ValueError(f"frontend_norm must be group_norm, layer_norm or none, not {norm!r}")
        layers = []
        c_in = 1
        for i, ((k, s), c_out) in enumerate(zip(CONV_SHAPE, widths)):
            layer_norm = norm if norm == "layer_norm" else ("group_norm" if i == 0 and norm == "group_norm" else None)
            layers.append(ConvLayer(c_in, c_out, k, s, layer_norm, bias))
            c_in = c_out
        self.conv_layers = nn.ModuleList(layers)
        self.out_channels = c_in

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = wav[:, None]
        for layer in self.conv_layers:
            x = layer(x, lengths)
            if lengths is not None:
                lengths = layer.out_lengths(lengths)
        return x.transpose(1, 2)


class ConvPosition(nn.Module):
    """HuBERT's convolutional relative position: grouped conv over time with weight norm, GELU.
    (x [B, N, D], pad [B, N]) -> [B, N, D]; padding is zeroed first so it never shapes real frames."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        std = math.sqrt(4.0 / (kernel * dim))
        nn.init.normal_(conv.weight, mean=0.0, std=std)
        nn.init.constant_(conv.bias, 0.0)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = x.masked_fill(pad[..., None], 0.0).transpose(1, 2)
        y = self.conv(x)
        if self.trim:
            y = y[..., :-self.trim]
        return F.gelu(y).transpose(1, 2)


class ConvStackPosition(nn.Module):
    """data2vec (audio)'s convolutional relative position: ``depth`` grouped convs over time, each
    followed by a LayerNorm without affine weights and GELU, no weight norm (fairseq's
    ``pos_conv_depth`` > 1; Hugging Face's ``Data2VecAudioPositionalConvEmbedding``).
    (x [B, N, D], pad [B, N]) -> [B, N, D]. Padding is zeroed before every conv, not only the first,
    so it never shapes real frames (the references zero it once: equal on unpadded input)."""

    def __init__(self, dim: int, kernel: int, groups: int, depth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
                                   for _ in range(depth))
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        keep = (~pad)[:, None].to(x.dtype)  # [B, 1, N]
        y = x.transpose(1, 2)
        for conv in self.convs:
            y = conv(y * keep)
            if self.trim:
                y = y[..., :-self.trim]
            y = F.gelu(F.layer_norm(y.transpose(1, 2), (y.shape[1],)).transpose(1, 2))
        return y.transpose(1, 2)


def sinusoid(index: torch.Tensor, dim: int) -> torch.Tensor:
    """index: [B, N] positions -> [B, N, dim] fixed sin-cos embedding (Transformer's)."""
    half = dim // 2
    # the Transformer's float32 exp-log frequencies, not sincos_grid's float64 powers: they round
    # differently, and speech models were trained with these
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=index.device, dtype=torch.float32) / half)
    return sincos(index.float()[..., None] * freq)


def normalize_waveform(wav: torch.Tensor, lengths: torch.Tensor | None, eps: float) -> torch.Tensor:
    """wav [B, T], lengths [B] real samples (None: whole rows) -> [B, T]: each utterance shifted to zero
    mean and scaled to unit variance over its real samples, ``(x - mean) / sqrt(var + eps)`` with the
    population variance, padding zero again. This is fairseq's ``task.normalize``
    (``F.layer_norm(wav, wav.shape)`` per utterance before collating, eps 1e-5) and transformers'
    ``Wav2Vec2FeatureExtractor(do_normalize=True)`` (eps 1e-7)."""
    x = wav.float()
    if lengths is None:
        real = torch.ones_like(x, dtype=torch.bool)
    else:
        real = torch.arange(x.shape[1], device=x.device)[None] < lengths.to(x.device)[:, None]
    w = real.float()
    cnt = w.sum(1, keepdim=True).clamp_min(1)
    mean = (x * w).sum(1, keepdim=True) / cnt
    var = ((x - mean) ** 2 * w).sum(1, keepdim=True) / cnt
    return (((x - mean) / (var + eps).sqrt()) * w).to(wav.dtype)


def _utterance_moments(feats: torch.Tensor, pad: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """feats [B, N, F] frame features, pad [B, N] -> (w [B, N, 1] 1.0 at real frames, mean [B, 1, F],
    var [B, 1, F] population variance), each utterance over its real frames only, so padding never
    shifts its statistics."""
    w = (~pad)[..., None].float()
    cnt = w.sum(1, keepdim=True).clamp_min(1)
    mean = (feats * w).sum(1, keepdim=True) / cnt
    var = ((feats - mean) ** 2 * w).sum(1, keepdim=True) / cnt
    return w, mean, var


@MODALITIES.register("speech")
class SpeechAdapter(ModalityAdapter):
    """Batch keys: ``speech`` [B, T] float waveform at 16 kHz, ``speech_len`` [B] samples, optional
    ``speech_offset`` [B] samples where a crop starts in its recording (a multiple of 320), so token
    ``index`` is the frame's position in the whole recording and frame targets stay aligned."""

    name = "speech"
    kind = "audio"
    #: identifies what unit_features computes, so cached unit targets are rebuilt when it changes
    unit_features_id = "mfcc13+delta+delta2,cmvn-per-utterance,n_fft400,hop320"

    def __init__(self, dim: int, cfg: dict[str, Any] | None = None) -> None:
        super().__init__(dim, cfg)
        c = self.cfg
        chan = c.get("frontend_channels", 512)
        self.feature_extractor = FeatureExtractor(chan if isinstance(chan, int) else list(chan),
                                                  c.get("frontend_norm", "layer_norm"),
                                                  bias=bool(c.get("frontend_bias", False)))
        channels = self.feature_extractor.out_channels
        self.feature_norm = nn.LayerNorm(channels)
        self.feature_proj = nn.Linear(channels, dim)
        self.feature_dropout = nn.Dropout(float(c.get("feature_dropout", 0.0)))
        self.position = c.get("position", "conv")
        if self.position == "conv":
            kernel, groups = int(c.get("pos_conv_kernel", 128)), int(c.get("pos_conv_groups", 16))
            depth = int(c.get("pos_conv_depth", 1))  # 1: HuBERT / wav2vec 2.0; 5: data2vec (audio)
            self.content_position = ConvPosition(dim, kernel, groups) if depth == 1 else \
                ConvStackPosition(dim, kernel, groups, depth)
        elif self.position != "sinusoidal":
            raise ValueError(f"speech position must be 'conv' or 'sinusoidal', not {self.position!r}")
        self.mask_span = int(c.get("mask_span", 10))
        # models trained on per-utterance normalised waveforms (fairseq task.normalize: wav2vec 2.0
        # Large, data2vec audio) get the same normalisation here, so callers feed raw audio
        self.waveform_normalize = bool(c.get("waveform_normalize", False))
        self.waveform_norm_eps = float(c.get("waveform_norm_eps", 1e-5))
        self.mfcc = MFCC(n_mfcc=13, deltas=True)
        self.mfcc_plain = MFCC(n_mfcc=13, deltas=False)
        self.logmel = LogMel(int(c.get("n_mels", 80)))

    # -- tokens ---------------------------------------------------------------------------------------
    def _lengths(self, batch: Batch) -> torch.Tensor:
        wav = batch["speech"]
        if "speech_len" in batch:
            return batch["speech_len"].to(wav.device)
        return torch.full((wav.shape[0],), wav.shape[1], dtype=torch.long, device=wav.device)

    def tokenize(self, batch: Batch) -> Tokens:
        wav = batch["speech"]
        lengths = batch.get("speech_len")
        if self.waveform_normalize:
            wav = normalize_waveform(wav, lengths, self.waveform_norm_eps)
        frames = self.feature_extractor(wav.to(self.feature_proj.weight.dtype),
                                        None if lengths is None else lengths.to(wav.device))  # [B, N, C]
        B, N, _ = frames.shape
        x = self.feature_dropout(self.feature_proj(self.feature_norm(frames)))
        n = num_frames(self._lengths(batch))
        ar = torch.arange(N, device=wav.device)
        pad = ar[None] >= n[:, None]
        start = torch.div(batch["speech_offset"].to(wav.device), HOP, rounding_mode="floor") \
            if "speech_offset" in batch else torch.zeros(B, dtype=torch.long, device=wav.device)
        index = (ar[None] + start[:, None])[..., None]  # [B, N, 1]
        if self.position == "sinusoidal":
            pos = sinusoid(ar[None].expand(B, -1), self.dim).to(x.dtype)
        else:
            pos = torch.zeros_like(x)
        return Tokens(x=x, pos=pos, pad=pad, index=index)

    def num_tokens(self, batch: Batch) -> torch.Tensor:
        return num_frames(self._lengths(batch))

    # -- masked modelling -----------------------------------------------------------------------------
    def targets(self, batch: Batch, tokens: Tokens | None = None) -> torch.Tensor:
        """Per-utterance normalised log-mel frames [B, N, n_mels]."""
        feats, pad = per_utterance(self.logmel, batch["speech"], self._lengths(batch))
        w, mean, var = _utterance_moments(feats, pad)
        return ((feats - mean) / (var + 1e-6).sqrt()) * w

    @property
    def target_dim(self) -> int:
        return self.logmel.mel.n_mels

    def recon_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-frame MSE over the log-mel bins, averaged over the frames where mask is True."""
        return masked_mse(pred, target, mask)

    def make_mask(self, tokens: Tokens, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """HuBERT/wav2vec 2.0 span masking: each sample draws ``floor(p * L + u)`` distinct span starts
        (at least 2) among its first L - span frames and hides ``span`` frames from each; p is chosen so
        that independent spans would cover ``ratio`` of the frames: p = 1 - (1 - ratio)^(1/span).
        With ratio 0.5656 this is HuBERT's mask_prob 0.8 / length 10 (8% of frames start a span)."""
        pad = tokens.pad
        B, N = pad.shape
        dev = pad.device
        span = self.mask_span
        L = (~pad).sum(1)
        p = 1.0 - (1.0 - ratio) ** (1.0 / span)
        u = cpu_uniform(B, generator=generator).to(dev)
        n_starts = torch.clamp((p * L.float() + u).floor().long(), min=2)
        n_cand = (L - span).clamp_min(1)
        n_starts = torch.minimum(n_starts, n_cand)
        noise = cpu_uniform(B, N, generator=generator).to(dev)
        ar = torch.arange(N, device=dev)
        noise = noise.masked_fill(ar[None] >= n_cand[:, None], 2.0)
        kth = noise.sort(1).values.gather(1, (n_starts - 1).clamp_min(0)[:, None])
        starts = (noise <= kth) & (ar[None] < n_cand[:, None])
        c = torch.cumsum(starts.long(), 1)
        c_prev = F.pad(c, (span, 0))[:, :N]
        mask = (c - c_prev) > 0
        return mask & ~pad

    # -- views ----------------------------------------------------------------------------------------
    def views(self, batch: Batch, n_global: int, n_local: int) -> list[Batch]:
        """Random frame-aligned crops (global: 60-100% of the utterance, local: 20-40%), each with a
        random gain and light noise; crops keep ``speech_offset`` so frame indices stay absolute."""
        out = []
        for i in range(n_global + n_local):
            lo, hi = (0.6, 1.0) if i < n_global else (0.2, 0.4)
            out.append(self._crop_view(batch, lo, hi))
        return out

    def _crop_view(self, batch: Batch, lo: float, hi: float) -> Batch:
        wav, lengths = batch["speech"], self._lengths(batch)
        B, dev = wav.shape[0], wav.device
        frac = lo + (hi - lo) * torch.rand(B, device=dev)
        new_len = torch.maximum((lengths.float() * frac).long(), torch.full_like(lengths, 400)).minimum(lengths)
        room = torch.div(lengths - new_len, HOP, rounding_mode="floor")
        start = (torch.rand(B, device=dev) * (room + 1).float()).long() * HOP
        T = int(new_len.max())
        idx = (start[:, None] + torch.arange(T, device=dev)[None]).clamp_max(wav.shape[1] - 1)
        w = torch.gather(wav, 1, idx) * (torch.arange(T, device=dev)[None] < new_len[:, None])
        gain = 10 ** ((torch.rand(B, 1, device=dev) - 0.5) * 0.6)  # +-3 dB
        w = w * gain + 0.003 * torch.randn_like(w) * (torch.arange(T, device=dev)[None] < new_len[:, None])
        v = {k: t for k, t in batch.items() if not k.startswith("speech")}
        v["speech"], v["speech_len"] = w, new_len
        v["speech_offset"] = batch.get("speech_offset", torch.zeros_like(start)).to(dev) + start
        return v

    # -- features -------------------------------------------------------------------------------------
    def unit_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """MFCC (13) + deltas + delta-deltas per frame, each utterance mean- and variance-normalised
        (CMVN): [B, N, 39]. Without CMVN, k-means clusters mostly the log energy (c0), i.e. recording
        level, which the per-frame-normalised front-end cannot see; with it, units follow spectral
        shape (tested: the unit's PNMI against phones and the model's unit accuracy both rise)."""
        feats, pad = per_utterance(self.mfcc, batch["speech"], self._lengths(batch))
        w, mean, var = _utterance_moments(feats, pad)
        return ((feats - mean) / (var.sqrt() + 1e-5)) * w, pad

    def baseline_features(self, batch: Batch) -> torch.Tensor:
        """Per-utterance means and standard deviations of 13 MFCCs: [B, 26]."""
        feats, pad = per_utterance(self.mfcc_plain, batch["speech"], self._lengths(batch))
        _, mean, var = _utterance_moments(feats, pad)
        return torch.cat([mean[:, 0], var[:, 0].sqrt()], -1)

    def token_rate(self) -> float:
        return 16000 / HOP  # 50 frames per second

    def preprocessing(self) -> dict[str, Any]:
        return {"sample_rate": 16000, "waveform_normalize": self.waveform_normalize,
                "waveform_norm_eps": self.waveform_norm_eps, "frame_hop": HOP, "frame_window": 400,
                "position": self.position}


from mmssl.modalities.speech.data import SpeechCodec  # noqa: E402  (the adapter's data codec)

SpeechAdapter.codec = SpeechCodec()
