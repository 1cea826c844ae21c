"""The ``mmssl`` command line.

  mmssl pretrain [-m] modality=speech objective=hubert [key=value ...]
  mmssl pretrain modality=[image,text] objective=clip|cloob   (modality=[speech,text] objective=clap)
  mmssl eval linear-probe|knn|finetune|layer-probe encoder=PATH [modality=M] [out=DIR] [data=...] [eval.seeds=N]
                          [eval.label_fraction=[0.01,0.1,1.0]] [eval.KEY=...]
  mmssl eval retrieval|zero-shot encoder=RUN [out=DIR] [data=...] [eval.split=test]
  mmssl report RUN_DIR [RUN_DIR ...] [out=DIR]
  mmssl extract encoder=PATH out=DIR [split=test] [eval.layer=-1]
  mmssl data pack modality=speech|image|text src=DIR|FILE.jsonl out=DIR [shards=8] [val=0.1] [test=0.2] [seed=0]
  mmssl data pack modality=[image,text] src=DIR|FILE.csv|FILE.jsonl out=DIR [file_column= caption_column=]
  mmssl reconstruct modality=mri encoder=RUN src=CASE_DIR out=DIR   (missing MRI contrasts, as NIfTI)
  mmssl convert hubert|timm SRC OUT [size= mean= std=]
  mmssl list

User errors end with exit code 2 and one line naming the valid choices (MMSSL_DEBUG=1 shows the
traceback)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

USAGE = __doc__.split("\n\n")[1]


class UsageError(ValueError):
    pass


def _set_threads(spec: Any, procs: int = 1) -> None:
    import torch

    n = max(1, (os.cpu_count() or 1) // max(procs, 1)) if spec in (None, "auto") else int(spec)
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def _kv(args: list[str], allowed: set[str]) -> dict[str, str]:
    out = {}
    for a in args:
        k, eq, v = a.partition("=")
        if not eq:
            raise UsageError(f"expected key=value, got {a!r}; keys: {', '.join(sorted(allowed))}")
        if k not in allowed:
            raise UsageError(f"unknown key {k!r}; keys: {', '.join(sorted(allowed))}")
        out[k] = v
    return out


# -- pretrain -----------------------------------------------------------------------------------------
def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's own override grammar: ``trainer.seed=0,1 trainer.lr=1e-4,3e-4`` -> 4 jobs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def cmd_pretrain(args: list[str]) -> int:
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    jobs = expand_sweep(overrides) if multirun else [overrides]
    for i, job in enumerate(jobs):
        if len(jobs) > 1:
            print(f"[mmssl] sweep job {i + 1}/{len(jobs)}: {' '.join(job)}", file=sys.stderr)
        pretrain(job, job_index=i if len(jobs) > 1 else None)
    return 0


def apply_trainer_defaults(cfg: Any, mods: list[str], overrides: list[str]) -> None:
    """Settings a modality recommends under an objective, applied where the command line does not set
    the key: training keys (``objectives.<name>.trainer`` in its config, e.g. text MLM's learning rate)
    and the tower's pooling (``objectives.<name>.pool``, e.g. mean pooling for image data2vec, whose
    loss never reaches the CLS token)."""
    from mmssl.factory import objective_defaults

    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    for m in mods:
        defaults = objective_defaults(to_plain(cfg.modality[m]), cfg.objective.name)
        for k, v in (defaults.get("trainer") or {}).items():
            if f"trainer.{k}" not in given:
                if k not in cfg.trainer:
                    raise ValueError(f"modality {m}: objectives.{cfg.objective.name}.trainer.{k} is not a trainer key")
                cfg.trainer[k] = v
        if defaults.get("pool") is not None and f"modality.{m}.pool" not in given:
            cfg.modality[m].pool = defaults["pool"]


ARCH_KEYS = ("size", "backbone", "adapter", "pool", "num_prefix", "open_clip")


def _arch_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two encoder configs describe different architectures: 'adapter.position: conv vs sinusoidal'."""
    return [d.replace(" -> ", " vs ") for d in _diff({k: a.get(k) for k in ARCH_KEYS}, {k: b.get(k) for k in ARCH_KEYS})]


def init_tower_config(m: str, init: str, built: dict[str, Any], overrides: list[str], objective: str,
                      record: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """The config of tower ``m`` of a run started with ``init=PATH``: the source encoder's own config.json
    (so a HuBERT speech encoder stays a HuBERT encoder under MAE, and the size is the source's), with the
    command line's explicit ``model.*`` and ``modality.<m>.{adapter,backbone}.*`` keys on top (``built``:
    what this run's config alone would build). On resume ``record`` (the run's ``encoders_init/``) is
    read instead of the source, which may have changed since. -> (config, a one-line note or None)."""
    from mmssl.export import resolve_encoder_dir

    rec = record / m / "config.json" if record is not None else None
    recorded = rec is not None and rec.exists()
    if recorded:
        src, where = json.loads(rec.read_text()), rec.parent
    else:
        where = resolve_encoder_dir(Path(init), m)
        src = json.loads((where / "config.json").read_text())
        if src.get("modality") != m:
            raise UsageError(f"init={init} holds a {src.get('modality')!r} encoder, not {m!r}")
    cfg = {k: v for k, v in src.items() if k not in ("preprocessing", "objective", "step", "init")}
    cfg = json.loads(json.dumps(cfg))  # a deep copy
    given = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    for key, value in given.items():
        if key in ("model", f"modality.{m}.size") and built["size"] != src.get("size"):
            raise UsageError(f"{key}={value}: with init= the {m} encoder keeps its size ({src.get('size')}, "
                             f"{where}); remove {key}")
        head, _, k = key.rpartition(".")
        if head == "model" and k != "name":
            cfg["backbone"][k] = built["backbone"][k]
        elif head in (f"modality.{m}.adapter", f"modality.{m}.backbone"):
            part = head.rpartition(".")[2]
            if k in built.get(part, {}):
                cfg.setdefault(part, {})[k] = built[part][k]
        elif key in (f"modality.{m}.pool", f"modality.{m}.num_prefix"):
            cfg[k] = built[k]
    note = None
    diff = _arch_diff(cfg, built)
    if diff:
        trained = f" (init={init})" if recorded else (f" (trained with {src['objective']})" if src.get("objective") else "")
        note = (f"[mmssl] init: the {m} encoder keeps the architecture {'recorded in' if recorded else 'of'} {where}"
                f"{trained}, not the one {objective} would build: "
                + "; ".join(diff[:4]) + (f"; +{len(diff) - 4} more" if len(diff) > 4 else ""))
    return cfg, note


def to_plain(node: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def pretrain(overrides: list[str], job_index: int | None = None) -> Path:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from mmssl.config import cache_dir, check_pair, compose, modalities_of, to_dict
    from mmssl.data.loader import resolve_source
    from mmssl.factory import build_encoder, build_objective, encoder_config
    from mmssl.train.distributed import init_distributed, shutdown
    from mmssl.train.trainer import Trainer

    cfg = compose(overrides)
    check_pair(cfg)
    mods = modalities_of(cfg)
    apply_trainer_defaults(cfg, mods, overrides)
    if cfg.resume:
        if not cfg.run_dir or not Path(cfg.run_dir).is_dir():
            raise UsageError("resume=true needs run_dir=PATH of an existing run")
        saved = OmegaConf.load(Path(cfg.run_dir) / "config.yaml")
        ignore = {"resume", "allow_config_change", "cache_dir", "run_dir"}  # a moved run is the same run
        old = {k: v for k, v in OmegaConf.to_container(saved, resolve=True).items() if k not in ignore}
        new = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
        if old != new and not cfg.allow_config_change:
            diff = _diff(old, new)
            raise UsageError(f"the config differs from the saved run ({'; '.join(diff[:4])}); "
                             f"pass allow_config_change=true to resume anyway")
    want = cfg.trainer.device
    kind = "cuda" if (want == "cuda" or (want == "auto" and torch.cuda.is_available())) else "cpu"
    info = init_distributed(kind)
    finished = False
    try:
        _set_threads(cfg.trainer.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        run_dir = cfg.run_dir
        if not run_dir:
            run_dir = f"runs/{'+'.join(mods)}-{cfg.objective.name}/{time.strftime('%Y%m%d-%H%M%S')}"
            if info.enabled:  # every rank must write into rank 0's folder
                box = [run_dir]
                dist.broadcast_object_list(box, src=0)
                run_dir = box[0]
        if job_index is not None:
            run_dir = f"{run_dir}/job{job_index}"
        run_dir = Path(run_dir)
        cfg.run_dir = str(run_dir)
        cache = cache_dir(cfg)
        torch.manual_seed(int(cfg.trainer.seed))
        source = resolve_source(to_dict(cfg.data), mods, cfg.modality[mods[0]].get("preset"), cache)
        model_over = to_dict(cfg.model)
        mod_cfgs = {m: to_dict(cfg.modality[m]) for m in mods}
        # each tower its own size (modality.<m>.size), else model=
        enc_cfgs = {m: encoder_config(m, mod_cfgs[m].get("size") or cfg.model.name, mod_cfgs[m], model_over,
                                      cfg.objective.name) for m in mods}
        if cfg.init:  # continual pretraining: each tower as the source encoder was built
            record = run_dir / "encoders_init" if cfg.resume else None
            for m in mods:
                enc_cfgs[m], note = init_tower_config(m, str(cfg.init), enc_cfgs[m], overrides, cfg.objective.name,
                                                      record)
                if note and info.is_main:
                    print(note, file=sys.stderr)
        encoders = {m: build_encoder(enc_cfgs[m]) for m in mods}
        objective = build_objective(cfg.objective.name, to_dict(cfg.objective), encoders, mod_cfgs)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume or not (run_dir / "config.yaml").exists() or cfg.allow_config_change:
                OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            n = sum(p.numel() for p in objective.parameters())
            size = ("+".join(enc_cfgs[m]["size"] for m in mods) + f" from init={cfg.init}") if cfg.init else cfg.model.name
            print(f"[mmssl] pretrain {'+'.join(mods)} with {cfg.objective.name}, model={size} "
                  f"({n / 1e6:.2f}M parameters), data={source.root}, run_dir={run_dir}", file=sys.stderr)
        # per tower: the modality config's crop size, else the input size its encoder declares (an image
        # side); a library tower (open_clip) always takes the size it was built for
        max_len = {m: mod_cfgs[m].get("max_len") if mod_cfgs[m].get("max_len") is not None
                   and "open_clip" not in encoders[m].config
                   else encoders[m].config["preprocessing"].get("max_len") for m in mods}
        if cfg.init:  # a tower built as its source: the source's input size unless the command line sets one
            given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
            for m in mods:
                own = encoders[m].config["preprocessing"].get("max_len")
                if own is not None and f"modality.{m}.max_len" not in given:
                    max_len[m] = own
        result = Trainer(to_dict(cfg), objective, source, run_dir, info, cache, max_len).fit()
        if info.is_main:
            print(f"[mmssl] done: {result['step']} steps, {result['skipped_steps']} skipped steps, "
                  f"{result['skipped_samples']} skipped samples; encoders in {run_dir / 'encoders'}",
                  file=sys.stderr)
        finished = True
        return run_dir
    finally:
        shutdown(info, wait_for_peers=finished)  # after an error a peer may never arrive: no barrier


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


# -- evaluation ---------------------------------------------------------------------------------------
def _encoder_dir(args: list[str]) -> Path:
    """The export named by ``encoder=`` (a run directory or an export); ``modality=`` picks the tower
    of a run with several."""
    from mmssl.export import resolve_encoder_dir

    given = [a.split("=", 1)[1] for a in args if a.startswith("encoder=")]
    if not given or not given[-1]:
        raise UsageError("needs encoder=PATH (a run directory or an exported encoder)")
    mods = [a.split("=", 1)[1] for a in args if a.startswith("modality=")]
    return resolve_encoder_dir(Path(given[-1]), mods[-1] if mods else None)


def _default_out(enc_dir: Path) -> Path:
    """RUN/eval for a run's export (RUN/eval/<m> when the run has several towers), else EXPORT/eval:
    never inside RUN/encoders/, which the next export replaces."""
    if enc_dir.parent.name == "encoders":
        towers = [p for p in enc_dir.parent.iterdir() if (p / "config.json").exists() and not p.name.startswith(".")]
        run = enc_dir.parent.parent
        return run / "eval" if len(towers) <= 1 else run / "eval" / enc_dir.name
    return enc_dir / "eval"


def _first_source(source: Any) -> Any:
    """Evaluation of a mixture (``data.sources``) reads its first source."""
    if source.mixture:
        print(f"[mmssl] data.sources: evaluating on the first source, {source.mixture[0].label} ({source.root})",
              file=sys.stderr)
        return source.primary
    return source


def _eval_setup(args: list[str]) -> tuple[Any, Any, Path, Any]:
    import torch

    from mmssl.config import cache_dir, compose, to_dict
    from mmssl.data.loader import resolve_source

    enc_dir = _encoder_dir(args)
    modality = json.loads((enc_dir / "config.json").read_text())["modality"]
    # the encoder names its modality: compose with it, so that modality.<m>.* keys exist
    cfg = compose([a for a in args if not a.startswith("modality=")] + [f"modality={modality}"])
    _set_threads(cfg.trainer.threads)
    source = _first_source(resolve_source(to_dict(cfg.data), [modality], cfg.modality[modality].get("preset"),
                                          cache_dir(cfg)))
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu")
    return cfg, source, enc_dir, device


EVALUATORS = {  # command -> (config in configs/eval/, module, function)
    "linear-probe": ("linear_probe", "mmssl.eval.linear_probe", "run_linear_probe"),
    "knn": ("knn", "mmssl.eval.knn", "run_knn"),
    "finetune": ("finetune", "mmssl.eval.finetune", "run_finetune"),
    "layer-probe": ("layer_probe", "mmssl.eval.layer_probe", "run_layer_probe"),
    "retrieval": ("retrieval", "mmssl.eval.retrieval", "run_retrieval"),
    "zero-shot": ("zero_shot", "mmssl.eval.zero_shot", "run_zero_shot"),
}
#: evaluators of a pair of towers in a shared space (a contrastive run), not of one encoder
PAIR_EVALUATORS = ("retrieval", "zero-shot")


def _pair_setup(args: list[str]) -> tuple[Any, Any, Path, Any]:
    """A contrastive run (``encoder=RUN``): its two modalities, in their order, and paired data."""
    import torch

    from mmssl.config import cache_dir, compose, to_dict
    from mmssl.data.loader import resolve_source

    given = [a.split("=", 1)[1] for a in args if a.startswith("encoder=")]
    if not given or not given[-1]:
        raise UsageError("needs encoder=RUN (the run directory of a clip, clap or cloob run)")
    run = Path(given[-1])
    head = run / "heads" / "contrastive.json"
    if not head.exists():
        raise UsageError(f"{run} is not the run directory of a contrastive run (no heads/contrastive.json)")
    mods = json.loads(head.read_text())["modalities"]
    for a in args:
        if a.startswith(("model.", "modality.")) and not a.startswith(tuple(f"modality.{m}.preset" for m in mods)):
            raise UsageError(f"{a.split('=')[0]} describes the encoders, which evaluation reads from {run}; remove it")
    cfg = compose([a for a in args if not a.startswith("modality=")] + [f"modality=[{','.join(mods)}]"])
    _set_threads(cfg.trainer.threads)
    source = _first_source(resolve_source(to_dict(cfg.data), mods, None, cache_dir(cfg)))
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu")
    return cfg, source, run, device


def check_preprocessing(args: list[str], saved: dict[str, Any], where: Path) -> None:
    """Evaluation feeds an encoder the preprocessing it was trained with, read from its config.json.
    A command-line key that would describe the encoder differently is refused, not silently ignored."""
    import yaml

    m = saved["modality"]
    for a in args:
        key, eq, raw = a.lstrip("+~").partition("=")
        if not eq:
            continue
        if key.startswith(f"modality.{m}.adapter."):
            k = key[len(f"modality.{m}.adapter."):]
            have = saved.get("adapter", {}).get(k, saved.get("preprocessing", {}).get(k))
        elif key == f"modality.{m}.max_len":
            have = saved.get("preprocessing", {}).get("max_len")
        elif key.startswith(("model.", f"modality.{m}.")) and key != f"modality.{m}.preset":
            raise UsageError(f"{key} describes the encoder, which evaluation reads from {where}/config.json; "
                             f"remove it (evaluate another encoder to change it)")
        else:
            continue
        try:
            given = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UsageError(f"{key}={raw}: not a value") from None
        if given != have:
            raise UsageError(f"{key}={raw} differs from the preprocessing the encoder was trained with "
                             f"({have!r}, {where}/config.json): evaluation uses the saved preprocessing")


def probe_pool_defaults(ecfg: dict[str, Any], modality_cfg: dict[str, Any]) -> dict[str, Any]:
    """An evaluator that takes several poolings (``eval.pools``: the linear probe) and was given none
    reads the modality's ``probe_pools`` (MRI: ``meanmax``, the mean and the max side by side: a small
    lesion is lost in a mean over the head), the same for the trained and the step-0 encoder; without
    one, the encoder's own pool."""
    if "pools" in ecfg and ecfg["pools"] in (None, []) and modality_cfg.get("probe_pools"):
        return {**ecfg, "pools": [str(p) for p in modality_cfg["probe_pools"]]}
    return ecfg


def cmd_eval(args: list[str]) -> int:
    import importlib

    if not args or args[0] not in EVALUATORS:
        raise UsageError("usage: mmssl eval {" + "|".join(EVALUATORS) + "} encoder=PATH [out=DIR] [data=...] [eval.KEY=...]")
    from mmssl.config import cache_dir, to_dict

    cfg_name, module, fn = EVALUATORS[args[0]]
    rest = list(args[1:])
    if not any(a.startswith("eval=") for a in rest):
        rest.insert(0, f"eval={cfg_name}")

    if args[0] in PAIR_EVALUATORS:
        cfg, source, enc_dir, device = _pair_setup(rest)
        out = Path(cfg.out) if cfg.out else enc_dir / "eval"
        ecfg = to_dict(cfg.eval)
    else:
        d = _encoder_dir(rest)  # checked before composing: the keys may not exist in the default modality's config
        saved = json.loads((d / "config.json").read_text())
        check_preprocessing(rest, saved, d)
        cfg, source, enc_dir, device = _eval_setup(rest)
        out = Path(cfg.out) if cfg.out else _default_out(enc_dir)
        ecfg = probe_pool_defaults(to_dict(cfg.eval), to_dict(cfg.modality[saved["modality"]]))
    run = getattr(importlib.import_module(module), fn)
    run(enc_dir, out, source, ecfg, device, int(cfg.data.eval_batch_size), cache_dir(cfg))
    return 0


def cmd_report(args: list[str]) -> int:
    from mmssl.eval.report import main_report

    runs = [a for a in args if "=" not in a]
    kv = _kv([a for a in args if "=" in a], {"out"})
    if not runs:
        raise UsageError("usage: mmssl report RUN_DIR [RUN_DIR ...] [out=DIR]")
    for r in runs:
        if not Path(r).is_dir():
            raise UsageError(f"{r} is not a directory")
    path = main_report([Path(r) for r in runs], Path(kv.get("out", "report")))
    print(f"wrote {path}")
    return 0


def cmd_extract(args: list[str]) -> int:
    import numpy as np

    from mmssl.eval.features import encoder_fn, extract, input_size
    from mmssl.export import load_encoder

    cfg, source, enc_dir, device = _eval_setup(args)
    if not cfg.out:
        raise UsageError("needs out=DIR")
    enc = load_encoder(enc_dir, device=device)
    x, y, ids = extract(encoder_fn(enc, int(cfg.eval.layer)), source, cfg.split, device, int(cfg.data.eval_batch_size),
                        max_len=input_size(enc))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "features.npy", x.numpy())
    np.save(out / "labels.npy", y.numpy())
    np.save(out / "sample_ids.npy", ids.numpy())
    (out / "features.json").write_text(json.dumps({"encoder": str(enc_dir), "split": cfg.split, "layer": int(cfg.eval.layer),
                                                   "shape": list(x.shape), "data": str(source.root)}, indent=2))
    print(f"wrote {x.shape[0]} x {x.shape[1]} features of split {cfg.split!r} to {out}/features.npy")
    return 0


# -- data, convert, list ------------------------------------------------------------------------------
def cmd_data(args: list[str]) -> int:
    if not args or args[0] != "pack":
        raise UsageError("usage: mmssl data pack modality=M|[M,text] src=DIR|FILE out=DIR [shards=8] [val=0.1] "
                         "[test=0.2] [seed=0]")
    from mmssl.data.pack import pack

    kv = _kv(args[1:], {"modality", "src", "out", "shards", "val", "test", "seed", "file_column", "caption_column"})
    for k in ("modality", "src", "out"):
        if k not in kv:
            raise UsageError(f"data pack needs {k}=...")
    opts = {"num_shards": int(kv.get("shards", 8)), "val": float(kv.get("val", 0.1)),
            "test": float(kv.get("test", 0.2)), "seed": int(kv.get("seed", 0))}
    if kv["modality"].startswith("["):  # pairs: a file modality with text captions
        from mmssl.data.pack_pairs import pack_pairs

        mods = [m.strip() for m in kv["modality"].strip("[]").split(",") if m.strip()]
        report = pack_pairs(mods, Path(kv["src"]), Path(kv["out"]), file_column=kv.get("file_column"),
                            caption_column=kv.get("caption_column"), **opts)
    else:
        if "file_column" in kv or "caption_column" in kv:
            raise UsageError("file_column= and caption_column= are for pairs: modality=[image,text]")
        report = pack(kv["modality"], Path(kv["src"]), Path(kv["out"]), **opts)
    counts = ", ".join(f"{s} {v['count']}" for s, v in report["splits"].items())
    bad = report["bad_samples"]
    print(f"packed {counts} ({len(report['classes'])} classes) into {kv['out']}; "
          f"skipped {sum(bad.values())} bad files{': ' + json.dumps(bad) if bad else ''}")
    for line in report.get("bad_files", [])[:20]:
        print(f"  skipped {line}")
    return 0


def cmd_convert(args: list[str]) -> int:
    kinds = {"hubert": "a torchaudio HuBERT state_dict", "timm": "a timm ViT state_dict"}
    pos = [a for a in args if "=" not in a]
    if len(pos) != 3 or pos[0] not in kinds:
        raise UsageError("usage: mmssl convert {hubert|timm} SRC OUT [size=tiny|small|base] [mean=R,G,B std=R,G,B]"
                         "  (SRC: " + "; ".join(f"{k}: {v}" for k, v in kinds.items()) + ", saved with torch.save)")
    if pos[0] == "hubert":
        from mmssl.convert.hubert import convert_hubert_file

        _kv([a for a in args if "=" in a], set())
        out = convert_hubert_file(Path(pos[1]), Path(pos[2]))
    else:
        from mmssl.convert.timm import convert_timm

        kv = _kv([a for a in args if "=" in a], {"size", "mean", "std"})
        # timm's augreg / CLIP-derived ViTs expect 0.5/0.5 normalisation instead of ImageNet's
        triple = {k: [float(x) for x in kv[k].strip("[]").split(",")] for k in ("mean", "std") if k in kv}
        out = convert_timm(Path(pos[1]), Path(pos[2]), size=kv.get("size"), **triple)
    print(f"converted {pos[1]} -> {out} (load with mmssl.load_encoder({str(out)!r}))")
    return 0


def cmd_list(args: list[str]) -> int:
    from mmssl.config import group_options
    from mmssl.factory import supported_pairs
    from mmssl.registry import MODALITIES, OBJECTIVES, PRESETS
    from mmssl.sizes import SIZES

    print("modalities:  " + ", ".join(MODALITIES.names()))
    print("objectives:  " + ", ".join(OBJECTIVES.names()))
    print("data:        " + ", ".join(group_options("data")) + "  (presets: " + ", ".join(PRESETS.names()) + ")")
    print("model sizes: " + ", ".join(f"{k} ({v['depth']}x{v['dim']})" for k, v in SIZES.items()))
    print("supported:")
    for obj, mods in supported_pairs().items():
        print(f"  objective={obj}: " + (", ".join(f"modality={m}" for m in mods) or "-"))
    return 0


def cmd_reconstruct(args: list[str]) -> int:
    """``mmssl reconstruct modality=mri encoder=RUN src=CASE out=DIR``: what an MAE run's decoder predicts
    for the parts a sample lacks (an MRI case's missing contrasts), written as the modality's files."""
    import importlib

    import torch

    kv = _kv(args, {"modality", "encoder", "src", "out", "device"})
    for k in ("modality", "encoder", "src", "out"):
        if k not in kv:
            raise UsageError(f"reconstruct needs {k}=...  (mmssl reconstruct modality=mri encoder=RUN src=CASE out=DIR)")
    try:
        mod = importlib.import_module(f"mmssl.modalities.{kv['modality']}.reconstruct")
    except ModuleNotFoundError as e:
        if e.name not in (f"mmssl.modalities.{kv['modality']}", f"mmssl.modalities.{kv['modality']}.reconstruct"):
            raise  # a dependency of the module, not the module: say what is missing
        raise UsageError(f"modality {kv['modality']!r} has no reconstruction (mri has)") from None
    want = kv.get("device", "auto")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    written = mod.reconstruct(Path(kv["encoder"]), Path(kv["src"]), Path(kv["out"]), device=device)
    print(f"reconstructed into {kv['out']}: {json.dumps(written, default=str)}")
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "eval": cmd_eval, "extract": cmd_extract, "data": cmd_data,
            "convert": cmd_convert, "report": cmd_report, "list": cmd_list, "reconstruct": cmd_reconstruct}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"mmssl: error: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from mmssl.config import ConfigError
    from mmssl.train.trainer import TrainingError

    try:
        return COMMANDS[cmd](argv[1:])
    except (ConfigError, UsageError, KeyError, ValueError, OSError) as e:
        if os.environ.get("MMSSL_DEBUG"):
            raise
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        # an error raised in a loader worker arrives as "Caught X in DataLoader worker ..." + traceback
        line = lines[-1] if lines and lines[0].startswith("Caught ") else (lines[0] if lines else type(e).__name__)
        print(f"mmssl: error: {line}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"mmssl: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
