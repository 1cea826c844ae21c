#!/usr/bin/env python3
"""HuBERT Base pretraining step: mmssl against torchaudio's ``hubert_pretrain_base`` (eager and compiled).

One run measures, on the same device and the same synthetic batch (8 utterances x 10 s of 16 kHz audio,
K=500 unit targets, mask prob 0.8 / length 10, HuBERT Base dropouts on both sides, bf16 autocast):

  mmssl           mmssl's ``hubert`` objective on ``model=base``, the step as mmssl's trainer takes it
                  (autocast forward, backward, clip_grad_norm_, finite check, fused AdamW)
  ref             torchaudio ``hubert_pretrain_base`` + the recipe's loss, the step as torchaudio's
                  HuBERT recipe takes it (finite check, per-step loss/accuracy logging, loss / frames,
                  backward, clip_grad_norm_, default (foreach) AdamW)
  ref_compiled    the same reference under ``torch.compile``
  mmssl_compiled  mmssl under ``torch.compile`` (optional)

and reports step time, audio-seconds per second, model FLOPs per step (forward + backward, counted with
``FlopCounterMode`` on each side's own model), achieved TFLOP/s, MFU against a bf16 matmul peak
measured in the same run, peak memory and the mmssl / reference ratios.

Before timing, a correctness check converts a dropout-free reference into mmssl
(``mmssl.convert.hubert.convert_hubert_state_dict``), feeds both the same audio, the same mask and the
same labels, and compares the masked cross-entropy per frame in fp32 (relative difference < 1e-3).

    python bench/hubert_pretrain.py --device cuda --out results.json   # the benchmark (H100)
    python bench/hubert_pretrain.py --device cpu --smoke               # a < 30 s CPU smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py, however this file is run
from common import (
    add_run_args,
    autocast,
    exact_fp32,
    finish_run_args,
    free,
    measure_peak,
    spec_peak,
    start,
    time_steps,
    use_source_tree,
    write_json,
)
from common import count_flops as _count_flops
from common import rel_diff as _rel

use_source_tree()

SAMPLE_RATE = 16000
CHECK_TOL = 1e-3

# Model shapes. ``base`` is HuBERT Base (torchaudio's hubert_pretrain_base, mmssl's model=base);
# ``smoke`` is a tiny stand-in with the same structure, for CPU.
SHAPES: dict[str, dict[str, int]] = {
    "base": {"dim": 768, "depth": 12, "heads": 12, "ffn_dim": 3072, "channels": 512, "pos_kernel": 128,
             "pos_groups": 16, "final_dim": 256},
    "smoke": {"dim": 64, "depth": 2, "heads": 2, "ffn_dim": 128, "channels": 32, "pos_kernel": 16, "pos_groups": 4,
              "final_dim": 32},
}
# HuBERT Base's dropouts (torchaudio hubert_pretrain_base defaults; mmssl configs/modality/speech.yaml sizes.base).
DROPOUTS = {"projection": 0.1, "attention": 0.1, "ffn_interm": 0.0, "dropout": 0.1, "layer_drop": 0.05}
NO_DROPOUTS = {k: 0.0 for k in DROPOUTS}


# ------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------
def load_cfg(group: str, name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / group / name))  # type: ignore


def build_reference(shape: str, k: int, drops: dict[str, float], feature_grad_mult: float | None = 0.1):
    """torchaudio's HuBERT pretraining model: ``hubert_pretrain_base`` for base, the same builder with
    smaller numbers for the smoke shape."""
    from torchaudio.models import hubert_pretrain_base, hubert_pretrain_model

    kw: dict[str, Any] = {
        "encoder_projection_dropout": drops["projection"], "encoder_attention_dropout": drops["attention"],
        "encoder_ff_interm_dropout": drops["ffn_interm"], "encoder_dropout": drops["dropout"],
        "encoder_layer_drop": drops["layer_drop"], "feature_grad_mult": feature_grad_mult}
    if shape == "base":
        return hubert_pretrain_base(num_classes=k, **kw)  # mask_prob 0.8, mask_length 10 (static)
    s = SHAPES[shape]
    c = s["channels"]
    return hubert_pretrain_model(
        extractor_mode="group_norm", extractor_conv_layer_config=[(c, 10, 5)] + [(c, 3, 2)] * 4 + [(c, 2, 2)] * 2,
        extractor_conv_bias=False, encoder_embed_dim=s["dim"], encoder_pos_conv_kernel=s["pos_kernel"],
        encoder_pos_conv_groups=s["pos_groups"], encoder_num_layers=s["depth"], encoder_num_heads=s["heads"],
        encoder_ff_interm_features=s["ffn_dim"], encoder_layer_norm_first=False, mask_prob=0.8,
        mask_selection="static", mask_other=0.0, mask_length=10, no_mask_overlap=False, mask_min_space=1,
        mask_channel_prob=0.0, mask_channel_selection="static", mask_channel_other=0.0, mask_channel_length=10,
        no_mask_channel_overlap=False, mask_channel_min_space=1, skip_masked=False, skip_nomask=False,
        num_classes=k, final_dim=s["final_dim"], **kw)


def mmssl_encoder_config(shape: str, drops: dict[str, float]) -> dict[str, Any]:
    from mmssl.factory import encoder_config

    speech_cfg = load_cfg("modality", "speech.yaml")
    s = SHAPES[shape]
    overrides = None if shape == "base" else {k: s[k] for k in ("dim", "depth", "heads", "ffn_dim")}
    cfg = encoder_config("speech", "base", speech_cfg, overrides)
    if shape != "base":
        cfg["adapter"].update(frontend_channels=s["channels"], pos_conv_kernel=s["pos_kernel"],
                              pos_conv_groups=s["pos_groups"])
    if drops is NO_DROPOUTS:
        cfg["backbone"].update(dropout=0.0, attn_dropout=0.0, ffn_dropout=0.0, layer_drop=0.0)
        cfg["adapter"]["feature_dropout"] = 0.0
    return cfg


def build_mmssl(shape: str, k: int, drops: dict[str, float], enc_cfg: dict[str, Any] | None = None):
    from mmssl.factory import build_encoder, build_objective

    enc = build_encoder(enc_cfg or mmssl_encoder_config(shape, drops))
    hub_cfg = load_cfg("objective", "hubert.yaml")
    hub_cfg.update(k=k, final_dim=SHAPES[shape]["final_dim"])
    return build_objective("hubert", hub_cfg, {"speech": enc})


def model_settings(ref, obj) -> dict[str, Any]:
    """Masking and dropout as each model holds them (so the JSON shows both sides match)."""
    w = ref.wav2vec2
    t = w.encoder.transformer
    lay = t.layers[0]
    enc = obj.encoder
    bc = enc.backbone_cfg
    ad = enc.adapter
    return {
        "reference": {"mask_prob": ref.mask_generator.mask_prob, "mask_length": ref.mask_generator.mask_length,
                      "feature_projection_dropout": w.encoder.feature_projection.dropout.p,
                      "attention_dropout": lay.attention.dropout, "dropout": lay.dropout.p,
                      "ffn_interm_dropout": lay.feed_forward.intermediate_dropout.p,
                      "layer_drop": t.layer_drop, "feature_grad_mult": ref.feature_grad_mult,
                      "num_classes": ref.logit_generator.label_embeddings.shape[0],
                      "params": sum(p.numel() for p in ref.parameters())},
        "mmssl": {"mask_ratio": obj.mask_ratio, "mask_span": ad.mask_span,
                  "mask_start_prob": 1.0 - (1.0 - obj.mask_ratio) ** (1.0 / ad.mask_span),
                  "feature_dropout": ad.feature_dropout.p, "attention_dropout": bc.attn_dropout,
                  "dropout": bc.dropout, "ffn_interm_dropout": bc.ffn_dropout, "layer_drop": bc.layer_drop,
                  "num_classes": obj.k, "params": sum(p.numel() for p in obj.parameters())},
    }


@contextlib.contextmanager
def no_layer_drop(model) -> Any:
    """Layer drop off (for a deterministic FLOP count of the whole model); restored afterwards."""
    saved = []
    for m in model.modules():
        if hasattr(m, "layer_drop") and isinstance(m.layer_drop, float):  # torchaudio Transformer
            saved.append((m, "layer_drop", m.layer_drop))
            m.layer_drop = 0.0
        cfg = getattr(m, "cfg", None)
        if cfg is not None and hasattr(cfg, "layer_drop"):  # mmssl Backbone
            saved.append((cfg, "layer_drop", cfg.layer_drop))
            cfg.layer_drop = 0.0
    try:
        yield
    finally:
        for o, a, v in saved:
            setattr(o, a, v)


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------
def num_frames(samples: int) -> int:
    return (samples - 400) // 320 + 1


def make_batch(b: int, samples: int, k: int, device: torch.device, seed: int,
               lengths: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Synthetic audio (noisy harmonics, zero past each length) and random unit labels [B, N]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SAMPLE_RATE
    f0 = 100 + 150 * torch.rand(b, 1, generator=g)
    wav = sum(torch.sin(2 * math.pi * f0 * h * t) / h for h in (1, 2, 3)) * 0.1 + 0.02 * torch.randn(b, samples, generator=g)
    lens = torch.tensor(lengths if lengths is not None else [samples] * b, dtype=torch.long)
    wav = wav * (torch.arange(samples)[None] < lens[:, None])
    n = num_frames(samples)
    labels = torch.randint(0, k, (b, n), generator=g)
    return {"speech": wav.float().to(device), "speech_len": lens.to(device), "sample_id": torch.arange(b).to(device),
            "labels": labels.to(device)}


def unit_table(labels: torch.Tensor, lengths_frames: torch.Tensor, k: int):
    """A UnitTable holding ``labels`` [B, N] for sample ids 0..B-1 (first ``lengths_frames[i]`` frames)."""
    from mmssl.objectives.unit_targets import UnitTable

    rows = [labels[i, : int(lengths_frames[i])] for i in range(labels.shape[0])]
    flat = torch.cat(rows).to(torch.int16).cpu()
    lens = lengths_frames.long().cpu()
    offsets = torch.cumsum(lens, 0) - lens
    return UnitTable(flat, torch.arange(labels.shape[0]), offsets, lens, meta={"k": k}).to(labels.device)


# ------------------------------------------------------------------------------------------------------
# The reference's loss and metrics, as torchaudio's HuBERT recipe (examples/hubert) computes them
# ------------------------------------------------------------------------------------------------------
def reference_hubert_loss(logit_m: torch.Tensor, logit_u: torch.Tensor, feature_pen: torch.Tensor,
                          masked_weight: float = 1.0, unmasked_weight: float = 0.0,
                          feature_weight: float = 10.0) -> torch.Tensor:
    """Cross-entropy against index 0 (the positive), summed, over masked frames, + ``unmasked_weight``
    times the same over unmasked frames, + ``feature_weight`` times the feature penalty (fairseq /
    torchaudio recipe ``hubert_loss`` with reduction="sum")."""
    zero_m = torch.zeros(logit_m.shape[0], dtype=torch.long, device=logit_m.device)
    zero_u = torch.zeros(logit_u.shape[0], dtype=torch.long, device=logit_u.device)
    loss = feature_pen * feature_weight
    loss = loss + F.cross_entropy(logit_m, zero_m, reduction="sum") * masked_weight
    loss = loss + F.cross_entropy(logit_u, zero_u, reduction="sum") * unmasked_weight
    return loss


def reference_accuracy(logits: torch.Tensor) -> tuple[int, int]:
    """The recipe's per-step accuracy log: argmax at the positive (and not a constant row); two host reads."""
    with torch.no_grad():
        top = logits.argmax(-1) == 0
        flat = top & (logits.argmin(-1) == 0)
        return int(top.long().sum().item()) - int(flat.long().sum().item()), top.numel()


# ------------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------------
def mmssl_step_fn(model, obj, opt, batch, device, bf16: bool, clip: float) -> Callable[[], float | None]:
    """mmssl's trainer step (mmssl/train/trainer.py), minus data loading and logging."""
    from mmssl.train.distributed import DistInfo, any_true

    single = DistInfo()  # one process: any_true is a plain host read, as in the trainer
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step() -> None:
        with autocast(device, bf16):
            out = model(inputs)
            loss = out.loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(obj.parameters(), clip)
        bad = ~torch.isfinite(norm) | ~torch.isfinite(loss.detach())
        if any_true(bad, single):
            opt.zero_grad(set_to_none=True)
            return
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ref_step_fn(model, params, opt, batch, device, bf16: bool, clip: float, recipe_metrics: bool) -> Callable[[], None]:
    """torchaudio's HuBERT recipe step (examples/hubert/lightning_modules.py, training_step), in bf16
    autocast instead of fp16 + GradScaler, single process, no LR scheduler."""
    wav, labels, lengths = batch["speech"], batch["labels"], batch["speech_len"]

    def step() -> None:
        opt.zero_grad()
        with autocast(device, bf16):
            logit_m, logit_u, feature_pen = model(wav, labels, lengths)
            loss = reference_hubert_loss(logit_m, logit_u, feature_pen)
        if recipe_metrics:  # the recipe logs loss / frames and both accuracies every step
            _ = loss.item() / logit_m.size(0)
            reference_accuracy(logit_m)
            reference_accuracy(logit_u)
        if torch.isinf(loss) or torch.isnan(loss):
            opt.zero_grad()
            return
        num_frames_m = logit_m.size(0)
        loss = loss * (1 / num_frames_m)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    return step


def make_optimizer(params, lr: float, fused: bool | None):
    kw: dict[str, Any] = {"lr": lr, "betas": (0.9, 0.98), "eps": 1e-6}
    if fused is not None:
        kw["fused"] = fused
    return torch.optim.AdamW(params, weight_decay=0.01, **kw)


# ------------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------------
def count_flops(model, fwd_bwd: Callable[[], None]) -> dict[str, Any]:
    """FLOPs of one forward + backward (no optimiser step), with layer drop off so the count is the
    whole model's (the timed steps skip 5% of blocks on average: expect ~0.05 x the block share less)."""
    return _count_flops(fwd_bwd, no_layer_drop(model))


# ------------------------------------------------------------------------------------------------------
# Correctness: the same weights, audio, mask and labels give the same masked cross-entropy
# ------------------------------------------------------------------------------------------------------
def shadowed_submodules(module: torch.nn.Module) -> list[str]:
    """Sub-modules registered in ``_modules`` but hidden by a class attribute of the same name (e.g. a
    class-level ``content_position = None``): they hold parameters, yet ``module.name`` reads the class
    attribute, so code that calls ``module.name`` never runs them."""
    out = []
    for prefix, m in module.named_modules():
        for name, sub in m._modules.items():
            if sub is not None and getattr(m, name, None) is not sub:
                out.append(f"{prefix + '.' if prefix else ''}{name}")
    return out


def _compare_case(ref, obj, b: int, samples: int, lens: list[int], k: int, device: torch.device,
                  seed: int) -> dict[str, Any]:
    """One batch through both models with the same mask and labels; fp32, no TF32."""
    from torchaudio.models.wav2vec2.components import _compute_mask_indices

    from mmssl.objectives.hubert_loss import unit_logits

    n = num_frames(samples)
    batch = make_batch(b, samples, k, device, seed + 1, lengths=lens)
    wav, labels, lengths = batch["speech"], batch["labels"], batch["speech_len"]
    nf = torch.tensor([num_frames(x) for x in lens], device=device)
    pad = torch.arange(n, device=device)[None] >= nf[:, None]
    real = ~pad
    torch.manual_seed(seed + 2)
    # The reference's own mask distribution (mask_prob 0.8, length 10, at least 2 spans), used by both.
    mask = _compute_mask_indices((b, n), pad.cpu(), 0.8, 10, "static", 0.0, min_masks=2,
                                 no_overlap=False, min_space=1).to(device) & real

    def fixed_mask(x, padding_mask, _m=mask, _e=ref.mask_generator.mask_embedding):
        return torch.where(_m[..., None], _e.to(x.dtype), x), _m

    ref.mask_generator.forward = fixed_mask
    obj.encoder.adapter.make_mask = lambda tokens, ratio, generator=None, _m=mask: _m
    obj.use_units(unit_table(labels, nf, k))
    captured: dict[str, torch.Tensor] = {}
    hooks = [ref.logit_generator.final_proj.register_forward_hook(lambda m, i, o: captured.update(ref_h=i[0])),
             obj.final_proj.register_forward_hook(lambda m, i, o: captured.update(mm_h=i[0], mm_p=o))]
    try:
        with exact_fp32():
            ref.zero_grad(set_to_none=True)
            obj.zero_grad(set_to_none=True)
            logit_m, logit_u, feature_pen = ref(wav, labels, lengths)
            zeros = torch.zeros(max(logit_m.shape[0], logit_u.shape[0]), dtype=torch.long, device=device)
            ce_ref_m = F.cross_entropy(logit_m.float(), zeros[: logit_m.shape[0]], reduction="none")
            ce_ref_u = F.cross_entropy(logit_u.float(), zeros[: logit_u.shape[0]], reduction="none")
            out = obj({"speech": wav, "speech_len": lengths, "sample_id": batch["sample_id"]})
            # mmssl per frame, from its own projection and logits (frames in the reference's order)
            tgt = labels.reshape(-1)
            lg = unit_logits(captured["mm_p"].reshape(b * n, -1), obj.label_embeddings, obj.temperature, tgt)
            ce_mm = F.cross_entropy(lg, tgt, reduction="none").view(b, n)
            ce_mm_m = ce_mm[mask]
            ce_ref_m.mean().backward()  # masked CE per frame, without the feature penalty: mmssl's loss
            out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    ref_m, mm_m = float(ce_ref_m.mean().detach()), float(out.metrics["loss_masked"])
    ref_u, mm_u = float(ce_ref_u.mean().detach()), float(out.metrics["loss_unmasked"])
    grads = {}
    pairs = {"final_proj.weight": (obj.final_proj.weight, ref.logit_generator.final_proj.weight),
             "label_embeddings": (obj.label_embeddings, ref.logit_generator.label_embeddings),
             "frontend.conv0.weight": (obj.encoder.adapter.feature_extractor.conv_layers[0].conv.weight,
                                       ref.wav2vec2.feature_extractor.conv_layers[0].conv.weight),
             "mask_embedding": (obj.encoder.mask_embedding, ref.mask_generator.mask_embedding)}
    for name, (pm, pr) in pairs.items():
        if pm.grad is not None and pr.grad is not None:
            grads[name] = _rel(pm.grad, pr.grad)
    g_mm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in obj.encoder.parameters() if p.grad is not None))
    g_ref = torch.sqrt(sum((p.grad.double() ** 2).sum() for n_, p in ref.named_parameters()
                           if p.grad is not None and not n_.startswith("logit_generator")))
    grads["encoder_grad_norm"] = float(abs(g_mm - g_ref) / g_ref)
    r = {"lengths": lens, "masked_frames": int(mask.sum()), "unmasked_frames": int((~mask & real).sum()),
         "mask_fraction": float(mask.sum() / real.sum()),
         "ce_masked_ref": ref_m, "ce_masked_mmssl": mm_m, "ce_masked_rel_diff": abs(mm_m - ref_m) / abs(ref_m),
         "ce_masked_per_frame_max_abs_diff": float((ce_mm_m - ce_ref_m).abs().max().detach()),
         "ce_unmasked_ref": ref_u, "ce_unmasked_mmssl": mm_u, "ce_unmasked_rel_diff": abs(mm_u - ref_u) / abs(ref_u),
         "hidden_rel_diff": _rel(captured["mm_h"][real], captured["ref_h"][real]), "grad_rel_diff": grads,
         "reference_recipe_loss_per_masked_frame":
             float(reference_hubert_loss(logit_m, logit_u, feature_pen).detach()) / logit_m.shape[0],
         "reference_feature_penalty": float(feature_pen.detach())}
    r["passed"] = bool(r["ce_masked_rel_diff"] < CHECK_TOL and r["ce_unmasked_rel_diff"] < CHECK_TOL
                       and r["ce_masked_per_frame_max_abs_diff"] < CHECK_TOL * max(1.0, abs(ref_m)))
    return r


def equivalence_check(shape: str, k: int, device: torch.device, b: int, samples: int, seed: int) -> dict[str, Any]:
    """Convert a dropout-free reference into mmssl (weights, mask embedding, final projection, label
    embeddings) and compare in fp32 the masked cross-entropy per frame given the same audio, mask and
    labels. The pass/fail case is a full-length batch; a batch with a shorter utterance is reported too
    but not required to agree (mmssl's first-layer norm keeps padding out of its statistics on purpose;
    torchaudio's GroupNorm does not)."""
    try:
        from mmssl.convert.hubert import convert_hubert_state_dict
    except ImportError as e:
        return {"status": "skipped", "reason": f"mmssl.convert.hubert is missing ({e}): no weight converter"}
    from mmssl.factory import build_encoder, build_objective

    torch.manual_seed(seed)
    # feature_grad_mult=None so the front-end gradients compare too (it scales gradients only).
    ref = build_reference(shape, k, NO_DROPOUTS, feature_grad_mult=None).to(device).eval()
    try:  # shapes cannot tell the head count: pass the reference's
        enc_cfg, enc_sd = convert_hubert_state_dict(ref.state_dict(), heads=SHAPES[shape]["heads"])
    except TypeError:
        enc_cfg, enc_sd = convert_hubert_state_dict(ref.state_dict())
    enc = build_encoder(enc_cfg)
    enc.load_state_dict(enc_sd, strict=True)
    hub_cfg = load_cfg("objective", "hubert.yaml")
    hub_cfg.update(k=k, final_dim=SHAPES[shape]["final_dim"])
    obj = build_objective("hubert", hub_cfg, {"speech": enc})
    # torchaudio's LogitGenerator: final_proj = Linear(D, final_dim), label_embeddings [K, final_dim];
    # mmssl's head has the same layout.
    with torch.no_grad():
        obj.final_proj.weight.copy_(ref.logit_generator.final_proj.weight)
        obj.final_proj.bias.copy_(ref.logit_generator.final_proj.bias)
        obj.label_embeddings.copy_(ref.logit_generator.label_embeddings)
    obj = obj.to(device).eval()

    result: dict[str, Any] = {"status": "passed", "tolerance": CHECK_TOL, "batch": b, "samples": samples,
                              "frames": num_frames(samples), "cases": {}}
    shadowed = shadowed_submodules(obj)
    if shadowed:
        result["mmssl_issues"] = [f"sub-module {s} is registered (its parameters train and are saved) but a class "
                                  f"attribute of the same name hides it, so it never runs" for s in shadowed]
    result["cases"]["full"] = _compare_case(ref, obj, b, samples, [samples] * b, k, device, seed)
    if not result["cases"]["full"]["passed"]:
        result["status"] = "failed"
    if b > 1:  # informational: padding handling differs by design
        result["cases"]["padded (informational)"] = _compare_case(
            ref, obj, b, samples, [samples] * (b - 1) + [samples * 3 // 4], k, device, seed)
    if shadowed:  # diagnostic: does mmssl agree once the hidden sub-modules run?
        for s in shadowed:
            parent, _, name = s.rpartition(".")
            holder = obj.get_submodule(parent) if parent else obj
            object.__setattr__(holder, name, holder._modules[name])  # instance attribute beats the class one
        r = _compare_case(ref, obj, b, samples, [samples] * b, k, device, seed)
        r["note"] = "diagnostic only: the shadowed sub-modules made visible on this instance"
        result["cases"]["full, shadowed sub-modules unhidden (diagnostic)"] = r
    del ref, obj, enc
    return result


# ------------------------------------------------------------------------------------------------------
# Sides
# ------------------------------------------------------------------------------------------------------
def run_side(name: str, args, device: torch.device, shape: str, samples: int) -> dict[str, Any]:
    bf16 = args.precision == "bf16"
    torch.manual_seed(args.seed)
    batch = make_batch(args.batch, samples, args.k, device, args.seed)
    compiled = name.endswith("_compiled")
    if compiled:
        torch._dynamo.reset()
    info: dict[str, Any] = {"compiled": compiled}
    if name.startswith("mmssl"):
        obj = build_mmssl(shape, args.k, DROPOUTS).to(device).train()
        nf = torch.full((args.batch,), num_frames(samples), device=device)
        obj.use_units(unit_table(batch["labels"], nf, args.k))
        from mmssl.train.trainer import param_groups

        fused = True
        try:
            opt = make_optimizer(param_groups(obj, 0.01), args.lr, fused)
        except (RuntimeError, ValueError):
            fused = False
            opt = make_optimizer(param_groups(obj, 0.01), args.lr, False)
        info["optimizer"] = f"AdamW(fused={fused})"
        hidden = shadowed_submodules(obj)
        if hidden:
            info["warning"] = (f"mmssl registers {', '.join(hidden)} but never runs it (a class attribute hides it): "
                               f"this step does less work than HuBERT Base, so the timing is not comparable")
            print(f"[bench] WARNING: {info['warning']}", file=sys.stderr, flush=True)
        model = torch.compile(obj) if compiled else obj
        step = mmssl_step_fn(model, obj, opt, batch, device, bf16, args.clip)
        flop_model = obj

        def fwd_bwd() -> None:
            with autocast(device, bf16):
                loss = obj({k: v for k, v in batch.items() if k != "labels"}).loss
            loss.backward()
            obj.zero_grad(set_to_none=True)
    else:
        ref = build_reference(shape, args.k, DROPOUTS).to(device).train()
        params = list(ref.parameters())
        opt = make_optimizer(params, args.lr, None)  # torch's default: foreach on CUDA
        info["optimizer"] = "AdamW(default: foreach)"
        model = torch.compile(ref) if compiled else ref
        step = ref_step_fn(model, params, opt, batch, device, bf16, args.clip, args.ref_recipe_metrics)
        flop_model = ref

        def fwd_bwd() -> None:
            with autocast(device, bf16):
                lm, lu, pen = ref(batch["speech"], batch["labels"], batch["speech_len"])
                loss = reference_hubert_loss(lm, lu, pen) / lm.shape[0]
            loss.backward()
            ref.zero_grad(set_to_none=True)

    info["flops"] = count_flops(flop_model, fwd_bwd)
    warmup = args.warmup + (args.compile_warmup if compiled else 0)
    info.update(time_steps(step, device, warmup, args.steps))
    if compiled:
        info["first_step_s_incl_compile"] = info["warmup_s"][0]
    del step, opt, model, flop_model
    return info


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------
def summarise(results: dict[str, Any], audio_s_per_step: float, peak: float, spec_peak: float | None) -> None:
    for r in results["sides"].values():
        if "error" in r:
            continue
        t = r["step_s_median"]
        flops = r["flops"]["total"]
        r["audio_s_per_s"] = audio_s_per_step / t
        r["achieved_flops_per_s"] = flops / t
        r["mfu_measured_peak"] = flops / t / peak if peak else None
        r["mfu_spec_peak"] = flops / t / spec_peak if spec_peak else None
    s = results["sides"]

    def ratio(a: str, b: str) -> float | None:
        if a in s and b in s and "audio_s_per_s" in s[a] and "audio_s_per_s" in s[b]:
            return s[a]["audio_s_per_s"] / s[b]["audio_s_per_s"]
        return None

    results["ratios"] = {"mmssl/ref": ratio("mmssl", "ref"), "mmssl/ref_compiled": ratio("mmssl", "ref_compiled"),
                         "mmssl_compiled/ref_compiled": ratio("mmssl_compiled", "ref_compiled"),
                         "mmssl_compiled/ref": ratio("mmssl_compiled", "ref")}
    r = results["ratios"]["mmssl/ref"]
    results["target_3x_vs_ref_eager"] = None if r is None else bool(r >= 3.0)


def markdown(results: dict[str, Any]) -> str:
    a = results["settings"]
    lines = [(f"HuBERT pretraining step: batch {a['batch']} x {a['seconds']:g} s, K={a['k']}, "
              f"{a['precision']}, device {results['env']['device_name']}"),
             "",
             ("| side | step (ms, median) | audio-s / s | GFLOP / step | TFLOP/s | MFU (measured peak) | "
              "peak mem (GiB) | vs ref eager |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref_aps = (results["sides"].get("ref") or {}).get("audio_s_per_s")
    for name, r in results["sides"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | | | | |")
            continue
        mem = f"{r['peak_mem_bytes'] / 2**30:.2f}" if "peak_mem_bytes" in r else "n/a"
        mfu = f"{100 * r['mfu_measured_peak']:.1f}%" if r.get("mfu_measured_peak") is not None else "n/a"
        rel = f"{r['audio_s_per_s'] / ref_aps:.2f}x" if ref_aps else "n/a"
        lines.append(f"| {name} | {1e3 * r['step_s_median']:.1f} | {r['audio_s_per_s']:.1f} | "
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
        lines.append("ratios (audio-s/s): " + ", ".join(f"{k} = {v:.2f}x" for k, v in rs.items()))
    c = results.get("check", {})
    if c.get("status") == "skipped":
        lines.append(f"loss equivalence: SKIPPED ({c.get('reason')})")
    elif c:
        lines.append(f"loss equivalence: {c.get('status', '?').upper()} (criterion: the full-length case)")
        for case, r in c.get("cases", {}).items():
            lines.append(f"loss equivalence [{case}]: masked CE ref {r['ce_masked_ref']:.6f} vs mmssl "
                         f"{r['ce_masked_mmssl']:.6f} (rel diff {r['ce_masked_rel_diff']:.2e}, per-frame max abs "
                         f"{r['ce_masked_per_frame_max_abs_diff']:.2e}); unmasked rel diff "
                         f"{r['ce_unmasked_rel_diff']:.2e}; hidden rel diff {r['hidden_rel_diff']:.2e} -> "
                         + (("agree" if r["passed"] else "differ") if "(" in case else
                            ("PASS" if r["passed"] else "FAIL")))
        if "error" in c:
            lines.append(f"loss equivalence: ERROR {c['error']}")
        for issue in c.get("mmssl_issues", []):
            lines.append(f"mmssl issue: {issue}")
    for name, r in results["sides"].items():
        if r.get("warning"):
            lines.append(f"WARNING [{name}]: {r['warning']}")
    lines += ["", "command: " + results["command"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true",
                   help="tiny model (2 blocks, width 64), batch 2 x 1 s, 1 warm-up + 2 steps, no compile")
    p.add_argument("--batch", type=int, default=None, help="utterances per step (default 8; smoke 2)")
    p.add_argument("--seconds", type=float, default=None, help="seconds of 16 kHz audio each (default 10; smoke 1)")
    p.add_argument("--k", type=int, default=500, help="number of unit clusters (iteration 2: 500)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side (default 5; smoke 1)")
    p.add_argument("--compile-warmup", type=int, default=10, help="extra untimed steps for compiled sides")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 20; smoke 2)")
    p.add_argument("--sides", default=None,
                   help="comma list of mmssl,ref,ref_compiled,mmssl_compiled (default all four; smoke mmssl,ref)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype of the timed steps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--clip", type=float, default=10.0, help="gradient clipping norm (HuBERT recipe: 10)")
    p.add_argument("--no-ref-recipe-metrics", dest="ref_recipe_metrics", action="store_false",
                   help="drop the recipe's per-step loss/accuracy .item() logging from the reference step")
    p.add_argument("--check-batch", type=int, default=2)
    p.add_argument("--check-seconds", type=float, default=None, help="audio per check utterance (default 4; smoke 1)")
    add_run_args(p)
    a = p.parse_args(argv)
    sm = a.smoke
    a.batch = a.batch or (2 if sm else 8)
    a.seconds = a.seconds or (1.0 if sm else 10.0)
    a.check_seconds = a.check_seconds or (1.0 if sm else 4.0)
    return finish_run_args(p, a)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, command = start(args, argv, "bench/hubert_pretrain.py")
    import torchaudio

    import mmssl

    samples = round(args.seconds * SAMPLE_RATE)
    env = {"torch": torch.__version__, "torchaudio": torchaudio.__version__, "mmssl": getattr(mmssl, "__version__", "?"),
           "python": platform.python_version(), "cuda": torch.version.cuda,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "host": platform.node(),
           "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32}
    results: dict[str, Any] = {
        "benchmark": "hubert_pretrain", "command": command, "env": env,
        "settings": {"shape": args.shape, "batch": args.batch, "seconds": args.seconds, "samples": samples,
                     "frames": num_frames(samples), "k": args.k, "precision": args.precision,
                     "warmup": args.warmup, "compile_warmup": args.compile_warmup, "steps": args.steps,
                     "lr": args.lr, "clip": args.clip, "ref_recipe_metrics": args.ref_recipe_metrics,
                     "dropouts": DROPOUTS, "sides": args.sides},
        "sides": {},
    }
    t_start = time.perf_counter()
    # The model settings both sides run with (built on CPU, no device memory).
    results["settings"]["models"] = model_settings(build_reference(args.shape, args.k, DROPOUTS),
                                                   build_mmssl(args.shape, args.k, DROPOUTS))
    if args.check:
        try:
            results["check"] = equivalence_check(args.shape, args.k, device, args.check_batch,
                                                 round(args.check_seconds * SAMPLE_RATE), args.seed)
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
    audio_per_step = args.batch * samples / SAMPLE_RATE

    def write(final: bool) -> None:
        """The JSON after every side, so a run cut short still leaves what it measured."""
        summarise(results, audio_per_step, results["peak"].get("flops_per_s"), spec)
        results["wall_s"] = time.perf_counter() - t_start
        results["complete"] = final
        if args.out:
            write_json(args.out, results)

    write(False)
    for name in args.sides:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            results["sides"][name] = run_side(name, args, device, args.shape, samples)
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
