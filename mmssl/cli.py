"""The ``mmssl`` command line: it parses and dispatches; ``mmssl.config`` resolves every default.

  mmssl pretrain [-m] modality=M objective=O [key=value ...]          (mmssl list: the choices)
  mmssl pretrain modality=[A,B] objective=O                          (a contrastive pair of towers)
  mmssl eval linear-probe|knn|finetune|layer-probe encoder=PATH [modality=M] [out=DIR] [data=...] [eval.seeds=N]
                          [eval.label_fraction=[0.01,0.1,1.0]] [eval.KEY=...]
  mmssl eval retrieval|zero-shot encoder=RUN [out=DIR] [data=...] [eval.split=test]
  mmssl report RUN_DIR [RUN_DIR ...] [out=DIR]
  mmssl extract encoder=PATH out=DIR [split=test] [eval.layer=-1]
  mmssl data pack modality=M src=DIR|FILE out=DIR [shards=N] [val=F] [test=F] [seed=N] [group=DEPTH]
  mmssl data fetch NAME [cache_dir=DIR] [force=true]                 (a real set; then data=real-NAME)
  mmssl data pack modality=[A,B] src=DIR|FILE.csv|FILE.jsonl out=DIR [file_column= caption_column=]  (captions)
  mmssl reconstruct modality=M encoder=RUN src=CASE_DIR out=DIR      (the parts a sample lacks)
  mmssl convert SRC OUT [format=auto|fairseq|hf|torchaudio|timm] [modality=M] [key=value ...]
                                                                     (format auto: detected and named)
  mmssl export hf|timm RUN OUT [modality=M] [key=value ...]          (to transformers / timm)
  mmssl list

User errors end with exit code 2 and one line naming the valid choices (MMSSL_DEBUG=1 shows the
traceback)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

USAGE = __doc__.split("\n\n")[1]


def _kv(args: list[str], allowed: set[str] | tuple[str, ...]) -> dict[str, str]:
    from mmssl.config import UsageError

    out = {}
    for a in args:
        k, eq, v = a.partition("=")
        if not eq:
            raise UsageError(f"expected key=value, got {a!r}; keys: {', '.join(sorted(allowed))}")
        if k not in allowed:
            raise UsageError(f"unknown key {k!r}; keys: {', '.join(sorted(allowed))}")
        out[k] = v
    return out


def _need(kv: dict[str, str], keys: tuple[str, ...], usage: str) -> None:
    from mmssl.config import UsageError

    for k in keys:
        if k not in kv:
            raise UsageError(f"needs {k}=...  ({usage})")


# -- pretrain -----------------------------------------------------------------------------------------
def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's own override grammar: ``trainer.seed=0,1 trainer.lr=1e-4,3e-4`` -> 4 jobs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def cmd_pretrain(args: list[str]) -> int:
    from mmssl.config import resolve
    from mmssl.pretrain import pretrain

    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    jobs = expand_sweep(overrides) if multirun else [overrides]
    for i, job in enumerate(jobs):
        if len(jobs) > 1:
            print(f"[mmssl] sweep job {i + 1}/{len(jobs)}: {' '.join(job)}", file=sys.stderr)
        pretrain(resolve(job, job_index=i if len(jobs) > 1 else None))
    return 0


# -- evaluation ---------------------------------------------------------------------------------------
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


def cmd_eval(args: list[str]) -> int:
    import importlib

    from mmssl.config import UsageError, resolve_eval, resolve_pair_eval

    if not args or args[0] not in EVALUATORS:
        raise UsageError("usage: mmssl eval {" + "|".join(EVALUATORS) + "} encoder=PATH [out=DIR] [data=...] [eval.KEY=...]")
    cfg_name, module, fn = EVALUATORS[args[0]]
    resolve_spec = resolve_pair_eval if args[0] in PAIR_EVALUATORS else resolve_eval
    spec = resolve_spec(list(args[1:]), cfg_name)
    run = getattr(importlib.import_module(module), fn)
    run(spec.encoder, spec.out, spec.source, spec.ecfg, spec.device, int(spec.cfg.data.eval_batch_size), spec.cache)
    return 0


def cmd_report(args: list[str]) -> int:
    from mmssl.config import UsageError
    from mmssl.eval.report import main_report

    runs = [a for a in args if "=" not in a]
    kv = _kv([a for a in args if "=" in a], {"out"})
    if not runs:
        raise UsageError("usage: mmssl report RUN_DIR [RUN_DIR ...] [out=DIR]")
    for r in runs:
        if not Path(r).is_dir():
            raise UsageError(f"{r} is not a directory")
    path = main_report([Path(r) for r in runs], kv.get("out"))
    print(f"wrote {path}")
    return 0


def cmd_extract(args: list[str]) -> int:
    import numpy as np

    from mmssl.config import UsageError, resolve_eval
    from mmssl.eval.features import encoder_fn, extract, input_size
    from mmssl.export import load_encoder

    spec = resolve_eval(args)
    cfg = spec.cfg
    if not cfg.out:
        raise UsageError("needs out=DIR")
    enc = load_encoder(spec.encoder, device=spec.device)
    x, y, ids = extract(encoder_fn(enc, int(cfg.eval.layer)), spec.source, cfg.split, spec.device,
                        int(cfg.data.eval_batch_size), max_len=input_size(enc))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "features.npy", x.numpy())
    np.save(out / "labels.npy", y.numpy())
    np.save(out / "sample_ids.npy", ids.numpy())
    (out / "features.json").write_text(json.dumps({"encoder": str(spec.encoder), "split": cfg.split,
                                                   "layer": int(cfg.eval.layer), "shape": list(x.shape),
                                                   "data": str(spec.source.root)}, indent=2))
    print(f"wrote {x.shape[0]} x {x.shape[1]} features of split {cfg.split!r} to {out}/features.npy")
    return 0


# -- data, convert, list ------------------------------------------------------------------------------
PACK_KEYS = {"shards": ("num_shards", int), "val": ("val", float), "test": ("test", float), "seed": ("seed", int),
             "group": ("group_level", int)}
PAIR_KEYS = ("file_column", "caption_column")


def cmd_data(args: list[str]) -> int:
    from mmssl.config import UsageError
    from mmssl.data.pack import MAX_PRINTED, pack

    usage = "mmssl data pack modality=M|[M,text] src=DIR|FILE out=DIR [shards=] [val=] [test=] [seed=] [group=]"
    if args and args[0] == "fetch":
        return cmd_fetch(args[1:])
    if not args or args[0] != "pack":
        raise UsageError(f"usage: {usage}  |  mmssl data fetch NAME")
    kv = _kv(args[1:], {"modality", "src", "out", *PACK_KEYS, *PAIR_KEYS})
    _need(kv, ("modality", "src", "out"), usage)
    opts = {name: cast(kv[k]) for k, (name, cast) in PACK_KEYS.items() if k in kv}
    if kv["modality"].startswith("["):  # pairs: a file modality with text captions
        from mmssl.data.pack_pairs import pack_pairs

        mods = [m.strip() for m in kv["modality"].strip("[]").split(",") if m.strip()]
        report = pack_pairs(mods, Path(kv["src"]), Path(kv["out"]), **opts, **{k: kv[k] for k in PAIR_KEYS if k in kv})
    else:
        if any(k in kv for k in PAIR_KEYS):
            raise UsageError(f"{' and '.join(f'{k}=' for k in PAIR_KEYS)} are for pairs: modality=[M,text]")
        report = pack(kv["modality"], Path(kv["src"]), Path(kv["out"]), **opts)
    counts = ", ".join(f"{s} {v['count']}" for s, v in report["splits"].items())
    bad = report["bad_samples"]
    print(f"packed {counts} ({len(report['classes'])} classes) into {kv['out']}; "
          f"skipped {sum(bad.values())} bad files{': ' + json.dumps(bad) if bad else ''}")
    for line in report["bad_files"][:MAX_PRINTED]:
        print(f"  skipped {line}")
    return 0


def cmd_fetch(args: list[str]) -> int:
    """``mmssl data fetch NAME``: install, record the licence of and pack a real set (mmssl.data.fetch)."""
    from mmssl.config import UsageError
    from mmssl.data.fetch import REAL_SETS, fetch
    from mmssl.registry import load_builtins

    names = [a for a in args if "=" not in a]
    kv = _kv([a for a in args if "=" in a], {"cache_dir", "force"})
    if len(names) != 1:
        load_builtins()  # registers the sets, to name them
        raise UsageError(f"usage: mmssl data fetch NAME [cache_dir=DIR] [force=true]; names: {', '.join(sorted(REAL_SETS))}")
    fetch(names[0], cache_dir_of(kv.get("cache_dir")), force=kv.get("force") == "true")
    return 0


def cache_dir_of(given: str | None) -> Path:
    from omegaconf import OmegaConf

    from mmssl.config import cache_dir

    return cache_dir(OmegaConf.create({"cache_dir": given}))


def cmd_convert(args: list[str]) -> int:
    """``mmssl convert SRC OUT [format=auto|NAME] [modality=M] [key=value ...]``; the older
    ``mmssl convert NAME SRC OUT`` spelling stays (``mmssl.convert``: the formats, aliases, detection)."""
    from mmssl.config import UsageError
    from mmssl.convert import ALIASES, CONVERTERS, convert

    pos = [a for a in args if "=" not in a]
    kv = _kv([a for a in args if "=" in a], {"format", "modality", *{k for c in CONVERTERS.values() for k in c.keys}})
    if len(pos) == 3 and (pos[0] in CONVERTERS or pos[0] in ALIASES) and "format" not in kv:
        kv["format"], pos = pos[0], pos[1:]
    if len(pos) != 2:
        raise UsageError("usage: mmssl convert SRC OUT [format=auto|" + "|".join(CONVERTERS) + "] [modality=M] "
                         "[key=value ...]  (SRC: " + "; ".join(
                             f"{k}: {c.reads}" + (f" [{'= '.join(c.keys)}=]" if c.keys else "")
                             for k, c in CONVERTERS.items()) + ")")
    fmt, modality = kv.pop("format", "auto"), kv.pop("modality", None)
    out, _ = convert(Path(pos[0]), Path(pos[1]), fmt, modality, kv)
    print(f"converted {pos[0]} -> {out} (load with mmssl.load_encoder({str(out)!r}))")
    return 0


def cmd_export(args: list[str]) -> int:
    """``mmssl export FORMAT RUN OUT [key=value ...]``: a run's encoder in another library's format."""
    from mmssl.config import UsageError
    from mmssl.exporters import EXPORTERS

    pos = [a for a in args if "=" not in a]
    if len(pos) != 3 or pos[0] not in EXPORTERS:
        raise UsageError("usage: mmssl export {" + "|".join(EXPORTERS) + "} RUN OUT [key=value ...]  (OUT: "
                         + "; ".join(f"{k}: {e.writes} [{'= '.join(e.keys)}=]" for k, e in EXPORTERS.items()) + ")")
    exp = EXPORTERS[pos[0]]
    out = exp.run(Path(pos[1]), Path(pos[2]), _kv([a for a in args if "=" in a], exp.keys))
    print(f"exported {pos[1]} -> {out} ({exp.writes})")
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
    """``mmssl reconstruct modality=M encoder=RUN src=CASE out=DIR``: what an MAE run's decoder predicts
    for the parts a sample lacks (an MRI case's missing contrasts), written as the modality's files."""
    import importlib

    import torch

    from mmssl.config import UsageError, device_kind
    from mmssl.registry import reconstructors

    usage = "mmssl reconstruct modality=M encoder=RUN src=CASE out=DIR"
    kv = _kv(args, {"modality", "encoder", "src", "out", "device"})
    _need(kv, ("modality", "encoder", "src", "out"), usage)
    have = reconstructors()
    if kv["modality"] not in have:
        raise UsageError(f"modality {kv['modality']!r} has no reconstruction; these have: {', '.join(have) or 'none'}")
    mod = importlib.import_module(have[kv["modality"]])
    device = torch.device(device_kind(kv.get("device")))
    written = mod.reconstruct(Path(kv["encoder"]), Path(kv["src"]), Path(kv["out"]), device=device)
    print(f"reconstructed into {kv['out']}: {json.dumps(written, default=str)}")
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "eval": cmd_eval, "extract": cmd_extract, "data": cmd_data,
            "convert": cmd_convert, "export": cmd_export, "report": cmd_report, "list": cmd_list,
            "reconstruct": cmd_reconstruct}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"mmssl: error: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from mmssl.errors import MmsslError
    from mmssl.train.trainer import TrainingError

    try:
        return COMMANDS[cmd](argv[1:])
    except (MmsslError, ValueError, OSError) as e:
        if os.environ.get("MMSSL_DEBUG"):
            raise
        print(f"mmssl: error: {error_line(e)}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"mmssl: error: {e}", file=sys.stderr)
        return 1


def error_line(e: BaseException) -> str:
    """The one line ``mmssl`` prints for a user error. A ``ValueError`` that is not an ``MmsslError`` (a
    library's, or an older raise) is likely the user's too, but it carries where it was raised, so a
    bug is not mistaken for a bad value; a bare ``KeyError`` is a bug and keeps its traceback."""
    from mmssl.errors import MmsslError

    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    # an error raised in a loader worker arrives as "Caught X in DataLoader worker ..." + traceback
    line = lines[-1] if lines and lines[0].startswith("Caught ") else (lines[0] if lines else type(e).__name__)
    if isinstance(e, (MmsslError, OSError)) or e.__traceback__ is None:
        return line
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename)
    root = Path(__file__).resolve().parents[1]  # the checkout, or site-packages
    where = where.relative_to(root) if where.is_relative_to(root) else Path(*where.parts[-3:])
    return f"{line} [{type(e).__name__} at {where}:{tb.tb_lineno}; MMSSL_DEBUG=1 shows the traceback]"


if __name__ == "__main__":
    sys.exit(main())
