"""``mmssl pretrain``: build a resolved run (``mmssl.config.RunSpec``) and train it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mmssl.config import RunSpec


def pretrain(spec: RunSpec) -> Path:
    """Train the run ``spec`` describes; -> its run directory (encoders in ``RUN/encoders/``)."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from mmssl.config import cache_dir, device_kind, set_threads, to_dict
    from mmssl.data.loader import resolve_source
    from mmssl.factory import build_encoder, build_objective
    from mmssl.train.distributed import init_distributed, shutdown
    from mmssl.train.trainer import Trainer

    cfg, mods = spec.cfg, spec.modalities
    info = init_distributed(device_kind(cfg.trainer.device))
    finished = False
    try:
        set_threads(cfg.trainer.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        run_dir = cfg.run_dir
        if not run_dir:
            run_dir = spec.default_run_dir()
            if info.enabled:  # every rank must write into rank 0's folder
                box = [run_dir]
                dist.broadcast_object_list(box, src=0)
                run_dir = box[0]
        run_dir = spec.set_run_dir(run_dir)
        cache = cache_dir(cfg)
        torch.manual_seed(int(cfg.trainer.seed))
        source = resolve_source(to_dict(cfg.data), mods, cfg.modality[mods[0]].get("preset"), cache)
        enc_cfgs = spec.encoder_configs(run_dir)
        if info.is_main:
            for note in spec.notes:
                print(note, file=sys.stderr)
        encoders = {m: build_encoder(enc_cfgs[m]) for m in mods}
        objective = build_objective(spec.objective, to_dict(cfg.objective), encoders, spec.modality_cfgs)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume or not (run_dir / "config.yaml").exists() or cfg.allow_config_change:
                OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            n = sum(p.numel() for p in objective.parameters())
            size = ("+".join(enc_cfgs[m]["size"] for m in mods) + f" from init={cfg.init}") if cfg.init else cfg.model.name
            print(f"[mmssl] pretrain {'+'.join(mods)} with {spec.objective}, model={size} "
                  f"({n / 1e6:.2f}M parameters), {cfg.trainer.max_steps} steps, data={source.root}, "
                  f"run_dir={run_dir}", file=sys.stderr)
        result = Trainer(to_dict(cfg), objective, source, run_dir, info, cache, spec.input_sizes(encoders)).fit()
        if info.is_main:
            print(f"[mmssl] done: {result['step']} steps, {result['skipped_steps']} skipped steps, "
                  f"{result['skipped_samples']} skipped samples; encoders in {run_dir / 'encoders'}",
                  file=sys.stderr)
        finished = True
        return run_dir
    finally:
        shutdown(info, wait_for_peers=finished)  # after an error a peer may never arrive: no barrier
