"""The trainer: optimisation, precision, accumulation, logging, checkpoints, resume, DDP.

It sees an Objective and a DataSource and nothing of modalities.

Continual pretraining is ``init=`` (weights from a run or an export, loaded before training) plus a
schedule (the run warms up again from 0; ``trainer.schedule=infinite`` for a constant phase that can be
continued), a mixture of data sources (replay of the old data) and optionally a parameter-efficient mode
(``trainer.peft=lora``, ExPLoRA-style: LoRA on the attention projections of the frozen blocks, the last
``trainer.unfreeze_last`` blocks and the backbone norms trained)."""
from __future__ import annotations

import contextlib
import copy
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

from mmssl import faults
from mmssl.data.loader import DataSource, MaxLen, TrainStream, iter_split, train_loader
from mmssl.errors import CheckpointWriteError, ConfigError
from mmssl.export import load_encoder, save_encoder, save_heads
from mmssl.lora import LoRALinear, apply_lora, merge_lora
from mmssl.objectives.base import Objective, PrepareContext
from mmssl.train import accumulate, fsdp
from mmssl.train import checkpoint as ckpt
from mmssl.train.distributed import DistInfo, any_true, barrier
from mmssl.train.logger import MetricsLogger, plot_loss, plot_schedule
from mmssl.train.monitor import Monitor, describe
from mmssl.train.schedule import lr_factor, phases, trainer_schedule
from mmssl.train.strategy import Strategy
from mmssl.types import Batch


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps in a row)."""


def pick_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(dist_info.local_rank)
        return torch.device("cuda", dist_info.local_rank)
    return torch.device(name)


def fused_adamw(device: torch.device) -> bool:
    """Whether the trainer's AdamW runs fused: on CUDA and on the CPU, where torch's fused kernel updates
    every tensor in one pass (about 7x faster than the per-tensor loop for a 110M-parameter ViT-B on 2
    cores; bench/RESULTS.md) and agrees with it to float rounding (tests/test_trainer_optimizer.py)."""
    return device.type in ("cuda", "cpu")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and embeddings-like vectors (ndim < 2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


PEFT_MODES = ("lora",)


def apply_peft(objective: Objective, t: dict[str, Any]) -> dict[str, Any]:
    """``trainer.peft=lora`` (ExPLoRA, Khanna et al. 2024), in place, on every tower of ``objective``:
    each backbone block but the last ``trainer.unfreeze_last`` gets LoRA (rank ``lora_rank``, alpha
    ``lora_alpha``) on its attention ``qkv`` and ``proj`` with its own weights frozen; the last blocks
    and every backbone norm are trained; the rest of the encoder (adapter, mask embedding, prefix tokens)
    is frozen. The objective's heads, decoders and teachers are left as they are. A parameter the
    objective had frozen stays frozen. -> {"lora_layers": n, "unfreeze_last": N} ({} without peft)."""
    if not check_peft(objective, t):
        return {}
    n = int(t.get("unfreeze_last", 1))
    layers = 0
    for enc in objective.encoders.values():
        blocks = enc.backbone.blocks
        depth = len(blocks)
        was = {id(p): p.requires_grad for p in enc.parameters()}
        for p in enc.parameters():
            p.requires_grad_(False)
        for b in blocks[: depth - n]:
            layers += len(apply_lora(b, ("qkv", "proj"), int(t.get("lora_rank", 8)), float(t.get("lora_alpha", 16.0)),
                                     float(t.get("lora_dropout", 0.0))))
        train = [p for b in blocks[depth - n:] for p in b.parameters()]
        train += [p for mod in enc.backbone.modules() if isinstance(mod, nn.LayerNorm) for p in mod.parameters()]
        for p in train:
            p.requires_grad_(was.get(id(p), True))
        for mod in enc.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_A.requires_grad_(True)
                mod.lora_B.requires_grad_(True)
    return {"lora_layers": layers, "unfreeze_last": n}


def check_peft(objective: Objective, t: dict[str, Any]) -> bool:
    """Whether ``trainer.peft`` asks for a parameter-efficient mode that these towers allow (one-line
    errors otherwise: checked before anything runs)."""
    mode = t.get("peft")
    if mode in (None, "none", "null", False):
        return False
    if mode not in PEFT_MODES:
        raise ValueError(f"unknown trainer.peft {mode!r}; choose one of: null, {', '.join(PEFT_MODES)}")
    n = int(t.get("unfreeze_last", 1))
    for m, enc in objective.encoders.items():
        blocks = getattr(getattr(enc, "backbone", None), "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"trainer.peft=lora needs mmssl backbone blocks; the {m} tower "  # noqa: TRY004
                             f"({type(enc).__name__}) has none")
        if not 0 <= n <= len(blocks):
            raise ValueError(f"trainer.unfreeze_last must lie in 0..{len(blocks)} (the {m} encoder's depth), got {n}")
    if int(t.get("lora_rank", 8)) < 1:
        raise ValueError(f"trainer.lora_rank must be at least 1, got {t.get('lora_rank')}")
    return True


def set_packing(objective: Objective, pack: bool) -> None:
    """``data.pack``: every tower runs its backbone on packed rows (``mmssl.packing``). Teachers (EMA,
    iteration-2 units) run padded: they give the same outputs either way."""
    for m, enc in objective.encoders.items():
        if not hasattr(enc, "pack_tokens"):
            if pack:
                raise ConfigError(f"data.pack=true packs mmssl encoders' tokens; the {m} tower "
                                  f"({type(enc).__name__}) is not one")
            continue
        if pack and enc.backbone_cfg.drop_path > 0:
            # stochastic depth draws one decision per row: packed items would share it
            raise ConfigError(f"data.pack=true with modality.{m}.backbone.drop_path="
                              f"{enc.backbone_cfg.drop_path}: drop path is drawn per row; set it to 0 or leave data.pack off")
        enc.pack_tokens = pack


def parameter_counts(objective: Objective) -> dict[str, int]:
    """Trainable and total scalar parameters of the encoders (towers) and of the whole objective (heads,
    decoders and teachers included); shared parameters counted once."""
    def count(params: Any) -> tuple[int, int]:
        seen = {id(p): p for p in params}
        return (sum(p.numel() for p in seen.values() if p.requires_grad), sum(p.numel() for p in seen.values()))

    et, ea = count(p for e in objective.encoders.values() for p in e.parameters())
    ot, oa = count(objective.parameters())
    return {"trainable_encoder_params": et, "encoder_params": ea, "trainable_params": ot, "total_params": oa}


def exportable(tower: nn.Module) -> nn.Module:
    """The tower as exported: a LoRA-wrapped one as a merged copy (plain architecture, loads with
    ``mmssl.load_encoder``); the training tower is left as it is."""
    if not any(isinstance(m, LoRALinear) for m in tower.modules()):
        return tower
    plain = copy.deepcopy(tower)
    merge_lora(plain)
    return plain


COUNTERS = ("skipped_samples", "skipped_steps")


@dataclass
class _Position:
    """Where the run stands: what a checkpoint saves and a resume restores."""
    step: int = 0
    consumed: int = 0                                              # batches this rank has drawn
    roles: dict[int, list[int]] = field(default_factory=dict)      # each loader role's next stream position
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))


class _Interval:
    """The running sums of one log interval (this rank)."""

    def __init__(self, device: torch.device, n_sources: int) -> None:
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.from_source = [0] * n_sources  # batches per source of a mixture
        self.reset()

    def reset(self) -> None:
        self.sums.clear()
        self.n, self.items, self.t0 = 0, 0, time.perf_counter()


class _Step(NamedTuple):
    """A finished optimizer step: its learning rate, loss and metrics (averaged over the micro-batches)
    and gradient norm."""
    lr: float
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    norm: torch.Tensor


class Trainer:
    def __init__(self, cfg: dict[str, Any], objective: Objective, source: DataSource, run_dir: Path,
                 dist_info: DistInfo, cache_dir: Path, max_len: MaxLen = None) -> None:
        self.cfg = cfg
        self.t = cfg["trainer"]
        self.objective = objective
        self.source = source
        self.run_dir = Path(run_dir)
        self.dist = dist_info
        self.cache_dir = cache_dir
        self.max_len = max_len
        self.device = pick_device(self.t.get("device", "auto"), dist_info)
        prec = self.t.get("precision", "auto")
        self.autocast_dtype = torch.bfloat16 if (prec == "bf16" or (prec == "auto" and self.device.type == "cuda")) \
            else None
        self.ckpt_root = self.run_dir / "checkpoints"

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Pretrain to ``trainer.max_steps``; then the encoders and heads are exported. -> the final step
        and the skip counters."""
        self.setup()
        pos = self.pos
        while pos.step < self.max_steps:
            done = self.train_step()
            if done is None:  # skipped: a non-finite loss or gradient norm
                continue
            self.log(done)
            faults.point("step")
            self.evaluate()
            self.checkpoint()
        self.progress.close()
        self.export("encoders", pos.step)  # every rank: a sharded objective is gathered first
        if self.dist.is_main:
            self._plots()
        barrier(self.dist)
        self.logger.close()
        return {"step": pos.step, **pos.counters}

    # -- the parts ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before the first step, in this order: the keys checked, the checkpoint to resume or
        the init= weights, the objective prepared (peft applied), the optimizer, the resumed position,
        DDP, the training stream, the log interval, progress and monitor."""
        t = self.t
        self.max_steps, self.accum = int(t["max_steps"]), int(t.get("accumulate", 1))
        self.workers = int(t.get("num_workers", 0))
        self.sched = trainer_schedule(t)  # checked before anything is written
        check_peft(self.objective, t)
        self.strategy = Strategy(t, self.dist, self.device)
        self.strategy.check(self.objective)
        self.objective.to(self.device)
        set_packing(self.objective, bool(self.cfg["data"].get("pack")))
        resume_from = self._start()
        self._prepare()
        if self.strategy.sharded_checkpoints:
            # sharding replaces the parameters: the optimizer, then the sharded checkpoint, come after it
            self.model = self._wrap(fresh=resume_from is None)
            self.optimizer = self._optimizer()
            self.pos = _Position() if resume_from is None else self._resume(resume_from)
        else:
            self.optimizer = self._optimizer()
            self.pos = _Position() if resume_from is None else self._resume(resume_from)
            self.model = self._wrap(fresh=resume_from is None)
        self.loader = self._stream()
        self.log_every, self.ckpt_every = int(t.get("log_every", 10)), int(t.get("ckpt_every", 0))
        # checkpoints/last is refreshed at least this often, so a killed run loses minutes, not the run
        self.save_seconds, self.last_save = 60.0 * float(t.get("save_minutes") or 0), time.monotonic()
        self.max_bad, self.bad_run = int(t.get("max_nonfinite", 5)), 0
        self.interval = _Interval(self.device, len(self.source.mixture or []))
        self.progress = _Progress(self.max_steps, self.pos.step,
                                  enabled=self.dist.is_main and bool(t.get("progress", True)))
        self.monitor = Monitor(self.objective, self.source, t, self.device, self.max_len, self.autocast_dtype,
                               call=self.strategy.call(self.objective))
        self.objective.train()

    def train_step(self) -> _Step | None:
        """One optimizer step over ``accumulate`` micro-batches (under DDP the gradients are synchronised
        on the last one only), clipped; None where it was skipped: a non-finite loss or gradient norm on
        any rank skips it on every rank, and more than ``max_nonfinite`` in a row stop the run."""
        obj, pos, accum = self.objective, self.pos, self.accum
        lr = float(self.t["lr"]) * lr_factor(pos.step, **self.sched)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if accum > 1 and getattr(obj, "accumulates_features", False):
            batches = [self._next_batch() for _ in range(accum)]
            step_loss, metrics = accumulate.features(self.model, batches, self._precision, self._sync, self.device)
        else:
            batches_iter = (self._next_batch() for _ in range(accum))
            step_loss, metrics = accumulate.plain(self.model, batches_iter, accum, self._precision, self._sync,
                                                  self.device)
        clip = float(self.t.get("clip_grad", 0.0))
        norm = self.strategy.clip_grad_norm(obj, clip if clip > 0 else float("inf"))
        if any_true(~torch.isfinite(norm) | ~torch.isfinite(step_loss), self.dist):
            self.optimizer.zero_grad(set_to_none=True)
            pos.counters["skipped_steps"] += 1
            self.bad_run += 1
            self.logger.log({"step": pos.step, "event": "nonfinite_step_skipped",
                             "skipped_steps": pos.counters["skipped_steps"]})
            if self.bad_run > self.max_bad:
                raise TrainingError(f"{self.bad_run} non-finite steps in a row at step {pos.step}: lower "
                                    f"trainer.lr, check the data, or raise trainer.max_nonfinite")
            return None
        self.bad_run = 0
        obj.before_step(pos.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        obj.after_step(pos.step)
        pos.step += 1
        return _Step(lr, step_loss, metrics, norm)

    def log(self, done: _Step) -> None:
        """A finished step into the interval's averages; every ``log_every`` steps and at the last, the
        interval's record to metrics.jsonl (and TensorBoard) and the progress bar or line."""
        iv, step, mix = self.interval, self.pos.step, self.source.mixture
        for k, v in done.metrics.items():  # only finished steps enter the logged averages
            iv.sums[k] += v
        iv.sums["loss"] += done.loss
        iv.sums["grad_norm"] += done.norm.detach().float()
        iv.n += 1
        if not (step % self.log_every == 0 or step == self.max_steps):
            return
        dt = time.perf_counter() - iv.t0
        rec = {"step": step, "lr": done.lr, **{k: float(v) / iv.n for k, v in iv.sums.items()},
               "items_per_s": iv.items * self.dist.world / dt, **self.pos.counters}
        drawn = sum(iv.from_source)
        if mix and drawn:
            rec.update({f"source_frac/{p.label}": c / drawn for p, c in zip(mix, iv.from_source)})
            iv.from_source = [0] * len(mix)
        self.logger.log(rec)
        self.progress.update(step, rec)
        iv.reset()

    def evaluate(self) -> None:
        """The monitor's online evaluation where it is due; its time is left out of the throughput."""
        step = self.pos.step
        if self.monitor.due(step, self.max_steps):
            ev = self.monitor.evaluate(step)
            self.logger.log(ev)
            self.progress.note(describe(ev))
            self.interval.t0 += ev["eval_seconds"]  # throughput counts training time only

    def checkpoint(self) -> None:
        """checkpoints/step_N and checkpoints/last every ``ckpt_every`` steps, checkpoints/last every
        ``save_minutes`` (all ranks agree: rank 0's clock decides) and at the end. Atomic: every rank
        writes its RNG and data position into a temporary folder, rank 0 adds weights, optimizer and
        meta, then moves it into place under each name."""
        pos, every = self.pos, self.ckpt_every
        names = [f"step_{pos.step}"] if every and pos.step % every == 0 else []
        due = bool(self.save_seconds) and any_true(
            torch.tensor(self.dist.is_main and time.monotonic() - self.last_save >= self.save_seconds,
                         device=self.device), self.dist)
        if not (names or due or pos.step == self.max_steps):
            return
        names.append("last")
        self.last_save = time.monotonic()
        tmp = ckpt.tmp_dir(self.ckpt_root, f"step_{pos.step}")
        barrier(self.dist)
        failed: OSError | None = None
        sharded = self.strategy.sharded_checkpoints
        try:
            ckpt.write_rank_state(tmp, self.dist.rank, {"roles": {str(k): v for k, v in pos.roles.items()}})
        except OSError as e:
            failed = e
        if sharded and not any_true(torch.tensor(failed is not None, device=self.device), self.dist):
            try:  # every rank writes its own shards (torch.distributed.checkpoint) into the same folder
                ckpt.save_sharded(tmp, self.objective, self.optimizer)
            except OSError as e:
                failed = e
        barrier(self.dist)
        if self.dist.is_main and failed is None:
            meta = {"step": pos.step, "consumed_batches": pos.consumed, "world_size": self.dist.world,
                    "num_workers": self.workers, "strategy": self.strategy.name, **pos.counters}
            try:
                ckpt.finish(tmp, self.objective, self.optimizer, meta, names, self.ckpt_root, weights=not sharded)
            except OSError as e:
                failed = e
        # every rank learns of a failed write (a full disk): all stop together, none waits for a peer
        if any_true(torch.tensor(failed is not None, device=self.device), self.dist):
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # the partial one goes; the previous one is whole
            kept = ckpt.find(self.ckpt_root)
            still = f"{kept.name} (step {ckpt.step_of(kept)}) is intact" if kept else "no earlier checkpoint"
            why = (failed.strerror or str(failed)) if failed is not None else "on another rank"
            raise CheckpointWriteError(self.ckpt_root, f"writing the step-{pos.step} checkpoint failed ({why}); {still}")

    def export(self, which: str, step: int) -> None:
        """The towers (LoRA merged) under ``which``/ (encoders/, or encoders_init/ before training) and
        the objective's heads beside them (heads/, heads_init/)."""
        obj = self.objective
        towers, heads = obj.exported(), obj.heads()
        if fsdp.is_sharded(obj):
            # plain full safetensors whatever the strategy: the shards gathered onto rank 0 (every rank
            # takes part), so load_encoder and the evaluators read the same files
            full = fsdp.full_state(obj)
            if not self.dist.is_main:
                return
            towers = {m: fsdp.view_of(tw, obj, full) for m, tw in towers.items()}
            heads = {n: fsdp.view_of(h, obj, full) for n, h in heads.items()}
        elif not self.dist.is_main:
            return
        faults.point("export")
        extra: dict[str, Any] = {"objective": obj.name, "step": step}
        if self.cfg.get("init"):
            extra["init"] = str(self.cfg["init"])
        for m, tower in towers.items():
            save_encoder(exportable(tower), self.run_dir / which / m, extra=extra)  # type: ignore[arg-type]
        save_heads(heads, self.run_dir / which.replace("encoders", "heads"))

    # -- setup's helpers ------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    def _start(self) -> Path | None:
        """The checkpoint to resume from, or None: a fresh run, whose built weights are exported as
        encoders_init/ before init= (if any) loads its own; stale temporary checkpoints are cleared."""
        resume_from = ckpt.find(self.ckpt_root) if self.cfg.get("resume") else None
        if self.cfg.get("resume") and resume_from is None:
            raise ConfigError(f"resume=true: {self.ckpt_root} holds no checkpoint (the run stopped before its "
                              f"first one); start it again without resume=true")
        if resume_from is None:
            # the evaluators' random-init baseline: the freshly built weights, saved before init= may
            # load pretrained ones (a continued run's "random init" must not be its starting checkpoint)
            self.export("encoders_init", 0)
            if self.cfg.get("init"):
                self._load_init(str(self.cfg["init"]))
                self.objective.after_init()
        if self.dist.is_main:
            ckpt.remove_stale_tmp(self.ckpt_root)
        barrier(self.dist)
        return resume_from

    def _load_init(self, path: str) -> None:
        for m, tower in self.objective.encoders.items():
            src = load_encoder(path, modality=m)
            missing, unexpected = tower.load_state_dict(src.state_dict(), strict=False)
            if missing or unexpected:
                raise ValueError(f"init={path}: the {m} encoder does not match this model "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            self._say(f"[mmssl] initialised the {m} encoder from {src.source}")  # type: ignore[attr-defined]
        # the objective's heads too where the source run has them and they fit (a contrastive run's shared
        # space: its projections and temperature); others start fresh
        for name, head in self.objective.heads().items():
            f = Path(path) / "heads" / f"{name}.safetensors"
            if not f.exists():
                continue
            state = load_file(str(f))
            mine = head.state_dict()
            if set(state) == set(mine) and all(state[k].shape == mine[k].shape for k in state):
                head.load_state_dict(state)
                self._say(f"[mmssl] initialised the {name} head from {f}")
            else:
                self._say(f"[mmssl] {f} does not fit this objective's {name} head: it starts fresh")

    def _prepare_ctx(self) -> PrepareContext:
        bs = int(self.cfg["data"].get("eval_batch_size", 32))
        per_step = int(self.t["batch_size"]) * int(self.t.get("accumulate", 1)) * self.dist.world
        n_train = self.source.train_count()
        return PrepareContext(iter_split=lambda split: iter_split(self.source, split, bs),
                              device=self.device, run_dir=self.run_dir, cache_dir=self.cache_dir,
                              data_fingerprint=self.source.fingerprint, is_main=self.dist.is_main,
                              barrier=lambda: barrier(self.dist), total_steps=int(self.t["max_steps"]),
                              steps_per_epoch=max(n_train // per_step, 1))

    def _prepare(self) -> None:
        """The objective's own preparation (logged), the logger, the parameter-efficient mode (before the
        optimizer sees the towers and, on resume, before the checkpoint, which holds the LoRA factors, is
        loaded) and the records of the parameter counts and of the data mixture."""
        t, obj = self.t, self.objective
        info = obj.prepare(self._prepare_ctx())
        self.logger = MetricsLogger(self.run_dir, self.dist.is_main, bool(t.get("tensorboard", True)))
        if info:
            self.logger.log({"event": "prepare", **info})
            self._say("[mmssl] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in info.items()))
        peft = apply_peft(obj, t)
        obj.to(self.device)
        counts = parameter_counts(obj)
        self.logger.log({"event": "parameters", "peft": t.get("peft"), **peft, **counts})

        def pct(a: int, b: int) -> str:
            return f"{a:,} of {b:,} ({100 * a / max(b, 1):.1f}%)"

        how = (f" (trainer.peft=lora: LoRA rank {int(t.get('lora_rank', 8))} on {peft['lora_layers']} attention "
               f"projections, last {peft['unfreeze_last']} block(s) and the norms trained)" if peft else "")
        self._say(f"[mmssl] trainable parameters: encoders {pct(counts['trainable_encoder_params'], counts['encoder_params'])}"
                  f", overall {pct(counts['trainable_params'], counts['total_params'])}{how}")
        self._describe_mixture()

    def _describe_mixture(self) -> None:
        mix = self.source.mixture
        if not mix:
            return
        from mmssl.data.loader import mixture_probs

        probs = mixture_probs(self.source, int(self.t["batch_size"])).tolist()
        tot = sum(p.weight for p in mix)
        self.logger.log({"event": "data", "sources": [
            {"label": p.label, "root": str(p.source.root), "weight": p.weight, "draw_prob": q}
            for p, q in zip(mix, probs)]})
        self._say("[mmssl] data mixture: " + ", ".join(
            f"{p.label} {p.weight / tot:.0%} of batches (round draw p={q:.3f})" for p, q in zip(mix, probs))
            + f"; validation and probes use {mix[0].label}")

    def _resume(self, path: Path) -> _Position:
        """Weights, optimizer and this rank's RNG from the checkpoint at ``path``; the run's position."""
        if self.strategy.sharded_checkpoints:
            meta, rank_state = ckpt.load_sharded(path, self.objective, self.optimizer, self.dist.rank)
            if rank_state is None:  # more ranks than wrote it: this rank's stream and draws start fresh
                torch.manual_seed(int(self.t["seed"]) + 7919 * self.dist.rank)
                rank_state = {"roles": {}}
            if meta["world_size"] != self.dist.world:
                self._say(f"[mmssl] the checkpoint was written by {meta['world_size']} processes, this run has "
                          f"{self.dist.world}: the shards are redistributed; the data streams of ranks "
                          f"0..{min(meta['world_size'], self.dist.world) - 1} continue, others start")
        else:
            meta, rank_state = ckpt.load(path, self.objective, self.optimizer, self.dist.rank, self.device)
            if meta["world_size"] != self.dist.world:
                raise ValueError(f"checkpoint was written by {meta['world_size']} processes, not {self.dist.world} "
                                 f"(trainer.strategy=fsdp checkpoints resume at another world size)")
        if meta["num_workers"] != self.workers:
            raise ValueError(f"checkpoint was written with trainer.num_workers={meta['num_workers']}; "
                             f"resume with the same value for an identical stream")
        roles = {int(k): v for k, v in rank_state["roles"].items()}
        pos = _Position(meta["step"], meta["consumed_batches"], roles, {k: meta.get(k, 0) for k in COUNTERS})
        self._say(f"[mmssl] resumed from {path} at step {pos.step}")
        return pos

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.t
        return torch.optim.AdamW(
            param_groups(self.objective, float(t.get("weight_decay", 0.01))), lr=float(t["lr"]),
            betas=tuple(t.get("betas", (0.9, 0.98))), eps=float(t.get("eps", 1e-6)),
            fused=fused_adamw(self.device))

    def _wrap(self, fresh: bool) -> nn.Module:
        """The objective as the step calls it (``trainer.strategy``: DDP around it, or FSDP2 shards in
        place; activation checkpointing first) and, in a fresh distributed run, the other ranks'
        generators seeded apart."""
        self.strategy.prepare(self.objective)
        model = self.strategy.wrap(self.objective)
        if self.dist.enabled and fresh and self.dist.rank > 0:
            # other ranks draw their own masks and dropout; rank 0 keeps the single-process stream
            torch.manual_seed(int(self.t["seed"]) + 7919 * self.dist.rank)
        return model

    def _precision(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _sync(self, i: int, n: int) -> contextlib.AbstractContextManager:
        return self.strategy.sync(i, n)

    def _stream(self) -> Iterator[Batch]:
        """This rank's training batches, from the resumed position on."""
        t, pos, n_roles = self.t, self.pos, max(self.workers, 1)
        stream = TrainStream(self.source, int(t["batch_size"]), self.max_len, int(t["seed"]), self.dist.rank,
                             n_roles, role_shift=pos.consumed % n_roles,
                             start={k: tuple(v) for k, v in pos.roles.items()},
                             on_error=self.cfg["data"].get("on_error", "skip"),
                             bucket=self.objective.bucket_by_length)
        return iter(train_loader(stream, self.workers))

    # -- the step's and the end's helpers -------------------------------------------------------------
    def _next_batch(self) -> Batch:
        """The next micro-batch, on the device; its stream bookkeeping (the role's next position, items
        skipped as unreadable, a mixture's source) taken off into the position and the log interval."""
        batch = next(self.loader)
        pos, iv = self.pos, self.interval
        pos.roles[int(batch.pop("_role"))] = batch.pop("_next").tolist()
        pos.counters["skipped_samples"] += int(batch.pop("_bad"))
        if "_source" in batch:
            iv.from_source[int(batch.pop("_source"))] += 1
        pos.consumed += 1
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        iv.items += next(iter(batch.values())).shape[0]
        return batch

    def _plots(self) -> None:
        sched, init, lr = self.sched, self.cfg.get("init"), float(self.t["lr"])
        plot_loss(self.run_dir)
        plot_schedule(self.run_dir, [lr * lr_factor(s, **sched) for s in range(self.max_steps)],
                      phases(**sched), title=f"{sched['kind']} schedule" + (f", init={init}" if init else ""))


class _Progress:
    """A rich progress bar on a terminal; one plain line per log interval otherwise."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        info = f"loss {rec['loss']:.3f}  {rec['items_per_s']:.1f} items/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            print(f"[mmssl] step {step}  {info}  lr {rec['lr']:.2e}", file=sys.stderr, flush=True)

    def note(self, line: str) -> None:
        """A line above the bar (or on its own): evaluation results."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(f"[mmssl] {line}", markup=False, highlight=False)
        else:
            print(f"[mmssl] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
