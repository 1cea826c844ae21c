"""MRI adapter (BM-MAE style): a case is a set of co-registered 3D volumes, one per contrast, with a
presence mask; any subset of contrasts goes through one model unchanged.

Each contrast has its own 3D patch embedding (one grouped ``Conv3d``: a separate kernel per contrast)
and a learned contrast embedding. A token is one contrast's ``p``^3 patch; its position is the patch's
3D sin-cos (or learned) spatial position plus its contrast's embedding, both content-free, so the
decoder of a masked autoencoder knows which contrast and where every hidden token is. A contrast the
case lacks contributes no token: its tokens are removed from the sequence (a batch keeps
``max present`` tokens per case, padding the rest), so they are never attended to, never hidden and
never a target. Masking (``make_mask``) hides whole present contrasts (always leaving one visible) and
then random patches of the rest, about ``ratio`` of each case's tokens; the decoder reconstructs them
from the positions of every contrast's tokens.

``index`` [B, N, 4] = (contrast, d, h, w) of each token. Targets are each patch's voxels, raw
(``norm_pix: false``, the default: volumes are z-scored per contrast already, and reconstructions of a
missing contrast, ``reconstruct.py``, come out as whole intensities) or per-patch normalised
(``norm_pix: true``, MAE's image recipe; such a model cannot synthesise absolute intensities)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.errors import UnknownNameError
from mmssl.modalities.base import ModalityAdapter, local_view_side
from mmssl.modalities.common import (
    cpu_uniform,
    float_pair,
    kept_first,
    mae_keep_count,
    masked_mse,
    noise_ranks,
    normalise_patches,
    sincos_grid,
    view_config,
)
from mmssl.modalities.mri.data import DEFAULT_CONTRASTS, MRICodec
from mmssl.registry import MODALITIES
from mmssl.types import Batch, Tokens

#: defaults of ``adapter.views`` (configurable in the modality yaml)
VIEW_DEFAULTS: dict[str, Any] = {
    "flip_p": 0.5,             # per axis
    "scale": (0.8, 1.25),      # per contrast intensity scale
    "shift": (-0.2, 0.2),      # per contrast intensity shift (z-score units)
    "translate": 0.1,          # at most this fraction of the side, per axis (zero-filled)
    "local_size": None,        # side of local views; default half the side rounded to the patch (>= 1 patch)
    "local_scale": (0.3, 0.6),  # fraction of the side a local crop covers before resizing to local_size
}
HIST_BINS = 16
HIST_RANGE = (-3.0, 5.0)


def sincos_3d(d: int, h: int, w: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 3D sin-cos positions (MAE's 2D table extended to three axes) -> [d * h * w, dim], d-major.

    Each axis gets ``2 * (dim // 6)`` channels, [sin(pos * omega), cos(pos * omega)] with
    omega_k = 1 / 10000^(k / (dim // 6)); in the order w, h, d (as MAE puts the column first); the
    ``dim % 6`` channels left over are zero."""
    if dim < 6:  # at least one frequency per axis
        raise ValueError(f"3D sin-cos positions need a width of at least 6, not {dim}")
    return sincos_grid((d, h, w), dim, device)


def intensity_statistics(v: torch.Tensor) -> torch.Tensor:
    """v [..., V] a patch's (z-scored) voxels -> [..., 7]: mean, standard deviation, 10th, 50th and 90th
    percentiles, maximum, and the fraction of head voxels (non-zero: the background is 0)."""
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], device=v.device, dtype=v.dtype), dim=-1)  # [3, ...]
    return torch.stack([v.mean(-1), v.std(-1, unbiased=False), *q, v.amax(-1), (v != 0).float().mean(-1)], -1)


def patchify3d(vol: torch.Tensor, p: int) -> torch.Tensor:
    """[B, M, D, H, W] -> [B, M, (D/p)(H/p)(W/p), p^3]: patches d-major over the grid, voxels (d, h, w)
    within a patch."""
    B, M, D, H, W = vol.shape
    d, h, w = D // p, H // p, W // p
    x = vol.reshape(B, M, d, p, h, p, w, p).permute(0, 1, 2, 4, 6, 3, 5, 7)
    return x.reshape(B, M, d * h * w, p ** 3)


def unpatchify3d(patches: torch.Tensor, grid: tuple[int, int, int], p: int) -> torch.Tensor:
    """[..., G, p^3] patches of one contrast (``patchify3d`` order) -> [..., D, H, W]."""
    d, h, w = grid
    lead = patches.shape[:-2]
    x = patches.reshape(*lead, d, h, w, p, p, p)
    n = len(lead)
    x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5)
    return x.reshape(*lead, d * p, h * p, w * p)


@MODALITIES.register("mri")
class MRIAdapter(ModalityAdapter):
    """Batch keys: ``mri`` float [B, M, D, H, W] (z-scored volumes; absent slots are zeros) and
    ``mri_present`` bool [B, M] (default: every contrast present), M = len(contrasts); D, H, W divisible
    by ``patch_size``. ``label`` passes through views.

    cfg (the modality yaml's ``adapter:``): contrasts (names, in the batch's slot order), patch_size,
    volume_size (the grid learned positions are stored for, and ``max_len``), position (sincos |
    learned), norm_pix, whole_contrast_p (how often ``make_mask`` hides whole contrasts), views (see
    ``VIEW_DEFAULTS``)."""

    name = "mri"
    kind = "volume"

    def __init__(self, dim: int, cfg: dict[str, Any] | None = None) -> None:
        super().__init__(dim, cfg)
        c = self.cfg
        self.contrasts = tuple(str(n) for n in (c.get("contrasts") or DEFAULT_CONTRASTS))
        if len({n.lower() for n in self.contrasts}) != len(self.contrasts):
            raise ValueError(f"mri contrasts must be distinct, got {list(self.contrasts)}")
        if tuple(n.lower() for n in self.contrasts) != tuple(n.lower() for n in type(self).codec.contrasts):
            type(self).codec.configure(self.contrasts)  # one contrast list per process (see MRICodec)
        self.num_contrasts = M = len(self.contrasts)
        self.patch_size = p = int(c.get("patch_size", 16))
        self.volume_size = int(c.get("volume_size", 128))
        if self.volume_size % p:
            raise ValueError(f"volume_size {self.volume_size} is not divisible by patch_size {p}")
        self.grid = (self.volume_size // p,) * 3
        self.position = str(c.get("position", "learned"))
        self.norm_pix = bool(c.get("norm_pix", False))
        self.whole_contrast_p = float(c.get("whole_contrast_p", 0.5))
        # One kernel per contrast in one op: a grouped conv, group m reads contrast m only.
        self.patch_embed = nn.Conv3d(M, M * dim, p, stride=p, groups=M)
        nn.init.xavier_uniform_(self.patch_embed.weight.data.view(M * dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        # Initialised at the scale of the patch embeddings (not timm's 0.02): the decoder of a masked
        # autoencoder tells its mask tokens apart only by these, and near-identical codes left MAE on the
        # embedded phantoms predicting a constant for hundreds of steps (measured).
        self.pos_init_std = float(c.get("pos_init_std", 0.5))
        self.contrast_embed = nn.Parameter(torch.zeros(M, dim))
        nn.init.normal_(self.contrast_embed, std=self.pos_init_std)
        if self.position == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] * self.grid[2], dim))
            nn.init.normal_(self.pos_embed, std=self.pos_init_std)
        elif self.position == "sincos":
            self.register_buffer("sincos", sincos_3d(*self.grid, dim)[None], persistent=False)
        else:
            raise ValueError(f"mri position must be 'sincos' or 'learned', not {self.position!r}")
        self.view_cfg = view_config("mri", VIEW_DEFAULTS, c.get("views"))

    # -- input ----------------------------------------------------------------------------------------
    def _check(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """-> (volumes [B, M, D, H, W] float, present [B, M] bool, grid)."""
        vol = batch["mri"]
        M = self.num_contrasts
        if vol.dim() != 5 or vol.shape[1] != M:
            raise ValueError(f"mri batch must be [B, {M}, D, H, W] ({', '.join(self.contrasts)}), got {tuple(vol.shape)}")
        p = self.patch_size
        D, H, W = vol.shape[2:]
        if D % p or H % p or W % p:
            raise ValueError(f"mri volume {D}x{H}x{W} is not divisible by the patch size {p}")
        present = batch.get("mri_present")
        if present is None:
            present = torch.ones(vol.shape[:2], dtype=torch.bool, device=vol.device)
        present = present.to(device=vol.device, dtype=torch.bool)
        if not bool(present.any(1).all()):
            raise ValueError("every mri case needs at least one present contrast")
        return vol, present, (D // p, H // p, W // p)

    def positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """[1, G, D] spatial positions of a grid; a function of the grid only, never of content."""
        if self.position == "sincos":
            if grid == self.grid:
                return self.sincos
            return sincos_3d(*grid, self.dim, self.sincos.device)[None]
        if grid == self.grid:
            return self.pos_embed
        table = self.pos_embed.float().reshape(1, *self.grid, self.dim).permute(0, 4, 1, 2, 3)
        table = F.interpolate(table, size=grid, mode="trilinear", align_corners=False)
        return table.permute(0, 2, 3, 4, 1).reshape(1, -1, self.dim).to(self.pos_embed.dtype)

    @staticmethod
    def _order(present: torch.Tensor, G: int) -> torch.Tensor | None:
        """Token order that puts present contrasts' tokens first (stable) and cuts the rest: [B, N']
        indices into the full M*G sequence, or None when every contrast of every case is present."""
        if bool(present.all()):
            return None
        real = present.repeat_interleave(G, dim=1)  # [B, M*G]
        n = int(real.sum(1).max())
        return kept_first(real)[:, :n]

    # -- tokens ---------------------------------------------------------------------------------------
    def tokenize(self, batch: Batch) -> Tokens:
        vol, present, grid = self._check(batch)
        B, M = vol.shape[:2]
        G = grid[0] * grid[1] * grid[2]
        x = self.patch_embed(vol.to(self.patch_embed.weight.dtype))  # [B, M*D, d, h, w]
        x = x.reshape(B, M, self.dim, G).transpose(2, 3).reshape(B, M * G, self.dim)
        spatial = self.positions(grid).to(x.dtype)  # [1, G, D]
        pos = (spatial[:, None] + self.contrast_embed.to(x.dtype)[None, :, None]).reshape(1, M * G, self.dim)
        dev = x.device
        cd, cg = torch.meshgrid(torch.arange(M, device=dev), torch.arange(G, device=dev), indexing="ij")
        d, r = cg // (grid[1] * grid[2]), cg % (grid[1] * grid[2])
        index = torch.stack([cd, d, r // grid[2], r % grid[2]], -1).reshape(1, M * G, 4)
        pad = (~present).repeat_interleave(G, dim=1)
        order = self._order(present, G)
        if order is None:
            return Tokens(x=x, pos=pos.expand(B, -1, -1), pad=pad, index=index.expand(B, -1, -1))
        t = Tokens(x=x, pos=pos.expand(B, -1, -1), pad=pad, index=index.expand(B, -1, -1))
        return t.select(order)

    def num_tokens(self, batch: Batch) -> torch.Tensor:
        vol, present, grid = self._check(batch)
        return present.sum(1).long() * (grid[0] * grid[1] * grid[2])

    def contrast_mask(self, tokens: Tokens, names: list[str] | tuple[str, ...]) -> torch.Tensor:
        """[B, N] True at the (non-padding) tokens of the named contrasts."""
        want = torch.zeros(self.num_contrasts, dtype=torch.bool, device=tokens.index.device)
        for n in names:
            want[self.contrast_index(n)] = True
        return want[tokens.index[..., 0]] & ~tokens.pad

    def contrast_index(self, name: str) -> int:
        low = [c.lower() for c in self.contrasts]
        if name.lower() not in low:
            raise UnknownNameError(f"unknown contrast {name!r}; this model has {', '.join(self.contrasts)}")
        return low.index(name.lower())

    # -- masked modelling -----------------------------------------------------------------------------
    @property
    def target_dim(self) -> int:
        return self.patch_size ** 3

    def targets(self, batch: Batch, tokens: Tokens | None = None) -> torch.Tensor:
        """Each token's patch voxels [B, N, p^3], aligned with ``tokenize`` (absent contrasts cut the
        same way); per-patch normalised (mean 0, unbiased variance 1, eps 1e-6) with ``norm_pix``."""
        vol, present, grid = self._check(batch)
        B, M = vol.shape[:2]
        t = patchify3d(vol.float(), self.patch_size).reshape(B, -1, self.target_dim)
        if self.norm_pix:
            t = normalise_patches(t)
        order = self._order(present, grid[0] * grid[1] * grid[2])
        if order is not None:
            t = torch.gather(t, 1, order[..., None].expand(-1, -1, t.shape[-1]))
        return t

    def recon_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MAE's loss: per-token MSE over the patch's voxels, averaged over the tokens where mask is True
        (hidden on purpose; a contrast the case lacks has no token, so it never counts)."""
        return masked_mse(pred, target, mask)

    def make_mask(self, tokens: Tokens, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per case: hide ``L - int(L * (1 - ratio))`` of its L real tokens (MAE's count). With
        probability ``whole_contrast_p`` first hide k whole present contrasts, k uniform in 1..K where K
        leaves at least one contrast visible and fits the count; then random patches of the remaining
        contrasts (argsort of uniform noise) up to the count. Noise drawn on CPU with ``generator``."""
        pad = tokens.pad.cpu()
        cidx = tokens.index[..., 0].cpu()
        B, N = pad.shape
        M = self.num_contrasts
        L = (~pad).sum(1)
        n_keep = mae_keep_count(L, ratio)
        n_hide = L - n_keep
        counts = torch.zeros(B, M, dtype=torch.long).scatter_add_(1, cidx, (~pad).long())  # tokens per contrast
        present = counts > 0
        P = present.sum(1)
        per = counts.max(1).values.clamp_min(1)  # tokens of one contrast (all present ones have the grid)
        k_max = torch.minimum(P - 1, n_hide // per).clamp_min(0)
        u = cpu_uniform(B, generator=generator)
        whole = cpu_uniform(B, generator=generator) < self.whole_contrast_p
        k = torch.where(whole & (k_max > 0), 1 + (u * k_max.double()).floor().long().clamp_max(k_max - 1), 0)
        crank = noise_ranks(cpu_uniform(B, M, generator=generator), ~present)
        hide_c = crank < k[:, None]  # [B, M] the contrasts hidden whole
        noise = cpu_uniform(B, N, generator=generator)
        # the whole contrasts' tokens sort after every random patch (1.5), padding after those (2.0)
        noise = torch.where(torch.gather(hide_c, 1, cidx), 1.5, noise)
        rank = noise_ranks(noise, pad)
        hidden = (rank >= n_keep[:, None]) & ~pad
        return hidden.to(tokens.pad.device)

    # -- views ----------------------------------------------------------------------------------------
    def _augment(self, vol: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Random flips, per-contrast intensity scale/shift (head voxels only), zero-filled translation,
        each drawn per case from torch's global RNG. vol [B, M, D, H, W]."""
        v = self.view_cfg
        B, M = vol.shape[:2]
        out = vol.clone()
        head = out != 0
        lo, hi = float_pair(v["scale"])
        scale = torch.empty(B, M, 1, 1, 1, device=vol.device).uniform_(lo, hi)
        lo, hi = float_pair(v["shift"])
        shift = torch.empty(B, M, 1, 1, 1, device=vol.device).uniform_(lo, hi)
        out = torch.where(head, out * scale + shift, out)
        for b in range(B):
            dims = [1 + a for a in range(3) if float(torch.rand(())) < float(v["flip_p"])]  # of [M, D, H, W]
            if dims:
                out[b] = out[b].flip(dims)
            t = float(v["translate"])
            if t > 0:
                shifts = [int(torch.randint(-int(t * n), int(t * n) + 1, ())) for n in out.shape[2:]]
                out[b] = _shift_zero(out[b], shifts)
        return out * present[:, :, None, None, None].to(out.dtype)

    def _local_side(self, side: int) -> int:
        return local_view_side(side, self.patch_size, self.view_cfg["local_size"])

    def views(self, batch: Batch, n_global: int, n_local: int) -> list[Batch]:
        """``n_global`` augmented views at the batch's size, then ``n_local`` random sub-cubes (a
        ``local_scale`` fraction of the side) resized to ``local_size``, augmented the same way. Presence
        is kept. Draws from torch's global RNG: seed it for reproducible views."""
        vol, present, _ = self._check(batch)
        rest = {k: t for k, t in batch.items() if k not in ("mri", "mri_present")}
        out = []
        side = min(vol.shape[2:])
        for i in range(n_global + n_local):
            if i < n_global:
                v = vol
            else:
                lo, hi = float_pair(self.view_cfg["local_scale"])
                s = self._local_side(side)
                crops = []
                for b in range(vol.shape[0]):
                    c = max(1, int(side * float(torch.empty(()).uniform_(lo, hi))))
                    o = [int(torch.randint(n - c + 1, ())) for n in vol.shape[2:]]
                    cube = vol[b, :, o[0]:o[0] + c, o[1]:o[1] + c, o[2]:o[2] + c]
                    crops.append(F.interpolate(cube[None].float(), size=(s, s, s), mode="trilinear",
                                               align_corners=False)[0])
                v = torch.stack(crops)
            out.append({**rest, "mri": self._augment(v.float(), present), "mri_present": present.clone()})
        return out

    # -- features -------------------------------------------------------------------------------------
    @property
    def unit_features_id(self) -> str:  # type: ignore[override]
        return f"patch-intensity-stats:mean,std,q10,q50,q90,max,head-fraction,p{self.patch_size}"

    def unit_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's intensity statistics (``intensity_statistics`` of its patch's voxels), [B, N, 7],
        in ``tokenize``'s order: present contrasts' tokens first, padding (0) after them."""
        vol, present, grid = self._check(batch)
        B, M = vol.shape[:2]
        G = grid[0] * grid[1] * grid[2]
        t = patchify3d(vol.float(), self.patch_size).reshape(B, M * G, self.target_dim)
        pad = (~present).repeat_interleave(G, dim=1)
        order = self._order(present, G)
        if order is not None:
            t = torch.gather(t, 1, order[..., None].expand(-1, -1, t.shape[-1]))
            pad = torch.gather(pad, 1, order)
        return intensity_statistics(t) * (~pad)[..., None], pad

    def baseline_features(self, batch: Batch) -> torch.Tensor:
        """Intensity histograms of each present contrast's head voxels (16 bins over z-scores -3..5,
        fractions), absent contrasts a constant 0, then the M presence bits: [B, M * 16 + M]."""
        vol, present, _ = self._check(batch)
        B, M = vol.shape[:2]
        v = vol.float().reshape(B, M, -1)
        head = v != 0
        lo, hi = HIST_RANGE
        bins = ((v - lo) / (hi - lo) * HIST_BINS).floor().clamp(0, HIST_BINS - 1).long()
        hist = torch.zeros(B, M, HIST_BINS, device=v.device).scatter_add_(2, bins, head.float())
        hist = hist / head.sum(-1, keepdim=True).clamp_min(1)
        hist = hist * present[..., None].float()
        return torch.cat([hist.reshape(B, -1), present.float()], 1)

    # -- probing each contrast alone -------------------------------------------------------------------
    def probe_variants(self) -> dict[str, Callable[[Batch], tuple[Batch, torch.Tensor]]]:
        """``all``: every case as it is; ``<contrast>``: only that contrast of each case (the other
        slots marked absent and zeroed), keeping the cases that have it. The linear probe reports each."""
        out: dict[str, Callable[[Batch], tuple[Batch, torch.Tensor]]] = {}

        def everything(batch: Batch) -> tuple[Batch, torch.Tensor]:
            return batch, torch.ones(batch["mri"].shape[0], dtype=torch.bool, device=batch["mri"].device)

        out["all"] = everything
        for m, name in enumerate(self.contrasts):
            def alone(batch: Batch, m: int = m) -> tuple[Batch, torch.Tensor]:
                vol, present, _ = self._check(batch)
                only = torch.zeros_like(present)
                only[:, m] = True
                keep = present[:, m].clone()
                # a case without the contrast keeps one "present" slot so the batch stays valid; dropped
                new_present = torch.where(keep[:, None], only, present)
                new = dict(batch, mri=vol * new_present[:, :, None, None, None].to(vol.dtype), mri_present=new_present)
                return new, keep
            out[name] = alone
        return out

    def preprocessing(self) -> dict[str, Any]:
        return {"contrasts": list(self.contrasts), "volume_size": self.volume_size, "patch_size": self.patch_size,
                "max_len": self.volume_size, "position": self.position, "norm_pix": self.norm_pix,
                "normalisation": "z-score per contrast within the head mask, 0 outside"}


def _shift_zero(x: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """Translate [C, D, H, W] by ``shifts`` voxels along D, H, W, filling with zeros."""
    out = torch.zeros_like(x)
    src, dst = [slice(None)], [slice(None)]
    for s, n in zip(shifts, x.shape[1:]):
        if s >= 0:
            src.append(slice(0, n - s))
            dst.append(slice(s, n))
        else:
            src.append(slice(-s, n))
            dst.append(slice(0, n + s))
    out[tuple(dst)] = x[tuple(src)]
    return out


MRIAdapter.codec = MRICodec()
