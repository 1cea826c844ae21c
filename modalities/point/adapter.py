"""Point cloud adapter (Point-MAE style): clouds [B, P, 3] -> one token per local group of points.

Pipeline per batch, all batched torch (on the GPU when the batch is there):

1. Normalise each cloud: centre on its centroid, scale its farthest point to radius 1 (the
   adapter does it, not the codec, so shards keep the files' coordinates and every view, crop
   or packed file is normalised the same way).
2. Farthest point sampling picks ``num_groups`` centres G, starting from the point farthest from the
   centroid (deterministic, independent of the points' order up to ties).
3. The ``group_size`` k nearest points of each centre (``torch.cdist`` + ``topk``) form a group; its
   coordinates relative to the centre are the group's content.
4. A mini-PointNet embeds each group (Point-MAE's encoder: a shared MLP 3 -> c1 -> c2 per point,
   max-pool, the pooled feature concatenated to every point, MLP 2*c2 -> c3 -> D, max-pool);
   positions are an MLP of the centre (3 -> 128 -> D, GELU).

Padding: points after ``point_len`` never become centres nor neighbours; a cloud with fewer than G
points has fewer tokens (the rest are padding), one with fewer than k points repeats its nearest
neighbour. Group embeddings use LayerNorm where Point-MAE uses BatchNorm: batch statistics would
carry hidden groups' content into visible tokens during training. What stays, as in Point-MAE: the
centroid, the scale and the farthest point order are computed from the whole cloud before masking, and
k-nearest-neighbour groups overlap, so a visible group may hold points near a hidden centre. Positions are the centres, as in
Point-MAE: they reveal where hidden groups are, never what they hold."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.modalities.base import ModalityAdapter
from mmssl.modalities.common import kept_first, random_token_mask, view_config
from mmssl.modalities.point.chamfer import masked_chamfer_l2
from mmssl.registry import MODALITIES
from mmssl.types import Batch, Tokens

#: defaults of ``adapter.views`` (configurable in the modality yaml)
VIEW_DEFAULTS: dict[str, Any] = {
    "rotation": "up",  # up (about the up axis) | so3 (uniformly random) | none
    "up_axis": 2,  # 0, 1 or 2: the axis "up" rotations turn about (z; ModelNet files are y-up: 1)
    "scale": (0.8, 1.25),  # anisotropic scale, per axis
    "jitter_sigma": 0.01,  # Gaussian jitter (in units of the normalised cloud), clipped at jitter_clip
    "jitter_clip": 0.05,
    "dropout_max": 0.5,  # each view drops a random fraction U(0, dropout_max) of its points
    "local_scale": (0.2, 0.5),  # local views: the fraction of points nearest a random seed point
    "cross_scale": (0.6, 1.0),  # cross views (Point-PQAE): each keeps this fraction nearest its own seed
}


def normalise(xyz: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Centre each cloud on its centroid and scale it into the unit ball (over real points only).

    xyz [B, P, 3], valid [B, P] bool -> [B, P, 3], padding set to 0."""
    w = valid[..., None].to(xyz.dtype)
    centre = (xyz * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)
    x = (xyz - centre) * w
    radius = x.norm(dim=-1).amax(1).clamp_min(1e-8)
    return x / radius[:, None, None]


def frame(xyz: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frame ``normalise`` puts a cloud in: (centroid [B, 3], radius [B]) over real points."""
    w = valid[..., None].to(xyz.dtype)
    centre = (xyz * w).sum(1) / w.sum(1).clamp_min(1.0)
    radius = ((xyz - centre[:, None]) * w).norm(dim=-1).amax(1).clamp_min(1e-8)
    return centre, radius


def farthest_point_sample(xyz: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Batched farthest point sampling. xyz [B, P, 3] (normalised: centred), valid [B, P] bool ->
    [B, n] int64 indices of real points. The first is the point farthest from the origin (the
    centroid); each next one the real point farthest from those chosen. A cloud with fewer than
    ``n`` real points repeats its first real point once every point is taken (padded tokens)."""
    B, P, _ = xyz.shape
    x = xyz.float()
    neg = torch.tensor(-1.0, device=x.device)
    idx = torch.zeros(B, n, dtype=torch.long, device=x.device)
    # squared distance of every point to the chosen set; padding pinned below any real point
    dist = torch.where(valid, torch.full_like(x[..., 0], float("inf")), neg)
    far = torch.where(valid, x.pow(2).sum(-1), neg).argmax(1)
    rows = torch.arange(B, device=x.device)
    for i in range(n):
        idx[:, i] = far
        d = (x - x[rows, far][:, None]).pow(2).sum(-1)
        dist = torch.where(valid, torch.minimum(dist, d), neg)
        far = dist.argmax(1)
    return idx


def knn_groups(xyz: torch.Tensor, valid: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """The k nearest real points of each centre. xyz [B, P, 3], valid [B, P], centres [B, G, 3] ->
    [B, G, k] int64 indices, nearest first. Fewer than k real points: the nearest one fills the rest."""
    P = xyz.shape[1]
    d = torch.cdist(centres.float(), xyz.float())  # [B, G, P]
    d = d.masked_fill(~valid[:, None, :], float("inf"))
    if P < k:  # topk needs k columns: pad with unreachable ones
        d = torch.cat([d, d.new_full((*d.shape[:2], k - P), float("inf"))], -1)
    dk, idx = d.topk(k, dim=-1, largest=False)
    return torch.where(torch.isinf(dk), idx[..., :1], idx)


def gather_points(xyz: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """xyz [B, P, C], idx [B, ...] -> [B, ..., C]."""
    B, C = xyz.shape[0], xyz.shape[-1]
    flat = idx.reshape(B, -1)
    out = torch.gather(xyz, 1, flat[..., None].expand(-1, -1, C))
    return out.reshape(*idx.shape, C)


def group_shape(local: torch.Tensor, centres: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """A classical local shape descriptor per group, invariant to rotation and to the group's scale.

    local [B, G, k, 3] points relative to their centre, centres [B, G, 3] (in the centred cloud) ->
    [B, G, 5 + bins]: linearity (l1 - l2) / l1, planarity (l2 - l3) / l1 and scattering l3 / l1 of the
    covariance eigenvalues l1 >= l2 >= l3 (Demantke et al., 2011); the histogram of the points'
    distances to the centre over [0, max] (``bins``, fractions); the group mean's offset from the
    centre over the group radius (large at edges); and |n . c / |c||, how much the surface normal n
    (the least-variance axis) faces away from the cloud's centroid."""
    x = local.float()
    dev = x - x.mean(-2, keepdim=True)
    cov = dev.transpose(-1, -2) @ dev / x.shape[-2]  # [B, G, 3, 3]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    l3, l2, l1 = evals.clamp_min(0).unbind(-1)
    l1 = l1.clamp_min(1e-12)
    ratios = torch.stack([(l1 - l2) / l1, (l2 - l3) / l1, l3 / l1], -1)
    d = x.norm(dim=-1)  # [B, G, k]
    r = d.amax(-1, keepdim=True).clamp_min(1e-8)
    b = (d / r * bins).long().clamp_max(bins - 1)
    hist = F.one_hot(b, bins).float().mean(-2)  # [B, G, bins]
    offset = x.mean(-2).norm(dim=-1, keepdim=True) / r
    normal = evecs[..., 0]  # [B, G, 3] the least-variance direction
    facing = (normal * F.normalize(centres.float(), dim=-1, eps=1e-8)).sum(-1, keepdim=True).abs()
    return torch.cat([ratios, hist, offset, facing], -1)


class MiniPointNet(nn.Module):
    """Point-MAE's group encoder: [..., k, 3] local points -> [..., D].

    Shared per-point MLP 3 -> c1 -> c2, max over the group, that global feature concatenated to each
    point's, MLP 2*c2 -> c3 -> D, max over the group. Every layer acts per point or per group, so no
    group's content reaches another's embedding."""

    def __init__(self, dim: int, channels: tuple[int, int, int] = (128, 256, 512)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.first = nn.Sequential(nn.Linear(3, c1), nn.LayerNorm(c1), nn.ReLU(), nn.Linear(c1, c2))
        self.second = nn.Sequential(nn.Linear(2 * c2, c3), nn.LayerNorm(c3), nn.ReLU(), nn.Linear(c3, dim))

    def forward(self, pts: torch.Tensor) -> torch.Tensor:
        f = self.first(pts)  # [..., k, c2]
        g = f.max(-2, keepdim=True).values  # [..., 1, c2]
        # second[0] on cat([g, f]) without materialising the concatenation: W [g; f] = W_g g + W_f f,
        # with W_g g computed once per group instead of once per point
        lin = self.second[0]
        c2 = f.shape[-1]
        h = F.linear(f, lin.weight[:, c2:], lin.bias) + F.linear(g, lin.weight[:, :c2])
        for layer in self.second[1:]:
            h = layer(h)
        return h.max(-2).values


@MODALITIES.register("point")
class PointAdapter(ModalityAdapter):
    """Batch keys: ``point`` float [B, P, 3] (any coordinates: normalised here), ``point_len`` int64
    [B] (optional: all P points when absent); ``label`` [B] passes through views.

    cfg (the modality yaml's ``adapter:``): num_points (what the codec samples clouds to: the
    preprocessing ``max_len``; the adapter itself reads any count), num_groups G, group_size k,
    pointnet [c1, c2, c3] (the group encoder's widths), pos_hidden (the position MLP's width),
    d2_bins, d2_points (the D2 baseline), views (see ``VIEW_DEFAULTS``)."""

    name = "point"
    kind = "point"

    def __init__(self, dim: int, cfg: dict[str, Any] | None = None) -> None:
        super().__init__(dim, cfg)
        c = self.cfg
        self.num_points = None if c.get("num_points") is None else int(c["num_points"])
        self.num_groups = int(c.get("num_groups", 64))
        self.group_size = int(c.get("group_size", 32))
        if self.num_groups < 1 or self.group_size < 1:
            raise ValueError(f"point num_groups and group_size must be positive, got {self.num_groups}, "
                             f"{self.group_size}")
        channels = tuple(int(v) for v in c.get("pointnet", (128, 256, 512)))
        if len(channels) != 3:
            raise ValueError(f"point pointnet needs 3 widths [c1, c2, c3], got {list(channels)}")
        self.channels = channels
        self.group_embed = MiniPointNet(dim, channels)  # type: ignore[arg-type]
        hidden = int(c.get("pos_hidden", 128))
        self.pos_embed = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.d2_bins = int(c.get("d2_bins", 32))
        self.d2_points = int(c.get("d2_points", 256))
        views = view_config("point", VIEW_DEFAULTS, c.get("views"))
        if views["rotation"] not in ("up", "so3", "none"):
            raise ValueError(f"point views.rotation must be up, so3 or none, not {views['rotation']!r}")
        self.view_cfg = views

    # -- input ----------------------------------------------------------------------------------------
    @staticmethod
    def valid_points(batch: Batch) -> torch.Tensor:
        """[B, P] bool: True for the real points of each cloud."""
        xyz = batch["point"]
        if xyz.dim() != 3 or xyz.shape[-1] != 3:
            raise ValueError(f"point batch must be [B, P, 3], got {tuple(xyz.shape)}")
        B, P, _ = xyz.shape
        lens = batch.get("point_len")
        if lens is None:
            return torch.ones(B, P, dtype=torch.bool, device=xyz.device)
        if bool((lens < 1).any()):
            raise ValueError("every point cloud needs at least one point (point_len >= 1)")
        return torch.arange(P, device=xyz.device)[None] < lens.to(xyz.device)[:, None]

    def group(self, batch: Batch, centres: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (centres [B, G, 3], local [B, G, k, 3] group points relative to their centre, pad [B, G]),
        in the normalised frame. Groups run in farthest-point order; ``pad`` marks the groups of a
        cloud with fewer than G points. ``centres`` given (a previous call's, e.g. ``Tokens.coords``)
        skip farthest-point sampling, the costly part."""
        valid = self.valid_points(batch)
        xyz = normalise(batch["point"].float(), valid)
        G = self.num_groups
        with torch.no_grad():  # indices only: sampling and neighbour search carry no gradient
            if centres is None:
                centres = gather_points(xyz, farthest_point_sample(xyz, valid, G))
            nbr = knn_groups(xyz, valid, centres, self.group_size)
        local = gather_points(xyz, nbr) - centres[:, :, None]
        pad = torch.arange(G, device=xyz.device)[None] >= valid.sum(1, keepdim=True)
        return centres, local, pad

    def embed_groups(self, centres: torch.Tensor, local: torch.Tensor, pad: torch.Tensor) -> Tokens:
        """Groups -> Tokens: x = mini-PointNet(local), pos = MLP(centres), index = group id [B, G, 1],
        coords = the centres [B, G, 3]."""
        w = self.group_embed.first[0].weight
        x = self.group_embed(local.to(w.dtype))
        pos = self.pos_embed(centres.to(w.dtype))
        B, G = pad.shape
        index = torch.arange(G, device=pad.device)[None, :, None].expand(B, -1, -1)
        return Tokens(x=x, pos=pos, pad=pad, index=index, coords=centres)

    # -- tokens ---------------------------------------------------------------------------------------
    def tokenize(self, batch: Batch) -> Tokens:
        return self.embed_groups(*self.group(batch))

    def num_tokens(self, batch: Batch) -> torch.Tensor:
        return self.valid_points(batch).sum(1).clamp_max(self.num_groups)

    # -- masked modelling -----------------------------------------------------------------------------
    @property
    def target_dim(self) -> int:
        return self.group_size * 3

    def targets(self, batch: Batch, tokens: Tokens | None = None) -> torch.Tensor:
        """Each group's points relative to its centre, flattened: [B, G, k*3] (Point-MAE's targets);
        the centres of ``tokens`` (``tokenize(batch)``'s) when given."""
        _, local, _ = self.group(batch, None if tokens is None else tokens.coords)
        return local.flatten(2)

    @property
    def coord_dim(self) -> int:
        return 3

    def recon_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Point-MAE's Chamfer L2 between predicted and true group points, averaged over the groups
        where ``mask`` is True. pred, target [B, N, k*3]; mask [B, N]."""
        return masked_chamfer_l2(pred, target, mask)

    def make_mask(self, tokens: Tokens, ratio: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Point-MAE's random group masking: keep ``int(L * (1 - ratio))`` of each cloud's L real groups,
        chosen by argsort of uniform noise (drawn on CPU with ``generator``); hide the rest."""
        return random_token_mask(tokens.pad, ratio, generator)

    # -- views ----------------------------------------------------------------------------------------
    def _rotations(self, B: int, device: torch.device) -> torch.Tensor:
        """[B, 3, 3] random rotations of the configured kind."""
        kind = self.view_cfg["rotation"]
        if kind == "none":
            return torch.eye(3, device=device).expand(B, 3, 3)
        if kind == "so3":
            q = torch.randn(B, 4, device=device)
            w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
            return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                                2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                                2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], 1).view(B, 3, 3)
        t = torch.rand(B, device=device) * 2 * math.pi
        c, s = t.cos(), t.sin()
        a = int(self.view_cfg["up_axis"])
        i, j = [ax for ax in range(3) if ax != a]
        R = torch.eye(3, device=device).repeat(B, 1, 1)
        R[:, i, i], R[:, i, j], R[:, j, i], R[:, j, j] = c, -s, s, c
        return R

    @staticmethod
    def _compact(xyz: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move each cloud's kept points to the front, in order: -> (xyz [B, P', 3] zero-padded, len [B])."""
        order = kept_first(keep)
        lens = keep.sum(1)
        out = gather_points(xyz, order)[:, :int(lens.max())]
        valid = torch.arange(out.shape[1], device=xyz.device)[None] < lens[:, None]
        return out * valid[..., None], lens

    def views(self, batch: Batch, n_global: int, n_local: int) -> list[Batch]:
        """``n_global`` whole-cloud views, then ``n_local`` local crops (the ``local_scale`` fraction of
        points nearest a random seed point); each with a random rotation, anisotropic scale, clipped
        Gaussian jitter and point dropout, per sample. Views are in the normalised frame. They draw
        from torch's global RNG: seed it (``torch.manual_seed``) for reproducible views."""
        v = self.view_cfg
        valid = self.valid_points(batch)
        base = normalise(batch["point"].float(), valid)
        B, P, _ = base.shape
        dev = base.device
        rest = {k: t for k, t in batch.items() if k not in ("point", "point_len")}
        out = []
        for i in range(n_global + n_local):
            # a local crop: the nearest fraction of points around a random real point
            keep = self._crop(base, valid, v["local_scale"]) if i >= n_global else valid.clone()
            drop = torch.rand(B, 1, device=dev) * float(v["dropout_max"])
            kept = keep & (torch.rand(B, P, device=dev) >= drop)
            # never drop a cloud's last point: keep the first of its kept-before-dropout points
            first = torch.zeros_like(keep).scatter_(1, keep.int().argmax(1, keepdim=True), True) & keep
            keep = kept | (first & ~kept.any(1, keepdim=True))
            lo, hi = (float(s) for s in v["scale"])
            scale = lo + (hi - lo) * torch.rand(B, 1, 3, device=dev)
            x = torch.einsum("bpi,bji->bpj", base * scale, self._rotations(B, dev))
            sigma, clip = float(v["jitter_sigma"]), float(v["jitter_clip"])
            x = x + (sigma * torch.randn_like(x)).clamp(-clip, clip)
            x, lens = self._compact(x, keep)
            out.append({**rest, "point": x, "point_len": lens})
        return out

    def _crop(self, xyz: torch.Tensor, valid: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
        """[B, P] bool: a random fraction U(scale) of each cloud's real points, those nearest a random
        real seed point."""
        B, P, _ = xyz.shape
        dev = xyz.device
        lo, hi = (float(v) for v in scale)
        frac = lo + (hi - lo) * torch.rand(B, device=dev)
        seed = (torch.rand(B, P, device=dev) * valid).argmax(1)
        d = (xyz - xyz[torch.arange(B, device=dev), seed][:, None]).norm(dim=-1).masked_fill(~valid, float("inf"))
        rank = torch.argsort(torch.argsort(d, 1), 1)
        n = (frac * valid.sum(1)).ceil().clamp_min(1)
        return valid & (rank < n[:, None])

    def cross_views(self, batch: Batch) -> tuple[Batch, Batch]:
        """Point-PQAE's decoupled views: one random rotation and anisotropic scale per cloud, shared by
        both views, then two crops (``views.cross_scale`` of the points nearest each view's own seed
        point) with their own jitter. The views keep the shared frame; ``tokenize`` normalises each
        into its own unit ball, which is what decouples them. Torch's global RNG (seed it)."""
        v = self.view_cfg
        valid = self.valid_points(batch)
        base = normalise(batch["point"].float(), valid)
        B, _, _ = base.shape
        dev = base.device
        lo, hi = (float(s) for s in v["scale"])
        scale = lo + (hi - lo) * torch.rand(B, 1, 3, device=dev)
        x = torch.einsum("bpi,bji->bpj", base * scale, self._rotations(B, dev))
        rest = {k: t for k, t in batch.items() if k not in ("point", "point_len")}
        out = []
        for _ in range(2):
            keep = self._crop(x, valid, v["cross_scale"])
            sigma, clip = float(v["jitter_sigma"]), float(v["jitter_clip"])
            xv = x + (sigma * torch.randn_like(x)).clamp(-clip, clip)
            xv, lens = self._compact(xv, keep)
            out.append({**rest, "point": xv, "point_len": lens})
        return out[0], out[1]

    def relative_position(self, source: Batch, target: Batch, target_tokens: Tokens) -> torch.Tensor:
        """Each target group centre in the source view's normalised frame, and the log ratio of the two
        views' radii (the scale the target's groups are given in): [B, G_t, 4]."""
        if target_tokens.coords is None:
            raise ValueError("relative_position needs tokenize(target)'s tokens (their coords are the centres)")
        cs, rs = frame(source["point"].float(), self.valid_points(source))
        ct, rt = frame(target["point"].float(), self.valid_points(target))
        shared = target_tokens.coords.float() * rt[:, None, None] + ct[:, None]  # back to the shared frame
        where = (shared - cs[:, None]) / rs[:, None, None]
        ratio = (rt / rs).log()[:, None, None].expand(-1, where.shape[1], 1)
        return torch.cat([where, ratio], -1)

    @property
    def relative_dim(self) -> int:
        return 4

    # -- features -------------------------------------------------------------------------------------
    #: identifies what unit_features computes, so cached unit targets are rebuilt when it changes
    unit_features_id = "group-shape:eigen-ratios,radial-hist4,offset,normal-facing"

    def unit_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group token's local shape descriptor (``group_shape``), [B, G, 9], in ``tokenize``'s
        order and padding (farthest point sampling is deterministic, so the groups are the tokens')."""
        centres, local, pad = self.group(batch)
        return group_shape(local, centres) * (~pad)[..., None], pad

    def baseline_features(self, batch: Batch) -> torch.Tensor:
        """The D2 shape distribution (Osada et al., 2002) plus the normalised cloud's sorted principal
        extents: [B, d2_bins + 3].

        D2: the histogram of distances between pairs of points (up to ``d2_points`` real points of each
        cloud, all pairs), over [0, 2] (the diameter of the unit ball the cloud is scaled into),
        normalised to sum to 1. Extents: the square roots of the covariance eigenvalues, descending.
        Both are invariant to rotation, position and scale. The subset is a fixed shuffle of each
        cloud's real points (the same for every call), so a file's point order cannot bias it."""
        valid = self.valid_points(batch)
        xyz = normalise(batch["point"].float(), valid)
        B, P, _ = xyz.shape
        # a fixed random subset of each cloud's real points: a shuffle seeded once, real points first
        perm = torch.randperm(P, generator=torch.Generator().manual_seed(0)).to(xyz.device)
        order = kept_first(valid[:, perm])
        sub = perm[order[:, :min(self.d2_points, P)]]  # [B, m]
        x, ok = gather_points(xyz, sub), torch.gather(valid, 1, sub)
        m = sub.shape[1]
        d = torch.cdist(x, x)
        pair = ok[:, :, None] & ok[:, None, :] & ~torch.eye(m, dtype=torch.bool, device=x.device)
        nb = self.d2_bins
        bins = (d / 2.0 * nb).long().clamp_(0, nb - 1)
        hist = torch.zeros(x.shape[0], nb, device=x.device).scatter_add_(1, bins.flatten(1), pair.flatten(1).float())
        hist = hist / hist.sum(1, keepdim=True).clamp_min(1.0)
        w = valid[..., None].float()
        cov = torch.einsum("bpi,bpj->bij", xyz * w, xyz) / w.sum(1)[:, None].clamp_min(1.0)
        ext = torch.linalg.eigvalsh(cov).clamp_min(0).sqrt().flip(-1)
        return torch.cat([hist, ext], 1)

    def preprocessing(self) -> dict[str, Any]:
        return {"max_len": self.num_points, "num_groups": self.num_groups, "group_size": self.group_size,
                "normalise": "per cloud in the adapter: centroid to 0, farthest point to radius 1",
                "eval_subset": "a fixed random subset of max_len points (codec), not farthest point sampling"}


from mmssl.modalities.point.data import PointCodec

PointAdapter.codec = PointCodec()
