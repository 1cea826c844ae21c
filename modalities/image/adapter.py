"""Image adapter: images [B, 3, H, W] in [0, 1] -> non-overlapping patch tokens (ViT / MAE).

The patch embedding is timm's ``PatchEmbed`` layout (``Conv2d(3, D, p, stride=p)``), so timm ViT weights
map onto it one to one (mmssl/convert/timm.py). The CLS token, when there is one, is the Encoder's
prefix, not the adapter's."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from mmssl.modalities.base import ModalityAdapter, local_view_side
from mmssl.modalities.common import (
    float_pair,
    masked_mse,
    normalise_patches,
    random_token_mask,
    sincos_grid,
    view_config,
)
from torch import nn
from torchvision.transforms import v2

from mmssl.registry import MODALITIES
from mmssl.types import Batch, Tokens

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: defaults of ``adapter.views`` (DINO's multi-crop recipe, configurable in the modality yaml)
VIEW_DEFAULTS: dict[str, Any] = {
    "global_scale": (0.4, 1.0),
    "local_scale": (0.05, 0.4),
    "local_size": None,  # default: half the batch's side, rounded down to the patch (at least one patch)
    "ratio": (3 / 4, 4 / 3),
    "interpolation": "bicubic",
    "flip_p": 0.5,
    "jitter_p": 0.8,
    "jitter": (0.4, 0.4, 0.2, 0.1),  # brightness, contrast, saturation, hue
    "grayscale_p": 0.2,
    "blur_p": 0.0,
    "solarize_p": 0.0,
}


def sincos_2d(rows: int, cols: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """MAE's fixed 2D sin-cos position embedding (``get_2d_sincos_pos_embed``) for any grid.

    -> [rows * cols, dim], row-major. As in MAE, the first half of the channels encodes the column
    (MAE's ``meshgrid(grid_w, grid_h)`` puts w first) and the second half the row; each half is
    ``[sin(pos * omega), cos(pos * omega)]`` with omega = 1 / 10000^(k / (dim / 4))."""
    if dim % 4:  # MAE's table has no spare channels
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, not {dim}")
    return sincos_grid((rows, cols), dim, device)


def resize_pos(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """A learned grid of positions [1, old_h * old_w, D] -> [1, new_h * new_w, D], bicubic with
    antialiasing in fp32 (timm's ``resample_abs_pos_embed``), so timm weights see the same positions."""
    if old == new:
        return pos
    D = pos.shape[-1]
    grid = pos.float().reshape(1, old[0], old[1], D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(pos.dtype)


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's patchify: [B, 3, H, W] -> [B, (H/p)(W/p), p*p*3], each patch ordered (row in patch, column
    in patch, channel): ``nchpwq -> nhwpqc``."""
    B, C, H, W = img.shape
    h, w = H // p, W // p
    x = img.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


#: orientation bins of the ``histogram`` unit feature (unsigned gradients, 0..180 degrees)
ORIENTATION_BINS = 8


def colour_gradient_histogram(img: torch.Tensor, p: int, bins: int = ORIENTATION_BINS) -> torch.Tensor:
    """img [B, 3, H, W] in [0, 1] -> [B, (H/p)(W/p), 3 + bins + 1] per patch: mean colour, a
    magnitude-weighted histogram of unsigned gradient orientations (L1-normalised; zero for a flat
    patch) and log(1e-3 + mean gradient magnitude). Gradients are central differences of the grey image
    (replicated border), so every pixel has one; a patch's border pixels read their neighbours'."""
    grey = img.mean(1, keepdim=True)
    g = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = (g[..., 1:-1, 2:] - g[..., 1:-1, :-2]) / 2
    gy = (g[..., 2:, 1:-1] - g[..., :-2, 1:-1]) / 2
    mag = (gx ** 2 + gy ** 2).sqrt()
    ang = torch.atan2(gy, gx) % torch.pi  # unsigned: [0, pi)
    b = (ang / torch.pi * bins).long().clamp_max(bins - 1)  # [B, 1, H, W]
    onehot = F.one_hot(b[:, 0], bins).permute(0, 3, 1, 2).float() * mag  # [B, bins, H, W]
    hist = F.avg_pool2d(onehot, p).flatten(2).transpose(1, 2)  # [B, N, bins] mean per patch
    hist = hist / hist.sum(-1, keepdim=True).clamp_min(1e-8)
    colour = F.avg_pool2d(img, p).flatten(2).transpose(1, 2)  # [B, N, 3]
    strength = torch.log(1e-3 + F.avg_pool2d(mag, p).flatten(2).transpose(1, 2))  # [B, N, 1]
    return torch.cat([colour, hist, strength], -1)


def _unit_range(img: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] uint8 -> float in [0, 1]; float images pass unchanged."""
    return img if img.is_floating_point() else img.float() / 255.0


@MODALITIES.register("image")
class ImageAdapter(ModalityAdapter):
    """Batch keys: ``image`` [B, 3, H, W] float in [0, 1] (uint8 is accepted and divided by 255), H and W
    divisible by ``patch_size`` and shared by the whole batch; ``label`` [B] passes through views.

    cfg (the modality yaml's ``adapter:``): patch_size, image_size (the grid learned positions are
    stored for), position (learned | sincos), mean, std (per-channel input normalisation),
    norm_pix (MAE's per-patch target normalisation), views (see ``VIEW_DEFAULTS``)."""

    name = "image"
    kind = "image"

    def __init__(self, dim: int, cfg: dict[str, Any] | None = None) -> None:
        super().__init__(dim, cfg)
        c = self.cfg
        self.patch_size = p = int(c.get("patch_size", 16))
        self.image_size = int(c.get("image_size", 224))
        if self.image_size % p:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {p}")
        self.grid = (self.image_size // p, self.image_size // p)
        self.position = str(c.get("position", "learned"))
        self.norm_pix = bool(c.get("norm_pix", True))
        self.mean_values = [float(v) for v in c.get("mean", IMAGENET_MEAN)]
        self.std_values = [float(v) for v in c.get("std", IMAGENET_STD)]
        if len(self.mean_values) != 3 or len(self.std_values) != 3:
            raise ValueError("image mean and std need 3 values (R, G, B)")
        # Constants from the config, not weights: kept out of the state dict.
        self.register_buffer("mean", torch.tensor(self.mean_values).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.std_values).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = nn.Conv2d(3, dim, p, stride=p)
        # MAE initialises the patch projection like a linear layer (xavier on the flattened kernel).
        nn.init.xavier_uniform_(self.patch_embed.weight.data.view(dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.position == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)  # timm's init
        elif self.position == "sincos":
            # the configured grid's table, kept on the module's device (a constant: not in the state dict)
            self.register_buffer("sincos", sincos_2d(*self.grid, dim)[None], persistent=False)
        else:
            raise ValueError(f"image position must be 'learned' or 'sincos', not {self.position!r}")
        self.view_cfg = view_config("image", VIEW_DEFAULTS, c.get("views"))

    # -- input ----------------------------------------------------------------------------------------
    def _grid_of(self, img: torch.Tensor) -> tuple[int, int]:
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"image batch must be [B, 3, H, W], got {tuple(img.shape)}")
        H, W = img.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        return H // p, W // p

    def _normalised(self, batch: Batch) -> torch.Tensor:
        img = batch["image"]
        self._grid_of(img)
        img = _unit_range(img)
        return (img - self.mean.to(img.dtype)) / self.std.to(img.dtype)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """[1, rows * cols, D] positions for a grid; a function of the grid only, never of content."""
        if self.position == "sincos":
            if (rows, cols) == self.grid:
                return self.sincos
            return sincos_2d(rows, cols, self.dim, self.sincos.device)[None]
        return resize_pos(self.pos_embed, self.grid, (rows, cols))

    # -- tokens ---------------------------------------------------------------------------------------
    def tokenize(self, batch: Batch) -> Tokens:
        img = self._normalised(batch)
        B = img.shape[0]
        rows, cols = self._grid_of(img)
        x = self.patch_embed(img.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        pos = self.positions(rows, cols).to(x.dtype).expand(B, -1, -1)
        ar_r, ar_c = torch.arange(rows, device=x.device), torch.arange(cols, device=x.device)
        r, c = torch.meshgrid(ar_r, ar_c, indexing="ij")
        index = torch.stack([r.reshape(-1), c.reshape(-1)], -1)[None].expand(B, -1, -1)  # [B, N, 2]
        pad = torch.zeros(B, rows * cols, dtype=torch.bool, device=x.device)
        return Tokens(x=x, pos=pos, pad=pad, index=index)

    def num_tokens(self, batch: Batch) -> torch.Tensor:
        img = batch["image"]
        rows, cols = self._grid_of(img)
        return torch.full((img.shape[0],), rows * cols, dtype=torch.long, device=img.device)

    # -- masked modelling -----------------------------------------------------------------------------
    @property
    def target_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    def targets(self, batch: Batch, tokens: Tokens | None = None) -> torch.Tensor:
        """MAE's targets: patchified normalised pixels [B, N, p*p*3]; with ``norm_pix`` each patch is
        normalised by its own mean and (unbiased, as MAE's ``var``) variance, eps 1e-6."""
        t = patchify(self._normalised(batch).float(), self.patch_size)
        return normalise_patches(t) if self.norm_pix else t

    def recon_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MAE's loss: per-token MSE over the last dim, averaged over the tokens where mask is True."""
        return masked_mse(pred, target, mask)

    def make_mask(self, tokens: Tokens, ratio: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """MAE's per-sample random masking: keep ``int(L * (1 - ratio))`` of each sample's L non-padding
        tokens, chosen by argsort of uniform noise (drawn on CPU with ``generator``); hide the rest."""
        return random_token_mask(tokens.pad, ratio, generator)

    # -- views ----------------------------------------------------------------------------------------
    def _local_side(self, side: int) -> int:
        return local_view_side(side, self.patch_size, self.view_cfg["local_size"])

    def _transform(self, size: tuple[int, int], scale: tuple[float, float]) -> v2.Transform:
        v = self.view_cfg
        interp = v2.InterpolationMode(str(v["interpolation"]).lower())
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(size, scale=float_pair(scale), ratio=float_pair(v["ratio"]),
                                 interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(float(v["flip_p"])),
            v2.RandomApply([v2.ColorJitter(*[float(j) for j in v["jitter"]])], p=float(v["jitter_p"])),
            v2.RandomGrayscale(float(v["grayscale_p"])),
        ]
        if float(v["blur_p"]) > 0:
            k = 2 * (max(size) // 20) + 1  # ~10% of the side, odd
            steps.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=float(v["blur_p"])))
        if float(v["solarize_p"]) > 0:
            steps.append(v2.RandomSolarize(0.5, p=float(v["solarize_p"])))
        return v2.Compose(steps)

    def views(self, batch: Batch, n_global: int, n_local: int) -> list[Batch]:
        """Multi-crop views: ``n_global`` at the batch's size (scale ``global_scale``), then ``n_local``
        smaller square ones (``local_size``, scale ``local_scale``), each with flip, colour jitter
        (probability ``jitter_p``), grayscale and the optional blur / solarisation.

        The transforms run once per sample, because a v2 transform on a batched tensor draws one
        random crop for the whole batch. They draw from torch's global RNG (torchvision's transforms
        take no generator): seed it (``torch.manual_seed``) for reproducible views."""
        img = batch["image"]
        H, W = img.shape[-2:]
        self._grid_of(img)
        img = _unit_range(img)
        rest = {k: t for k, t in batch.items() if k != "image"}
        local = self._local_side(min(H, W))
        out = []
        for i in range(n_global + n_local):
            glob = i < n_global
            tf = self._transform((H, W) if glob else (local, local),
                                 self.view_cfg["global_scale" if glob else "local_scale"])
            v = torch.stack([tf(im) for im in img]).clamp_(0.0, 1.0)  # bicubic may overshoot [0, 1]
            out.append({**rest, "image": v})
        return out

    # -- features -------------------------------------------------------------------------------------
    @property
    def unit_features_id(self) -> str:  # type: ignore[override]
        kind = str(self.cfg.get("unit_feature", "pixels"))
        return f"{kind},p{self.patch_size},mean{self.mean_values},std{self.std_values}" + \
            (f",bins{ORIENTATION_BINS}" if kind == "histogram" else "")

    def unit_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One classical feature per patch token, in ``tokenize``'s order (row-major), no padding.

        ``unit_feature: pixels`` (the default): the patch's input-normalised pixels, [B, N, p*p*3]
        (MAE's target without per-patch normalisation, so colour and brightness stay in it).
        ``unit_feature: histogram``: the patch's mean colour (3) and a magnitude-weighted histogram of
        gradient orientations (``ORIENTATION_BINS``, unsigned, central differences on the grey image,
        L1-normalised) with the patch's log mean gradient magnitude: [B, N, 3 + bins + 1]."""
        kind = str(self.cfg.get("unit_feature", "pixels"))
        img = self._normalised(batch).float()
        B = img.shape[0]
        rows, cols = self._grid_of(img)
        pad = torch.zeros(B, rows * cols, dtype=torch.bool, device=img.device)
        if kind == "pixels":
            return patchify(img, self.patch_size), pad
        if kind != "histogram":
            raise ValueError(f"image unit_feature must be 'pixels' or 'histogram', not {kind!r}")
        return colour_gradient_histogram(_unit_range(batch["image"]).float(), self.patch_size), pad

    def baseline_features(self, batch: Batch) -> torch.Tensor:
        """Raw pixels average-pooled to 8 x 8 per channel: [B, 192]."""
        return F.adaptive_avg_pool2d(_unit_range(batch["image"]).float(), 8).flatten(1)

    def preprocessing(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "patch_size": self.patch_size, "mean": self.mean_values,
                "std": self.std_values, "max_len": self.image_size, "position": self.position,
                "value_range": [0.0, 1.0]}


from mmssl.modalities.image.data import ImageCodec

ImageAdapter.codec = ImageCodec()
