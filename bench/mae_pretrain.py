#!/usr/bin/env python3
"""MAE ViT-B/16 pretraining step: mmssl against a reference built as MAE's ``models_mae.py`` builds it
(eager and compiled).

One run measures, on the same device and the same synthetic batch (256 images of 224 x 224, mask ratio
0.75, normalised-pixel targets, bf16 autocast, AdamW):

  mmssl           mmssl's ``mae`` objective on the image encoder ``model=base`` (timm's
                  vit_base_patch16_224 shape, MAE's 8-block 512-wide decoder), built through the factory
                  as ``mmssl pretrain modality=image objective=mae model=base`` builds it and stepped as
                  mmssl's trainer steps it (autocast forward, backward, clip_grad_norm_, finite check,
                  AdamW fused on CUDA and CPU, the per-step loss and metric sums)
  ref             MAE's MaskedAutoencoderViT written anew on timm ``Block``s and ``PatchEmbed``: fixed 2D
                  sin-cos positions, a CLS token, the encoder on the 25% visible patches (argsort of
                  noise), mask tokens and the ids_restore unshuffle, 8 decoder blocks of width 512 with
                  16 heads, norm_pix MSE on the removed patches; the step as MAE's main_pretrain /
                  engine_pretrain takes it (per-iteration lr, autocast, ``loss.item()`` finite check,
                  backward, the loss scaler's gradient norm, default (foreach) AdamW betas (0.9, 0.95),
                  weight decay 0.05, ``torch.cuda.synchronize()``). MAE runs fp16 with a GradScaler; in
                  bf16 there is no scaler.
  ref_compiled    the same reference under ``torch.compile``
  mmssl_compiled  mmssl under ``torch.compile``

and reports step time, images per second, model FLOPs per step (forward + backward, counted with
``FlopCounterMode`` on each side's own model), achieved TFLOP/s, MFU against a bf16 matmul peak
measured in the same run (and against the data-sheet peak), peak memory and the mmssl / reference ratios.

Before timing, a correctness check copies the reference's weights into mmssl (the encoder through
``mmssl.convert.timm``, the decoder by name), feeds both the same images and the same mask, and
compares the losses in fp32 (relative difference < 1e-3).

    python bench/mae_pretrain.py --device cuda --out results.json   # the benchmark (H100)
    python bench/mae_pretrain.py --device cpu --smoke               # a < 30 s CPU smoke run
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from functools import cache, partial
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py, however this file is run
from common import (
    add_run_args,
    autocast,
    count_flops,
    exact_fp32,
    finish_run_args,
    free,
    measure_peak,
    rel_diff,
    spec_peak,
    start,
    sync,
    time_steps,
    use_source_tree,
    write_json,
)

use_source_tree()

CHECK_TOL = 1e-3
MASK_RATIO = 0.75

# Model shapes. ``base`` is MAE's ViT-B/16 with its 512-wide 8-block decoder (mmssl's model=base);
# ``smoke`` is a tiny stand-in with the same structure, for CPU.
SHAPES: dict[str, dict[str, int]] = {
    "base": {"image": 224, "patch": 16, "dim": 768, "depth": 12, "heads": 12, "ffn_dim": 3072,
             "dec_dim": 512, "dec_depth": 8, "dec_heads": 16},
    "smoke": {"image": 32, "patch": 8, "dim": 64, "depth": 2, "heads": 2, "ffn_dim": 256,
              "dec_dim": 32, "dec_depth": 1, "dec_heads": 2},
}


# ------------------------------------------------------------------------------------------------------
# The reference: MAE's MaskedAutoencoderViT (models_mae.py) on timm blocks
# ------------------------------------------------------------------------------------------------------
def sincos_pos_embed(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """MAE's fixed 2D sin-cos table (util/pos_embed.py): [grid * grid (+ 1), dim], row-major patches;
    the first half of the channels encodes the column (MAE's meshgrid puts w first), the second half
    the row, each as [sin(p * omega), cos(p * omega)] with omega = 1 / 10000^(k / (dim / 4)); the CLS
    row is zeros."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def axis(p: torch.Tensor) -> torch.Tensor:
        ang = p.reshape(-1, 1) * omega[None]
        return torch.cat([ang.sin(), ang.cos()], 1)

    emb = torch.cat([axis(cols), axis(rows)], 1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], 0)
    return emb.float()


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, L, p*p*3] in MAE's order (row in patch, column in patch, channel)."""
    n, _, h, w = imgs.shape
    x = imgs.reshape(n, 3, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * 3)


class MAEReference(nn.Module):
    """MAE's pretraining model, structured as models_mae.MaskedAutoencoderViT: timm PatchEmbed and
    Blocks (qkv bias, LayerNorm eps 1e-6), a CLS token, frozen sin-cos positions in encoder and decoder,
    per-sample random masking by argsort of uniform noise, the decoder over CLS + visible tokens +
    mask tokens unshuffled with ids_restore, and the norm_pix MSE on removed patches."""

    def __init__(self, image: int, patch: int, dim: int, depth: int, heads: int, ffn_dim: int, dec_dim: int,
                 dec_depth: int, dec_heads: int, norm_pix_loss: bool = True) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block, PatchEmbed

        norm = partial(nn.LayerNorm, eps=1e-6)
        mlp_ratio = ffn_dim / dim
        self.patch = patch
        self.patch_embed = PatchEmbed(image, patch, 3, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dec_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, dec_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                            for _ in range(dec_depth))
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)
        self.norm_pix_loss = norm_pix_loss
        self._init_weights()

    def _init_weights(self) -> None:
        grid = math.isqrt(self.patch_embed.num_patches)
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], grid, True)[None])
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, True)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a linear layer, not a conv
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, L, D] -> (visible [N, L_keep, D], mask [N, L] 1 = removed, ids_restore [N, L]); the
        noise is drawn on the device as MAE does, unless given (the equivalence check)."""
        n, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # small noise: kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        visible = torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        rest = torch.cat([x[:, 1:, :], mask_tokens], 1)
        rest = torch.gather(rest, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], rest], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L] per patch
        return (loss * mask).sum() / mask.sum()  # removed patches only

    def forward(self, imgs: torch.Tensor, mask_ratio: float = MASK_RATIO, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def build_reference(shape: str) -> MAEReference:
    s = SHAPES[shape]
    return MAEReference(s["image"], s["patch"], s["dim"], s["depth"], s["heads"], s["ffn_dim"], s["dec_dim"],
                        s["dec_depth"], s["dec_heads"])


def reference_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """MAE's ``optim_factory.add_weight_decay``: no decay on biases and 1-D tensors; frozen ones left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def reference_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The norm MAE's ``NativeScalerWithGradNormCount`` returns when it does not clip (``get_grad_norm_``)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    return torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)


# ------------------------------------------------------------------------------------------------------
# mmssl, built as `mmssl pretrain modality=image objective=mae model=base` builds it
# ------------------------------------------------------------------------------------------------------
@cache
def _composed() -> dict[str, Any]:
    from mmssl.config import compose, to_dict

    cfg = compose(["modality=image", "objective=mae", "model=base"])
    return {"modality": to_dict(cfg.modality["image"]), "model": to_dict(cfg.model),
            "objective": to_dict(cfg.objective), "trainer": to_dict(cfg.trainer)}


def mmssl_configs(shape: str) -> dict[str, Any]:
    """The modality, model, objective and trainer configs (the smoke shape overrides the numbers) and
    the encoder config ``mmssl.factory.encoder_config`` makes of them."""
    from mmssl.factory import encoder_config

    c = copy.deepcopy(_composed())
    if shape != "base":
        s = SHAPES[shape]
        c["model"].update(dim=s["dim"], depth=s["depth"], heads=s["heads"], ffn_dim=s["ffn_dim"])
        c["modality"]["adapter"].update(patch_size=s["patch"], image_size=s["image"])
        c["objective"].update(decoder_dim=s["dec_dim"], decoder_depth=s["dec_depth"], decoder_heads=s["dec_heads"])
    c["encoder"] = encoder_config("image", c["model"]["name"], c["modality"], c["model"], "mae")
    return c


def build_mmssl(shape: str):
    from mmssl.factory import build_encoder, build_objective

    c = mmssl_configs(shape)
    enc = build_encoder(c["encoder"])
    return build_objective("mae", c["objective"], {"image": enc}, {"image": c["modality"]})


def model_settings(ref: MAEReference, obj) -> dict[str, Any]:
    """What each side runs with (so the JSON shows both sides match)."""
    blk = ref.blocks[0]
    enc = obj.encoder
    ad = enc.adapter
    return {
        "reference": {"image": ref.patch_embed.img_size[0], "patch": ref.patch, "dim": ref.cls_token.shape[-1],
                      "depth": len(ref.blocks), "heads": blk.attn.num_heads,
                      "decoder": {"dim": ref.mask_token.shape[-1], "depth": len(ref.decoder_blocks),
                                  "heads": ref.decoder_blocks[0].attn.num_heads},
                      "mask_ratio": MASK_RATIO, "norm_pix_loss": ref.norm_pix_loss, "positions": "fixed sin-cos",
                      "timm_fused_attn": bool(getattr(blk.attn, "fused_attn", False)),
                      "params": sum(p.numel() for p in ref.parameters()),
                      "trainable_params": sum(p.numel() for p in ref.parameters() if p.requires_grad)},
        "mmssl": {"image": ad.image_size, "patch": ad.patch_size, "dim": enc.dim, "depth": enc.depth,
                  "heads": enc.backbone_cfg.heads,
                  "decoder": {"dim": obj.decoder_cfg.dim, "depth": obj.decoder_cfg.depth,
                              "heads": obj.decoder_cfg.heads},
                  "mask_ratio": obj.mask_ratio, "mask_mode": obj.mask_mode, "norm_pix": ad.norm_pix,
                  "positions": ad.position, "num_prefix": 0 if enc.prefix is None else enc.prefix.shape[1],
                  "params": sum(p.numel() for p in obj.parameters()),
                  "trainable_params": sum(p.numel() for p in obj.parameters() if p.requires_grad)},
    }


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------
def make_images(b: int, size: int, device: torch.device, seed: int) -> torch.Tensor:
    """Synthetic images [B, 3, size, size] float32 in [0, 1]: smooth colour fields plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, max(size // 16, 2), max(size // 16, 2), generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    img = img + 0.1 * torch.randn(b, 3, size, size, generator=g)
    return img.clamp(0.0, 1.0).to(device)


def normalise(imgs: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """The input normalisation MAE's data transform applies on the host (``transforms.Normalize``), with
    the mean and std mmssl's image adapter applies on the device."""
    m = torch.tensor(mean, device=imgs.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, 3, 1, 1)
    return (imgs - m) / s


# ------------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------------
def mmssl_step_fn(model, obj, opt, batch, device, bf16: bool, clip: float, lr: float) -> Callable[[], None]:
    """mmssl's trainer step (mmssl/train/trainer.py, accumulate 1), minus data loading and the
    every-``log_every`` logging: lr set, autocast forward, backward, the per-step loss and metric sums,
    clip_grad_norm_, the finite check (a host read), AdamW step."""
    from mmssl.train.distributed import DistInfo, any_true

    single = DistInfo()  # one process: any_true is a plain host read, as in the trainer
    sums: dict[str, torch.Tensor] = {}

    def step() -> None:
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast(device, bf16):
            out = model(batch)
            loss = out.loss
        loss.backward()
        step_loss = loss.detach()
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0) + torch.as_tensor(v, device=device).detach().float()
        norm = torch.nn.utils.clip_grad_norm_(obj.parameters(), clip if clip > 0 else float("inf"))
        if any_true(~torch.isfinite(norm) | ~torch.isfinite(step_loss), single):
            opt.zero_grad(set_to_none=True)
            return
        opt.step()
        opt.zero_grad(set_to_none=True)
        sums["loss"] = sums.get("loss", 0) + step_loss

    return step


def ref_step_fn(model, params, opt, imgs, device, bf16: bool, lr: float) -> Callable[[], None]:
    """MAE's engine_pretrain.train_one_epoch step (accum_iter 1), single process, bf16 autocast instead
    of fp16 + GradScaler."""

    def step() -> None:
        for g in opt.param_groups:  # lr_sched.adjust_learning_rate, every iteration
            g["lr"] = lr
        with autocast(device, bf16):
            loss, _, _ = model(imgs, MASK_RATIO)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"reference loss is {loss_value}")
        loss.backward()  # loss_scaler(...): scale(loss).backward(); bf16 needs no scale
        reference_grad_norm(params)  # the scaler's unscale_ + get_grad_norm_ (clip_grad is None)
        opt.step()
        opt.zero_grad()
        sync(device)  # engine_pretrain: torch.cuda.synchronize() after every step

    return step


def trainer_optimizer(obj, device: torch.device, t: dict[str, Any]) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer exactly as mmssl's Trainer makes it (fused AdamW on CUDA and CPU)."""
    from mmssl.train.trainer import fused_adamw, param_groups

    fused = fused_adamw(device)
    opt = torch.optim.AdamW(param_groups(obj, float(t.get("weight_decay", 0.01))), lr=float(t["lr"]),
                            betas=tuple(t.get("betas", (0.9, 0.98))), eps=float(t.get("eps", 1e-6)), fused=fused)
    return opt, f"AdamW(fused={fused}, betas={tuple(t.get('betas', (0.9, 0.98)))}, wd={t.get('weight_decay')})"


# ------------------------------------------------------------------------------------------------------
# Correctness: the same weights, images and mask give the same loss
# ------------------------------------------------------------------------------------------------------
def _convert_encoder(ref: MAEReference, heads: int):
    """The reference's encoder keys (timm's VisionTransformer names) through mmssl.convert.timm."""
    import mmssl.convert.timm as conv

    sd = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
    width = ref.cls_token.shape[-1]
    saved = conv.HEADS_BY_WIDTH
    if width not in saved:  # the smoke width is no timm preset; heads do not change the weights
        conv.HEADS_BY_WIDTH = {**saved, width: heads}
    try:
        return conv.convert_timm_state_dict(sd)
    finally:
        conv.HEADS_BY_WIDTH = saved


def load_reference_weights(obj, ref: MAEReference, heads: int) -> dict[str, Any]:
    """Copy the reference into mmssl: the encoder through mmssl.convert.timm, the decoder by name. The
    reference's fixed decoder positions become mmssl's ``decoder_pos`` (a linear map of the adapter's
    positions) by least squares in float64; the residual is reported."""
    conv_cfg, enc_sd = _convert_encoder(ref, heads)
    obj.encoder.load_state_dict(enc_sd, strict=True)
    r = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
    dec: dict[str, torch.Tensor] = {
        "decoder_embed.weight": r["decoder_embed.weight"], "decoder_embed.bias": r["decoder_embed.bias"],
        "mask_token": r["mask_token"].reshape(-1),
        "decoder.norm.weight": r["decoder_norm.weight"], "decoder.norm.bias": r["decoder_norm.bias"],
        "decoder_pred.weight": r["decoder_pred.weight"], "decoder_pred.bias": r["decoder_pred.bias"]}
    for i in range(len(ref.decoder_blocks)):
        for a, b in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("norm2", "norm2"),
                     ("mlp.fc1", "ffn.fc1"), ("mlp.fc2", "ffn.fc2")):
            for p in ("weight", "bias"):
                dec[f"decoder.blocks.{i}.{b}.{p}"] = r[f"decoder_blocks.{i}.{a}.{p}"]
    ad = obj.encoder.adapter
    g = ad.grid
    with torch.no_grad():
        enc_pos = ad.positions(*g)[0].double().cpu()  # [L, D], what mmssl adds and hands the decoder
        want = r["decoder_pos_embed"][0, 1:].double()  # [L, E]; the CLS row is zeros, as mmssl's prefix gets none
        # rank-deficient (27 of 768 for a 14 x 14 grid): an SVD solver; gelsy, the default, fails here
        sol = torch.linalg.lstsq(enc_pos, want, driver="gelsd").solution  # [D, E]
        dec["decoder_pos.weight"] = sol.T.float()
        pos_resid = float((enc_pos @ sol - want).abs().max())
    own = obj.state_dict()
    missing = [k for k in own if not k.startswith("towers.") and k not in dec]
    if missing:
        raise ValueError(f"mmssl decoder keys the bench does not fill: {missing}")
    for k, v in dec.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: mmssl shape {tuple(own[k].shape)} vs reference {tuple(v.shape)}")
    obj.load_state_dict({**own, **dec}, strict=True)
    return {"encoder_positions_rel_diff": rel_diff(enc_pos.float(), r["pos_embed"][0, 1:]),
            "decoder_pos_lstsq_max_abs_residual": pos_resid,
            "converter_config": {"backbone": conv_cfg["backbone"], "pool": conv_cfg["pool"],
                                 "num_prefix": conv_cfg["num_prefix"]}}


def equivalence_check(shape: str, device: torch.device, b: int, seed: int) -> dict[str, Any]:
    """Reference weights into mmssl, then the loss, the predictions on removed patches and a few
    gradients compared in fp32 (TF32 off) for the same normalised images and the same mask."""
    try:
        import mmssl.convert.timm
    except ImportError as e:
        return {"status": "skipped", "reason": f"mmssl.convert.timm is missing ({e}): no weight converter"}
    try:
        import mmssl.modalities.image.adapter  # noqa: F401
    except ImportError as e:
        return {"status": "skipped", "reason": f"mmssl.modalities.image.adapter is missing ({e}): no image adapter"}

    torch.manual_seed(seed)
    s = SHAPES[shape]
    ref = build_reference(shape)
    obj = build_mmssl(shape)
    info = load_reference_weights(obj, ref, s["heads"])
    ref, obj = ref.to(device).eval(), obj.to(device).eval()
    ad = obj.encoder.adapter
    imgs = make_images(b, s["image"], device, seed + 1)
    n = (s["image"] // s["patch"]) ** 2
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(seed + 2)).to(device)
    captured: dict[str, torch.Tensor] = {}
    hook = obj.decoder_pred.register_forward_hook(lambda m, i, o: captured.update(pred=o))
    try:
        with exact_fp32():
            ref.zero_grad(set_to_none=True)
            obj.zero_grad(set_to_none=True)
            loss_ref, pred_ref, mask = ref(normalise(imgs, ad.mean_values, ad.std_values), MASK_RATIO, noise=noise)
            hidden = mask.bool()
            # mmssl draws its own mask through the adapter: hand it the reference's
            ad.make_mask = lambda tokens, ratio, generator=None, _m=hidden: _m
            out = obj({"image": imgs})
            loss_ref.backward()
            out.loss.backward()
    finally:
        hook.remove()
        ad.__dict__.pop("make_mask", None)
    pred_mm = captured["pred"]
    # mmssl's head runs on every token, or (head_on_hidden) on the hidden ones only, [1, M, P] in the
    # row-major order boolean indexing gives, the order of pred_ref[hidden]
    pred_mm = pred_mm[hidden] if pred_mm.shape[:2] == hidden.shape else pred_mm.reshape(-1, pred_mm.shape[-1])
    lr_, lm = float(loss_ref.detach()), float(out.loss.detach())
    enc = obj.encoder
    grads = {"patch_embed.weight": rel_diff(ad.patch_embed.weight.grad, ref.patch_embed.proj.weight.grad),
             "blocks.0.attn.qkv.weight": rel_diff(enc.backbone.blocks[0].attn.qkv.weight.grad,
                                                  ref.blocks[0].attn.qkv.weight.grad),
             "cls_token": rel_diff(enc.prefix.grad, ref.cls_token.grad),
             "decoder_pred.weight": rel_diff(obj.decoder_pred.weight.grad, ref.decoder_pred.weight.grad),
             "mask_token": rel_diff(obj.mask_token.grad, ref.mask_token.grad.reshape(-1))}
    r = {"status": "passed", "tolerance": CHECK_TOL, "batch": b, "image": s["image"], "patches": n,
         "removed_patches": int(hidden.sum()), "mask_fraction": float(hidden.float().mean()),
         "loss_ref": lr_, "loss_mmssl": lm, "loss_rel_diff": abs(lm - lr_) / abs(lr_),
         "pred_removed_max_abs_diff": float((pred_mm - pred_ref[hidden]).abs().max().detach()),
         "pred_removed_rel_diff": rel_diff(pred_mm, pred_ref[hidden]),
         "grad_rel_diff": grads, **info}
    if not r["loss_rel_diff"] < CHECK_TOL:
        r["status"] = "failed"
    del ref, obj
    return r


# ------------------------------------------------------------------------------------------------------
# Sides
# ------------------------------------------------------------------------------------------------------
def flop_context(device: torch.device):
    """On CPU, attention through the math backend: FlopCounterMode has no formula for the CPU flash
    kernel and would count no attention at all (on CUDA the flash / efficient kernels are counted)."""
    if device.type != "cpu":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def run_side(name: str, args, device: torch.device) -> dict[str, Any]:
    bf16 = args.precision == "bf16"
    torch.manual_seed(args.seed)
    s = SHAPES[args.shape]
    imgs = make_images(args.batch, s["image"], device, args.seed)
    compiled = name.endswith("_compiled")
    if compiled:
        torch._dynamo.reset()
    info: dict[str, Any] = {"compiled": compiled}
    if name.startswith("mmssl"):
        c = mmssl_configs(args.shape)
        t = c["trainer"]
        obj = build_mmssl(args.shape).to(device).train()
        opt, info["optimizer"] = trainer_optimizer(obj, device, t)
        clip = float(t.get("clip_grad", 0.0))
        info["clip_grad"] = clip
        batch = {"image": imgs}
        model = torch.compile(obj) if compiled else obj
        step = mmssl_step_fn(model, obj, opt, batch, device, bf16, clip, float(t["lr"]))

        def fwd_bwd() -> None:
            with autocast(device, bf16):
                loss = obj(batch).loss
            loss.backward()
            obj.zero_grad(set_to_none=True)
    else:
        ref = build_reference(args.shape).to(device).train()
        params = [p for p in ref.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(reference_param_groups(ref, 0.05), lr=args.ref_lr, betas=(0.9, 0.95))
        info["optimizer"] = "AdamW(default: foreach on CUDA, betas=(0.9, 0.95), wd=0.05)"
        a = mmssl_configs(args.shape)["encoder"]["adapter"]
        x = normalise(imgs, a["mean"], a["std"])  # as MAE's data loader hands it over: outside the step
        model = torch.compile(ref) if compiled else ref
        step = ref_step_fn(model, params, opt, x, device, bf16, args.ref_lr)

        def fwd_bwd() -> None:
            with autocast(device, bf16):
                loss = ref(x, MASK_RATIO)[0]
            loss.backward()
            ref.zero_grad(set_to_none=True)

    info["flops"] = count_flops(fwd_bwd, flop_context(device))
    warmup = args.warmup + (args.compile_warmup if compiled else 0)
    info.update(time_steps(step, device, warmup, args.steps))
    if compiled:
        info["first_step_s_incl_compile"] = info["warmup_s"][0]
    del step, opt, model
    return info


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------
TARGET = 1.4  # the issue's target: mmssl at least 1.4x the reference's images/s in the same run


def summarise(results: dict[str, Any], images_per_step: int, peak: float | None, spec: float | None) -> None:
    for r in results["sides"].values():
        if "error" in r:
            continue
        t = r["step_s_median"]
        flops = r["flops"]["total"]
        r["images_per_s"] = images_per_step / t
        r["achieved_flops_per_s"] = flops / t
        r["mfu_measured_peak"] = flops / t / peak if peak else None
        r["mfu_spec_peak"] = flops / t / spec if spec else None
    s = results["sides"]

    def ratio(a: str, b: str) -> float | None:
        if a in s and b in s and "images_per_s" in s[a] and "images_per_s" in s[b]:
            return s[a]["images_per_s"] / s[b]["images_per_s"]
        return None

    results["ratios"] = {"mmssl/ref": ratio("mmssl", "ref"), "mmssl_compiled/ref_compiled":
                         ratio("mmssl_compiled", "ref_compiled"), "mmssl_compiled/ref": ratio("mmssl_compiled", "ref"),
                         "mmssl/ref_compiled": ratio("mmssl", "ref_compiled"),
                         "ref_compiled/ref": ratio("ref_compiled", "ref"),
                         "mmssl_compiled/mmssl": ratio("mmssl_compiled", "mmssl")}
    r = results["ratios"]
    # The issue's figure (3,200 images/s at ~25% MFU) is the eager reference: both mmssl sides against it.
    results["target_1p4x_vs_ref"] = None if r["mmssl/ref"] is None else bool(r["mmssl/ref"] >= TARGET)
    results["target_1p4x_vs_ref_by_mmssl_compiled"] = (None if r["mmssl_compiled/ref"] is None
                                                        else bool(r["mmssl_compiled/ref"] >= TARGET))


def markdown(results: dict[str, Any]) -> str:
    a = results["settings"]
    lines = [(f"MAE pretraining step: {a['shape']} shape, batch {a['batch']} x {a['image']}x{a['image']}, mask ratio "
              f"{MASK_RATIO}, {a['precision']}, device {results['env']['device_name']}"),
             "",
             ("| side | step (ms, median) | images / s | GFLOP / step | TFLOP/s | MFU (measured peak) | "
              "peak mem (GiB) | vs ref eager |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref_ips = (results["sides"].get("ref") or {}).get("images_per_s")
    for name, r in results["sides"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | | | | |")
            continue
        mem = f"{r['peak_mem_bytes'] / 2**30:.2f}" if "peak_mem_bytes" in r else "n/a"
        mfu = f"{100 * r['mfu_measured_peak']:.1f}%" if r.get("mfu_measured_peak") is not None else "n/a"
        rel = f"{r['images_per_s'] / ref_ips:.2f}x" if ref_ips else "n/a"
        lines.append(f"| {name} | {1e3 * r['step_s_median']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['flops']['total'] / 1e9:.4g} | {r['achieved_flops_per_s'] / 1e12:.3g} | {mfu} | {mem} | {rel} |")
    p = results.get("peak") or {}
    if p:
        lines += ["", f"bf16 matmul peak (measured, {p['matmul_n']}^3): {p['flops_per_s'] / 1e12:.4g} TFLOP/s"]
    if results.get("spec_peak_flops_per_s"):
        lines.append("MFU against the data-sheet dense bf16 peak ("
                     f"{results['spec_peak_flops_per_s'] / 1e12:.0f} TFLOP/s): " + ", ".join(
                         f"{n} {100 * r['mfu_spec_peak']:.1f}%" for n, r in results["sides"].items()
                         if r.get("mfu_spec_peak") is not None))
    rs = {k: v for k, v in results.get("ratios", {}).items() if v is not None}
    if rs:
        lines.append("ratios (images/s): " + ", ".join(f"{k} = {v:.2f}x" for k, v in rs.items()))
    if results.get("target_1p4x_vs_ref") is not None:
        lines.append(f"target mmssl >= {TARGET}x ref (eager): {'MET' if results['target_1p4x_vs_ref'] else 'NOT MET'}"
                     + ("" if results.get("target_1p4x_vs_ref_by_mmssl_compiled") is None else
                        f"; mmssl_compiled >= {TARGET}x ref: "
                        f"{'MET' if results['target_1p4x_vs_ref_by_mmssl_compiled'] else 'NOT MET'}")
                     + (" (CPU / smoke timings: not a performance figure)"
                        if a["shape"] == "smoke" or a["device"] != "cuda" else ""))
    c = results.get("check", {})
    if c.get("status") == "skipped":
        lines.append(f"loss equivalence: SKIPPED ({c.get('reason')})")
    elif c.get("status") == "error":
        lines.append(f"loss equivalence: ERROR {c.get('error')}")
    elif c:
        lines.append(f"loss equivalence ({c['batch']} images, {c['removed_patches']} removed patches, fp32): "
                     f"{c['status'].upper()}: loss ref {c['loss_ref']:.6f} vs mmssl {c['loss_mmssl']:.6f} "
                     f"(rel diff {c['loss_rel_diff']:.2e}); predictions on removed patches rel diff "
                     f"{c['pred_removed_rel_diff']:.2e} (max abs {c['pred_removed_max_abs_diff']:.2e}); gradients rel "
                     "diff " + ", ".join(f"{k} {v:.1e}" for k, v in c["grad_rel_diff"].items()) +
                     f"; decoder positions least-squares residual {c['decoder_pos_lstsq_max_abs_residual']:.1e}")
    lines += ["", "command: " + results["command"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true",
                   help="tiny model (2 blocks width 64, 32x32 images, patch 8, decoder 1 block width 32), batch 4, "
                        "1 warm-up + 2 steps, no compile")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256; smoke 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side (default 5; smoke 1)")
    p.add_argument("--compile-warmup", type=int, default=10, help="extra untimed steps for compiled sides")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 20; smoke 2)")
    p.add_argument("--sides", default=None,
                   help="comma list of mmssl,ref,ref_compiled,mmssl_compiled (default all four; smoke mmssl,ref)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype of the timed steps")
    p.add_argument("--ref-lr", type=float, default=1.5e-4, help="reference lr (MAE: blr 1.5e-4 x batch / 256)")
    p.add_argument("--check-batch", type=int, default=None, help="images in the check (default 8; smoke 2)")
    add_run_args(p)
    a = p.parse_args(argv)
    sm = a.smoke
    a.batch = a.batch or (4 if sm else 256)
    a.check_batch = a.check_batch or (2 if sm else 8)
    return finish_run_args(p, a)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, command = start(args, argv, "bench/mae_pretrain.py")
    import timm

    import mmssl

    env = {"torch": torch.__version__, "timm": timm.__version__, "mmssl": getattr(mmssl, "__version__", "?"),
           "python": platform.python_version(), "cuda": torch.version.cuda,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "host": platform.node(),
           "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32}
    s = SHAPES[args.shape]
    results: dict[str, Any] = {
        "benchmark": "mae_pretrain", "command": command, "env": env,
        "settings": {"device": args.device, "shape": args.shape, **s, "batch": args.batch, "mask_ratio": MASK_RATIO,
                     "precision": args.precision, "warmup": args.warmup, "compile_warmup": args.compile_warmup,
                     "steps": args.steps, "ref_lr": args.ref_lr, "sides": args.sides},
        "sides": {},
    }
    t_start = time.perf_counter()
    # The model settings both sides run with (built on CPU, no device memory).
    results["settings"]["models"] = model_settings(build_reference(args.shape), build_mmssl(args.shape))
    results["settings"]["mmssl_trainer"] = {k: mmssl_configs(args.shape)["trainer"].get(k)
                                            for k in ("lr", "betas", "eps", "weight_decay", "clip_grad", "precision")}
    if args.check:
        try:
            results["check"] = equivalence_check(args.shape, device, args.check_batch, args.seed)
        except Exception as e:  # noqa: BLE001 - a broken check is reported, the timings still run
            traceback.print_exc()
            results["check"] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        free(device)
        print(f"[bench] loss equivalence: {results['check'].get('status')}", file=sys.stderr, flush=True)
    if args.check_only:
        args.sides = []
        results["peak"] = {}
    else:
        results["peak"] = measure_peak(device, args.peak_n, args.peak_iters)
    free(device)
    spec = spec_peak(env["device_name"]) if device.type == "cuda" else None
    results["spec_peak_flops_per_s"] = spec

    def write(final: bool) -> None:
        """The JSON after every side, so a run cut short still leaves what it measured."""
        summarise(results, args.batch, results["peak"].get("flops_per_s"), spec)
        results["wall_s"] = time.perf_counter() - t_start
        results["complete"] = final
        if args.out:
            write_json(args.out, results)

    write(False)
    for name in args.sides:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            results["sides"][name] = run_side(name, args, device)
        except Exception as e:  # noqa: BLE001 - one broken side must not lose the others
            traceback.print_exc()
            results["sides"][name] = {"error": f"{type(e).__name__}: {e}"}
        results["sides"][name]["side_wall_s"] = time.perf_counter() - t0
        free(device)
        write(False)
    write(True)
    print(markdown(results), flush=True)
    if args.out:
        print(f"[bench] wrote {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
