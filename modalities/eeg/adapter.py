"""EEG adapter: any electrode layout, channel count, rate and length -> channel-patch tokens with a 4D
position (REVE, El Ouahidi et al., 2025: electrode x, y, z and time).

A token is one channel's patch of ``patch`` samples at the model's rate ``sample_rate``; one linear
patch embedding serves every channel. Its position is a function of the electrode's coordinates and
the patch's time only, never of content: random Fourier features of (x, y, z, t seconds) (Tancik et
al., 2020: ``[sin 2 pi f.p, cos 2 pi f.p]`` for fixed Gaussian frequency vectors f in 4D), carried to
the model width by a linear layer, plus a linear map of (x, y, z). So one model reads 19-, 32- or
64-channel recordings, and montages it has never seen, in any channel order.

Tokens run channel-major: token ``c * Tp + t`` is channel c's patch t (``index`` [B, N, 2] = (channel,
time patch)). Padding: channels outside ``eeg_chan_mask`` and patches past a recording's length."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmssl.modalities.base import ModalityAdapter
from mmssl.modalities.common import (
    cpu_uniform,
    mae_keep_count,
    masked_token_mean,
    noise_ranks,
    normalise_patches,
    sincos,
    squared_error,
    view_config,
)
from mmssl.modalities.eeg.data import resample
from mmssl.registry import MODALITIES
from mmssl.types import Batch, Tokens

#: (name, low Hz, high Hz) of the classical bands in ``baseline_features``
BANDS: tuple[tuple[str, float, float], ...] = (("delta", 1.0, 4.0), ("theta", 4.0, 8.0), ("alpha", 8.0, 13.0),
                                               ("beta", 13.0, 30.0), ("gamma", 30.0, 45.0))


def band_log_power(patches: torch.Tensor, rate: float) -> torch.Tensor:
    """patches [..., P] at ``rate`` Hz -> [..., len(BANDS)]: log(1e-8 + mean power) of the
    Hann-windowed periodogram's bins in each band of ``BANDS`` (a band with no bin at this patch length
    or rate, e.g. above Nyquist, gives log 1e-8)."""
    P = patches.shape[-1]
    win = torch.hann_window(P, periodic=False, device=patches.device, dtype=patches.dtype)
    power = torch.fft.rfft(patches * win).abs() ** 2 / (win ** 2).sum()
    freqs = torch.fft.rfftfreq(P, 1.0 / rate).to(patches.device)
    out = []
    for _, lo, hi in BANDS:
        sel = (freqs >= lo) & (freqs < hi)
        out.append(power[..., sel].mean(-1) if bool(sel.any()) else power.new_zeros(power.shape[:-1]))
    return torch.log(torch.stack(out, -1) + 1e-8)
#: defaults of ``adapter.views`` (configurable in the modality yaml)
VIEW_DEFAULTS: dict[str, Any] = {
    "global_crop": (0.6, 1.0),   # fraction of each recording's length kept by a global view
    "local_crop": (0.25, 0.5),   # ... by a local view (at least one patch)
    "channel_drop": 0.2,         # probability of dropping each channel (one always stays)
    "scale": (0.8, 1.25),        # amplitude scaling per recording (log-uniform), times 0.9-1.1 per channel
    "noise": 0.1,                # std of added Gaussian noise (signals are normalised: unit ~ robust std)
    "pos_jitter": 0.05,          # radians: the montage rotated slightly (cap placement)
}


def _rotations(n: int, max_angle: float, device: torch.device) -> torch.Tensor:
    """n random rotations [n, 3, 3] by at most ``max_angle`` radians about random axes (Rodrigues)."""
    k = torch.nn.functional.normalize(torch.randn(n, 3, device=device), dim=1)
    a = torch.rand(n, 1, 1, device=device) * max_angle
    K = torch.zeros(n, 3, 3, device=device)
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    K = K - K.transpose(1, 2)
    return torch.eye(3, device=device) + a.sin() * K + (1 - a.cos()) * K @ K


@MODALITIES.register("eeg")
class EEGAdapter(ModalityAdapter):
    """Batch keys (data.py): ``eeg`` [B, C, T] normalised signals, ``eeg_pos`` [B, C, 3] unit vectors,
    ``eeg_chan_mask`` bool [B, C], ``eeg_len`` [B] samples, ``eeg_rate`` [B] Hz (absent: the model's
    rate); ``label`` passes through views.

    cfg (the modality yaml's ``adapter:``): sample_rate (the model's rate; batches at another rate
    are resampled), patch (samples per token at that rate), window_ms (the crop the codec cuts,
    also at evaluation), fourier_features (number of 4D frequencies), fourier_space (std of their
    spatial part, cycles per unit of the unit sphere), fourier_time (std of their time part, cycles per
    second), fourier_seed, norm_target (normalise each target patch by its own mean and std),
    mask_channel_fraction (share of the hidden tokens taken as whole channels), views."""

    name = "eeg"
    kind = "signal"

    def __init__(self, dim: int, cfg: dict[str, Any] | None = None) -> None:
        super().__init__(dim, cfg)
        c = self.cfg
        self.sample_rate = float(c.get("sample_rate", 200))
        self.patch = int(c.get("patch", 200))
        self.window_ms = c.get("window_ms", 4000)
        self.norm_target = bool(c.get("norm_target", False))
        self.target = str(c.get("target", "samples"))
        if self.target not in ("samples", "spectrum", "both"):
            raise ValueError(f"eeg target must be samples, spectrum or both, not {self.target!r}")
        self.spectrum_bands = int(c.get("spectrum_bands", 16))
        self.spectrum_weight = float(c.get("spectrum_weight", 1.0))
        self.mask_channel_fraction = float(c.get("mask_channel_fraction", 0.5))
        if self.patch < 1 or self.sample_rate <= 0:
            raise ValueError(f"eeg patch ({self.patch}) and sample_rate ({self.sample_rate}) must be positive")
        if not 0.0 <= self.mask_channel_fraction <= 1.0:
            raise ValueError(f"mask_channel_fraction must be in [0, 1], not {self.mask_channel_fraction}")
        K = int(c.get("fourier_features", 256))
        g = torch.Generator().manual_seed(int(c.get("fourier_seed", 0)))
        freqs = torch.randn(K, 4, generator=g)
        freqs[:, :3] *= float(c.get("fourier_space", 0.5))
        freqs[:, 3] *= float(c.get("fourier_time", 0.25))
        # fixed frequencies, saved with the weights: the same positions after export and reload
        self.register_buffer("freqs", freqs)
        self.patch_embed = nn.Linear(self.patch, dim)
        self.pos_fourier = nn.Linear(2 * K, dim)
        self.pos_xyz = nn.Linear(3, dim, bias=False)
        for m in (self.patch_embed, self.pos_fourier, self.pos_xyz):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        self.view_cfg = view_config("eeg", VIEW_DEFAULTS, c.get("views"))

    # -- input ----------------------------------------------------------------------------------------
    def _check(self, batch: Batch) -> None:
        x = batch.get("eeg")
        if x is None or x.dim() != 3:
            raise ValueError(f"eeg batch must hold eeg [B, C, T], got {None if x is None else tuple(x.shape)}")
        B, C, _ = x.shape
        for k, shape in (("eeg_pos", (B, C, 3)), ("eeg_chan_mask", (B, C)), ("eeg_len", (B,))):
            if k not in batch or tuple(batch[k].shape) != shape:
                got = tuple(batch[k].shape) if k in batch else None
                raise ValueError(f"eeg batch needs {k} of shape {list(shape)}, got {got}")

    def _rate(self, batch: Batch) -> float:
        r = batch.get("eeg_rate")
        if r is None:
            return self.sample_rate
        rates = torch.unique(r.float())
        if rates.numel() != 1:
            raise ValueError(f"one eeg batch holds one rate (the codec's collate makes it so), got {rates.tolist()}")
        return float(rates)

    def signal(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (signals [B, C, T'] float at the model's rate, lengths [B] in samples at that rate): whole
        recordings resampled at once, for the classical features; tokens use ``_patches``."""
        self._check(batch)
        x, lens = batch["eeg"].float(), batch["eeg_len"].long()
        rate = self._rate(batch)
        if rate != self.sample_rate:
            x = resample(x, rate, self.sample_rate)
            lens = torch.floor(lens.double() * (self.sample_rate / rate)).long().clamp(max=x.shape[-1])
        return x, lens

    def _patches(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> (patches [B, C, Tp, P] at the model's rate, patch counts [B], Tp). A recording shorter than
        one patch gives one zero-filled patch; a tail shorter than a patch is dropped.

        A batch at another rate is cut into patches of the same duration at its own rate first
        (``round(P * rate / sample_rate)`` samples each) and every patch is resampled on its own: a
        resampling filter run over the whole recording would mix each hidden patch's samples into the
        edges of its visible neighbours (a leak under masking)."""
        self._check(batch)
        x, lens = batch["eeg"].float(), batch["eeg_len"].long()
        rate = self._rate(batch)
        P = self.patch
        n_in = P if rate == self.sample_rate else max(1, round(P * rate / self.sample_rate))
        n_t = (lens // n_in).clamp_min(1)
        Tp = int(n_t.max()) if n_t.numel() else 1
        need = Tp * n_in
        # zero everything past each recording's length: padding never enters a real patch
        t = torch.arange(x.shape[-1], device=x.device)
        x = x * (t[None, :] < lens[:, None])[:, None, :].to(x.dtype)
        if x.shape[-1] < need:
            x = torch.nn.functional.pad(x, (0, need - x.shape[-1]))
        B, C = x.shape[:2]
        patches = x[..., :need].reshape(B, C, Tp, n_in)
        if n_in != P:  # n_in samples -> P samples, each patch alone
            patches = resample(patches, float(n_in), float(P))[..., :P]
        return patches, n_t, Tp

    def _pad(self, batch: Batch, n_t: torch.Tensor, Tp: int) -> torch.Tensor:
        chan = batch["eeg_chan_mask"].bool()
        late = torch.arange(Tp, device=chan.device)[None, :] >= n_t.to(chan.device)[:, None]  # [B, Tp]
        return (~chan[:, :, None] | late[:, None, :]).flatten(1)

    def positions(self, xyz: torch.Tensor, Tp: int) -> torch.Tensor:
        """xyz [B, C, 3] unit vectors -> [B, C * Tp, D]: the 4D position of every (channel, patch),
        patch t centred at (t + 0.5) * patch / sample_rate seconds. A function of coordinates and time
        only."""
        B, C, _ = xyz.shape
        f = self.freqs.to(xyz.dtype)
        secs = (torch.arange(Tp, device=xyz.device, dtype=xyz.dtype) + 0.5) * (self.patch / self.sample_rate)
        # 2 pi f.(x, y, z, t) = spatial phase per channel + time phase per patch: [B, C, Tp, K]
        phase = (xyz @ f[:, :3].T)[:, :, None, :] + (secs[:, None] * f[:, 3])[None, None]
        feats = sincos(2 * math.pi * phase)
        pos = self.pos_fourier(feats) + self.pos_xyz(xyz)[:, :, None, :]
        return pos.reshape(B, C * Tp, self.dim)

    # -- tokens ---------------------------------------------------------------------------------------
    def tokenize(self, batch: Batch) -> Tokens:
        patches, n_t, Tp = self._patches(batch)
        B, C = patches.shape[:2]
        w = self.patch_embed.weight
        x = self.patch_embed(patches.to(w.dtype)).reshape(B, C * Tp, self.dim)
        xyz = batch["eeg_pos"].to(device=x.device, dtype=torch.float32)
        pos = self.positions(xyz, Tp).to(x.dtype)
        ch = torch.arange(C, device=x.device).repeat_interleave(Tp)
        tt = torch.arange(Tp, device=x.device).repeat(C)
        index = torch.stack([ch, tt], -1)[None].expand(B, -1, -1)
        return Tokens(x=x, pos=pos, pad=self._pad(batch, n_t, Tp).to(x.device), index=index)

    def num_tokens(self, batch: Batch) -> torch.Tensor:
        self._check(batch)
        lens = batch["eeg_len"].long()
        rate = self._rate(batch)
        if rate != self.sample_rate:
            lens = torch.floor(lens.double() * (self.sample_rate / rate)).long()
        n_t = (lens // self.patch).clamp_min(1)
        return batch["eeg_chan_mask"].long().sum(1) * n_t.to(batch["eeg_chan_mask"].device)

    # -- masked modelling -----------------------------------------------------------------------------
    @property
    def target_dim(self) -> int:
        return {"samples": self.patch, "spectrum": self.spectrum_bands,
                "both": self.patch + self.spectrum_bands}[self.target]

    def spectrum(self, patches: torch.Tensor) -> torch.Tensor:
        """[..., P] -> [..., spectrum_bands] log power of the Hann-windowed patch in equal-width
        frequency bands from 0 to Nyquist (band averages: a single patch's periodogram is too noisy
        per bin)."""
        P = patches.shape[-1]
        win = torch.hann_window(P, periodic=False, device=patches.device, dtype=patches.dtype)
        power = torch.fft.rfft(patches * win).abs() ** 2 / (win ** 2).sum()
        edges = torch.linspace(0, power.shape[-1], self.spectrum_bands + 1, device=patches.device).round().long()
        bands = [power[..., int(a):max(int(b), int(a) + 1)].mean(-1) for a, b in zip(edges[:-1], edges[1:])]
        return torch.log(torch.stack(bands, -1) + 1e-3)

    def targets(self, batch: Batch, tokens: Tokens | None = None) -> torch.Tensor:
        """Per token [B, N, target_dim]: its normalised samples (``target: samples``; with ``norm_target``
        each patch by its own mean and unbiased std, as MAE's norm_pix), its log band power
        (``spectrum``, the amplitude half of LaBraM's Fourier targets), or both side by side."""
        patches, _, _ = self._patches(batch)
        t = patches.flatten(1, 2).float()
        out = []
        if self.target in ("samples", "both"):
            out.append(normalise_patches(t) if self.norm_target else t)
        if self.target in ("spectrum", "both"):
            out.append(self.spectrum(t))
        return out[0] if len(out) == 1 else torch.cat(out, -1)

    def recon_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token MSE, averaged over the tokens where mask is True. With ``target: both`` the
        samples' MSE and the spectrum's MSE are each a mean over their own width, summed with
        ``spectrum_weight``: the 16 band powers would otherwise weigh 16 / (patch + 16) of the loss."""
        sq = squared_error(pred, target)
        if self.target == "both":
            err = sq[..., :self.patch].mean(-1) + self.spectrum_weight * sq[..., self.patch:].mean(-1)
        else:
            err = sq.mean(-1)
        return masked_token_mean(err, mask)

    def make_mask(self, tokens: Tokens, ratio: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Hide ``L - int(L * (1 - ratio))`` of each sample's L real tokens (MAE's count): first whole
        channels, in random order, while they fit in ``mask_channel_fraction`` of that count, then
        random single patches for the rest. Uses ``index[..., 0]`` (the channel) of the tokens; noise
        is drawn on CPU with ``generator``."""
        pad = tokens.pad.cpu()
        ch = tokens.index[..., 0].cpu()
        B, N = pad.shape
        L = (~pad).sum(1)
        n_hide = L - mae_keep_count(L, ratio)
        C = int(ch.max()) + 1 if N else 1
        # real tokens per channel, channels visited in a random order, cumulated
        per_ch = torch.zeros(B, C, dtype=torch.long).scatter_add_(1, ch, (~pad).long())
        order = torch.argsort(cpu_uniform(B, C, generator=generator), 1)
        cum = torch.gather(per_ch, 1, order).cumsum(1)
        budget = (n_hide.double() * self.mask_channel_fraction).floor().long()
        chosen_sorted = (cum <= budget[:, None]) & (torch.gather(per_ch, 1, order) > 0)
        chosen = torch.zeros(B, C, dtype=torch.bool).scatter_(1, order, chosen_sorted)
        whole = torch.gather(chosen, 1, ch) & ~pad  # tokens of the chosen channels
        # priority: chosen channels first, then random tokens; padding last
        noise = cpu_uniform(B, N, generator=generator)
        rank = noise_ranks(torch.where(whole, torch.full_like(noise, -1.0), noise), pad)
        hidden = (rank < n_hide[:, None]) & ~pad
        return hidden.to(tokens.pad.device)

    # -- views ----------------------------------------------------------------------------------------
    def views(self, batch: Batch, n_global: int, n_local: int) -> list[Batch]:
        """``n_global`` then ``n_local`` views: a random time crop (``global_crop`` / ``local_crop`` of
        each recording's length, at least one patch), channel dropout, amplitude scaling, Gaussian noise,
        a small montage rotation. Draws from torch's global RNG (seed it for reproducible views)."""
        self._check(batch)
        v = self.view_cfg
        x, lens = batch["eeg"].float(), batch["eeg_len"].long()
        chan = batch["eeg_chan_mask"].bool()
        B, C, T = x.shape
        rate = self._rate(batch)
        min_len = min(T, max(1, math.ceil(self.patch * rate / self.sample_rate)))
        rest = {k: t for k, t in batch.items() if not k.startswith("eeg")}
        out = []
        for i in range(n_global + n_local):
            lo, hi = v["global_crop" if i < n_global else "local_crop"]
            frac = torch.empty(B).uniform_(float(lo), float(hi))
            new_len = torch.maximum((lens.cpu().double() * frac).floor().long(), torch.full((B,), min_len)).minimum(lens.cpu())
            start = (torch.rand(B) * (lens.cpu() - new_len + 1)).floor().long()
            Tn = int(new_len.max())
            idx = (start[:, None] + torch.arange(Tn)[None]).clamp(max=T - 1).to(x.device)  # [B, Tn]
            xv = torch.gather(x, 2, idx[:, None, :].expand(B, C, Tn))
            xv = xv * (torch.arange(Tn, device=x.device)[None] < new_len.to(x.device)[:, None])[:, None].to(xv.dtype)
            # channel dropout, keeping each recording's highest-scoring real channel
            score = torch.rand(B, C, device=x.device).masked_fill(~chan, -1.0)
            keep = chan & ((score >= float(v["channel_drop"])) | (score == score.max(1, keepdim=True).values))
            s_lo, s_hi = (math.log(float(s)) for s in v["scale"])
            amp = torch.empty(B, 1, 1, device=x.device).uniform_(s_lo, s_hi).exp()
            amp = amp * torch.empty(B, C, 1, device=x.device).uniform_(0.9, 1.1)
            valid = keep[:, :, None] & (torch.arange(Tn, device=x.device)[None, None] < new_len.to(x.device)[:, None, None])
            xv = (xv * amp + float(v["noise"]) * torch.randn_like(xv)) * valid.to(xv.dtype)
            rot = _rotations(B, float(v["pos_jitter"]), x.device)
            pos = torch.einsum("bij,bcj->bci", rot, batch["eeg_pos"].float()) * keep[..., None].to(torch.float32)
            view = {**rest, "eeg": xv, "eeg_pos": pos, "eeg_chan_mask": keep, "eeg_len": new_len.to(lens.device)}
            if "eeg_rate" in batch:
                view["eeg_rate"] = batch["eeg_rate"]
            out.append(view)
        return out

    # -- features -------------------------------------------------------------------------------------
    @property
    def unit_features_id(self) -> str:  # type: ignore[override]
        return f"patch-log-band-power,hann,{[b[0] for b in BANDS]},rate{self.sample_rate},patch{self.patch}"

    def unit_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each (channel, time patch) token's log band powers (delta, theta, alpha, beta, gamma of
        ``BANDS``): the mean power of the Hann-windowed patch's periodogram bins in each band,
        log(1e-8 + power), [B, C * Tp, 5] in ``tokenize``'s order (channel-major) and padding (0 there).
        The same patches as the tokens (``_patches``: at the model's rate, each resampled alone)."""
        patches, n_t, Tp = self._patches(batch)
        t = patches.flatten(1, 2).float()  # [B, N, P]
        pad = self._pad(batch, n_t, Tp).to(t.device)
        return band_log_power(t, self.sample_rate) * (~pad)[..., None], pad

    def baseline_features(self, batch: Batch) -> torch.Tensor:
        """Log band power (delta, theta, alpha, beta, gamma): channel mean, left minus right, front minus
        back: [B, 15] for any montage.

        Per channel: the Hann-windowed periodogram of the recording's real samples, mean power in each
        band, log. Then: the mean over real channels; the mean over left channels (x < -0.1) minus the
        mean over right ones (x > 0.1); front (y > 0.1) minus back (y < -0.1); 0 where a side is empty."""
        x, lens = self.signal(batch)
        chan = batch["eeg_chan_mask"].bool().to(x.device)
        xyz = batch["eeg_pos"].float().to(x.device)
        B, C, _ = x.shape
        out = torch.zeros(B, 3 * len(BANDS), device=x.device)
        for b in range(B):
            n = int(lens[b])
            sig = x[b, chan[b], :n].float()
            if n < 4 or sig.shape[0] == 0:
                continue
            sig = sig - sig.mean(1, keepdim=True)
            spec = torch.fft.rfft(sig * torch.hann_window(n, periodic=False, device=x.device), dim=1).abs() ** 2
            freqs = torch.fft.rfftfreq(n, 1.0 / self.sample_rate).to(x.device)
            bands = []
            for _, lo, hi in BANDS:
                sel = (freqs >= lo) & (freqs < hi)
                bands.append(spec[:, sel].mean(1) if bool(sel.any()) else torch.zeros(sig.shape[0], device=x.device))
            lp = torch.log(torch.stack(bands, 1) + 1e-8)  # [C_real, 5]
            p = xyz[b, chan[b]]

            def side(m: torch.Tensor) -> torch.Tensor:
                return lp[m].mean(0) if bool(m.any()) else torch.zeros(len(BANDS), device=x.device)

            lr = side(p[:, 0] < -0.1) - side(p[:, 0] > 0.1) if bool((p[:, 0] < -0.1).any() and (p[:, 0] > 0.1).any()) \
                else torch.zeros(len(BANDS), device=x.device)
            fb = side(p[:, 1] > 0.1) - side(p[:, 1] < -0.1) if bool((p[:, 1] > 0.1).any() and (p[:, 1] < -0.1).any()) \
                else torch.zeros(len(BANDS), device=x.device)
            out[b] = torch.cat([lp.mean(0), lr, fb])
        return out

    def preprocessing(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "patch": self.patch,
                "max_len": None if self.window_ms is None else int(self.window_ms), "max_len_unit": "ms",
                "normalisation": "per recording: channel medians removed, divided by the median over channels "
                                 "of 1.4826 * MAD, clipped to +-15 (mmssl.modalities.eeg.data)",
                "coordinates": "unit sphere, head frame (x right, y nasion, z up)"}


from mmssl.modalities.eeg.data import EEGCodec

EEGAdapter.codec = EEGCodec()
