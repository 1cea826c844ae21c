"""Configuration: Hydra composition, then one resolver that applies every default once.

Precedence, highest first (docs/configuration.md):

1. the command line (``trainer.lr=3e-4``, ``objective.mask_ratio=0.5``, ``modality.image.pool=mean``);
2. the modality's defaults for the objective (``objectives.<name>`` in ``configs/modality/<m>.yaml``:
   objective keys, ``trainer`` keys such as ``max_steps``, the tower's ``pool`` and ``adapter`` keys);
3. the per-size tables (the modality's ``sizes.<size>``, the objective's ``sizes`` / ``decoder_sizes``);
4. the group yaml (``configs/<group>/<option>.yaml``).

``resolve(overrides) -> RunSpec`` is what ``mmssl pretrain`` runs; ``resolve_eval(args) -> EvalSpec``
what ``mmssl eval`` and ``mmssl extract`` run. The command line only parses and dispatches."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmssl.errors import BadFileError, ConfigError, read_json_object
from mmssl.registry import MODALITIES, OBJECTIVES

GROUPS = ("modality", "objective", "data", "trainer", "model", "eval")

# ${mmssl.first_set:a,b}: the first argument that is not null (a tower's own size, else model.name)
if not OmegaConf.has_resolver("mmssl.first_set"):
    OmegaConf.register_new_resolver("mmssl.first_set", lambda *xs: next((x for x in xs if x is not None), None))


#: the command line's name for a user error (``mmssl.cli`` prints it as one line)
UsageError = ConfigError


def _search_path() -> list[str]:
    """Config packages: mmssl's own, then plug-ins' (entry-point group ``mmssl.configs``)."""
    return [f"pkg://{ep.value}" for ep in entry_points(group="mmssl.configs")]


def group_options(group: str) -> list[str]:
    names = set()
    for pkg in ["mmssl.configs"] + [p[len("pkg://"):] for p in _search_path()]:
        try:
            d = resources.files(pkg) / group
            names |= {p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml")}
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
            continue
    return sorted(names)


def _check_group_values(overrides: list[str]) -> None:
    for ov in overrides:
        key, _, val = ov.partition("=")
        key = key.lstrip("+~")
        if key in GROUPS and val:
            vals = [v.strip() for v in val.strip("[]").split(",") if v.strip()]
            opts = group_options(key)
            for v in vals:
                if v not in opts:
                    raise ConfigError(f"unknown {key} {v!r}; choose one of: {', '.join(opts)}")


def compose(overrides: list[str]) -> DictConfig:
    """The resolved config for ``overrides`` (key=value strings)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _check_group_values(overrides)
    sp = _search_path()
    extra = [f"hydra.searchpath=[{','.join(sp)}]"] if sp else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="mmssl.configs", version_base="1.3"):
            cfg = hcompose(config_name="config", overrides=list(overrides) + extra)
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e).strip().splitlines()[0]
        if "Could not override" in msg or "not in struct" in str(e) or "Key '" in str(e):
            # the longest key the error names: modality.point.backbone.x, not the group override modality=point
            named = [o.split("=")[0] for o in overrides if o.split("=")[0].lstrip("+~") in str(e)]
            key = max(named, key=len) if named else None
            top = ", ".join(k for k in ("run_dir", "init", "resume", "allow_config_change", "cache_dir", "encoder",
                                        "out", "split") + GROUPS)
            raise ConfigError(f"unknown key {key or msg!r}; top-level keys: {top} "
                              f"(a group's keys: see `mmssl list` and configs/<group>/*.yaml)") from None
        raise ConfigError(msg) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def modalities_of(cfg: DictConfig) -> list[str]:
    mods = list(cfg.modality.keys())
    for m in mods:
        if m not in MODALITIES:
            raise ConfigError(f"modality {m!r} has a config but no adapter; adapters: {', '.join(MODALITIES.names())}")
    return mods


def check_pair(cfg: DictConfig) -> None:
    name = cfg.objective.name
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES.names())}")
    why = OBJECTIVES.get(name).supports(modalities_of(cfg))
    if why:
        from mmssl.factory import supported_pairs

        pairs = ', '.join(f'modality={m}' for m in supported_pairs()[name]) or 'none'
        raise ConfigError(f"unsupported pair: {why}; supported: {name} with {pairs}")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.get("cache_dir") or os.environ.get("MMSSL_CACHE") or Path.home() / ".cache" / "mmssl")


def given_keys(overrides: list[str]) -> dict[str, str]:
    """The keys the command line sets (``+``/``~`` prefixes dropped) -> their raw values."""
    return {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}


# -- pretraining ----------------------------------------------------------------------------------------
def apply_modality_defaults(cfg: DictConfig, mods: list[str], overrides: list[str]) -> None:
    """Level 2 of the precedence chain for the keys outside the objective: each modality's
    ``objectives.<name>.trainer`` keys (text MLM's learning rate, every pair's ``max_steps``) and its
    ``objectives.<name>.pool`` (image data2vec pools by the mean), where the command line leaves them
    alone. The two towers of a pair must agree on a trainer key they both set."""
    from mmssl.factory import objective_defaults

    given = set(given_keys(overrides))
    setter: dict[str, tuple[str, Any]] = {}
    for m in mods:
        defaults = objective_defaults(to_dict(cfg.modality[m]), cfg.objective.name)
        for k, v in (defaults.get("trainer") or {}).items():
            if k not in cfg.trainer:
                raise ConfigError(f"modality {m}: objectives.{cfg.objective.name}.trainer.{k} is not a trainer key")
            if k in setter and setter[k][1] != v and f"trainer.{k}" not in given:
                raise ConfigError(f"modalities {setter[k][0]} and {m} set objectives.{cfg.objective.name}.trainer.{k} "
                                  f"to {setter[k][1]!r} and {v!r}; choose with trainer.{k}=...")
            setter[k] = (m, v)
            if f"trainer.{k}" not in given:
                cfg.trainer[k] = v
        if defaults.get("pool") is not None and f"modality.{m}.pool" not in given:
            cfg.modality[m].pool = defaults["pool"]


def check_resume(cfg: DictConfig) -> None:
    """``resume=true`` continues the run in ``run_dir`` under the config it was saved with."""
    if not cfg.resume:
        return
    if not cfg.run_dir or not Path(cfg.run_dir).is_dir():
        raise ConfigError("resume=true needs run_dir=PATH of an existing run")
    from mmssl.train.checkpoint import find

    if find(Path(cfg.run_dir) / "checkpoints") is None:
        raise ConfigError(f"resume=true: {cfg.run_dir} holds no checkpoint (the run stopped before its first "
                          f"one); start it again without resume=true")
    saved_path = Path(cfg.run_dir) / "config.yaml"
    try:
        saved = OmegaConf.load(saved_path)
    except FileNotFoundError:
        raise BadFileError(saved_path, "no such file: the run's saved config (is run_dir a run?)") from None
    except Exception as e:  # noqa: BLE001 (yaml's and OmegaConf's parse errors have no common base)
        raise BadFileError(saved_path, f"not a readable config ({type(e).__name__})") from None
    if not isinstance(saved, DictConfig):
        raise BadFileError(saved_path, "not a mapping of config groups")
    ignore = {"resume", "allow_config_change", "cache_dir", "run_dir"}  # a moved run is the same run
    old = {k: v for k, v in OmegaConf.to_container(saved, resolve=True).items() if k not in ignore}
    new = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
    # a key added to mmssl after the run was saved takes its default: not a change of the run
    diff = [d for d in config_diff(old, new) if _has_path(old, d.split(":", 1)[0])]
    if diff and not cfg.allow_config_change:
        raise ConfigError(f"the config differs from the saved run ({'; '.join(diff[:4])}); "
                          f"pass allow_config_change=true to resume anyway")


def _has_path(tree: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Where two nested dicts differ: ``['trainer.lr: 0.0005 -> 0.001', ...]``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


#: the parts of an encoder config that make its architecture (what its weights must fit)
ARCH_KEYS = ("size", "backbone", "adapter", "pool", "num_prefix", "open_clip")


def _arch_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two encoder configs describe different architectures: 'adapter.position: conv vs sinusoidal'."""
    return [d.replace(" -> ", " vs ") for d in config_diff({k: a.get(k) for k in ARCH_KEYS},
                                                           {k: b.get(k) for k in ARCH_KEYS})]


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
        src, where = read_json_object(rec, "an encoder config.json", ("modality", "backbone")), rec.parent
    else:
        where = resolve_encoder_dir(Path(init), m)
        src = read_json_object(where / "config.json", "an encoder config.json", ("modality", "backbone"))
        if src.get("modality") != m:
            raise ConfigError(f"init={init} holds a {src.get('modality')!r} encoder, not {m!r}")
    cfg = {k: v for k, v in src.items() if k not in ("preprocessing", "objective", "step", "init")}
    cfg = json.loads(json.dumps(cfg))  # a deep copy
    for key, value in given_keys(overrides).items():
        if key in ("model", f"modality.{m}.size") and built["size"] != src.get("size"):
            raise ConfigError(f"{key}={value}: with init= the {m} encoder keeps its size ({src.get('size')}, "
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


@dataclass
class RunSpec:
    """A pretraining run, every default applied. ``cfg`` is what the run directory's ``config.yaml``
    records (and what ``resume=true`` compares against)."""

    cfg: DictConfig
    overrides: list[str]
    modalities: list[str]
    objective: str
    job_index: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def given(self) -> dict[str, str]:
        return given_keys(self.overrides)

    @property
    def modality_cfgs(self) -> dict[str, dict[str, Any]]:
        return {m: to_dict(self.cfg.modality[m]) for m in self.modalities}

    def default_run_dir(self) -> str:
        """``runs/<modalities>-<objective>/<timestamp>``."""
        return f"runs/{'+'.join(self.modalities)}-{self.objective}/{time.strftime('%Y%m%d-%H%M%S')}"

    def set_run_dir(self, run_dir: str | Path) -> Path:
        """The run's folder (``job<i>`` inside it for a sweep job), recorded in ``cfg.run_dir``."""
        path = Path(run_dir) / f"job{self.job_index}" if self.job_index is not None else Path(run_dir)
        self.cfg.run_dir = str(path)
        return path

    def encoder_configs(self, run_dir: Path) -> dict[str, dict[str, Any]]:
        """Each tower's ``encoder_config``: its own size (``modality.<m>.size``), else ``model=``; with
        ``init=`` the source encoder's architecture (``init_tower_config``; notes in ``self.notes``)."""
        from mmssl.factory import encoder_config

        cfg = self.cfg
        mods = self.modality_cfgs
        out = {m: encoder_config(m, mods[m].get("size") or cfg.model.name, mods[m], to_dict(cfg.model),
                                 self.objective) for m in self.modalities}
        if cfg.init:  # continual pretraining: each tower as the source encoder was built
            record = run_dir / "encoders_init" if cfg.resume else None
            for m in self.modalities:
                out[m], note = init_tower_config(m, str(cfg.init), out[m], self.overrides, self.objective, record)
                if note:
                    self.notes.append(note)
        return out

    def input_sizes(self, encoders: dict[str, Any]) -> dict[str, int | None]:
        """Each tower's training crop (``max_len``): the modality config's, else the input size its
        encoder declares (an image side); a library tower (open_clip) and, unless the command line sets
        one, a tower built from ``init=`` take the size they were built for."""
        mods = self.modality_cfgs
        given = self.given
        out = {}
        for m in self.modalities:
            own = encoders[m].config["preprocessing"].get("max_len")
            mine = mods[m].get("max_len")
            use_own = (mine is None or "open_clip" in encoders[m].config
                       or (self.cfg.init and own is not None and f"modality.{m}.max_len" not in given))
            out[m] = own if use_own else mine
        return out


def resolve(overrides: list[str], job_index: int | None = None) -> RunSpec:
    """The config of ``mmssl pretrain OVERRIDES``: composed, checked, every default applied."""
    from mmssl.schema import check

    cfg = compose(overrides)
    check(cfg)  # types and ranges first: nothing is built, written or cached before
    check_data_path(cfg)
    check_pair(cfg)
    mods = modalities_of(cfg)
    apply_modality_defaults(cfg, mods, overrides)
    notes = init_hubert_defaults(cfg, overrides)
    check_resume(cfg)
    return RunSpec(cfg, list(overrides), mods, str(cfg.objective.name), job_index, notes)


def init_hubert_defaults(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """HuBERT continued from ``init=SRC`` (a converted fairseq HuBERT, an export or a run): the units
    are predicted with the source's ``heads/hubert`` (its ``final_proj`` and unit embeddings, which the
    trainer loads where the shapes fit), so ``objective.k``, ``final_dim`` and ``temperature`` default to
    the head's; ``targets=layer`` without a teacher clusters the source's own layer (HuBERT's next
    iteration). A command-line k or final_dim that differs keeps the run's value and says in one line
    that the head starts fresh. -> the notes."""
    if not cfg.get("init") or str(cfg.objective.get("name")) != "hubert":
        return []
    given, obj, src = given_keys(overrides), cfg.objective, Path(str(cfg.init))
    notes = []
    if obj.get("targets") == "layer" and not obj.get("teacher"):
        obj.teacher = str(cfg.init)
        notes.append(f"[mmssl] init: objective.targets=layer clusters layer {obj.get('layer') or 'round(2/3 depth)'} "
                     f"of the init encoder ({src}); set objective.teacher= for another")
    weights = src / "heads" / "hubert.safetensors"
    if not weights.is_file():
        return notes
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        if "label_embeddings" not in f.keys():
            return notes
        k, final_dim = (int(n) for n in f.get_slice("label_embeddings").get_shape())
    meta = src / "heads" / "hubert.json"
    temp = read_json_object(meta, "a head config").get("logit_temp") if meta.is_file() else None
    clash = []
    for key, have in (("k", k), ("final_dim", final_dim), ("temperature", temp)):
        if have is None:
            continue
        mine = obj[key][0] if key == "k" and OmegaConf.is_list(obj[key]) else obj[key]  # codebook 0's k
        if f"objective.{key}" not in given:
            obj[key] = have
        elif float(mine) != float(have):
            clash.append(f"objective.{key}={obj[key]} (the head's: {have})")
    if any(c.startswith(("objective.k=", "objective.final_dim=")) for c in clash):
        notes.append(f"[mmssl] init: {weights} does not fit {', '.join(clash)}: final_proj and the unit "
                     f"embeddings start fresh (leave objective.k / final_dim unset to continue with the source's)")
    elif clash:
        notes.append(f"[mmssl] init: {', '.join(clash)} set on the command line; the head's weights are kept")
    return notes


def check_data_path(cfg: DictConfig) -> None:
    """``data.path`` names packed shards (``mmssl data pack``): a folder with a ``meta.json``."""
    path = cfg.data.get("path")
    if path in (None, "???") or cfg.data.get("sources"):
        return
    where = Path(str(path))
    if not where.is_dir():
        raise ConfigError(f"data.path={path}: no such directory (shards written by `mmssl data pack`)")
    if not (where / "meta.json").is_file():
        raise ConfigError(f"data.path={path}: no meta.json in it (pack it with `mmssl data pack`)")


def device_kind(want: str | None) -> str:
    """``trainer.device`` -> ``cuda`` or ``cpu`` (``auto`` or None: CUDA when there is one)."""
    import torch

    return "cuda" if (want == "cuda" or (want in (None, "auto") and torch.cuda.is_available())) else "cpu"


def set_threads(spec: Any, procs: int = 1) -> None:
    """``trainer.threads``: torch (and OpenMP) threads per process; ``auto`` shares the cores among
    ``procs`` processes (two jobs of two threads on two cores slowed k-means 35x)."""
    import torch

    n = max(1, (os.cpu_count() or 1) // max(procs, 1)) if spec in (None, "auto") else int(spec)
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


# -- evaluation -----------------------------------------------------------------------------------------
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
            raise ConfigError(f"{key} describes the encoder, which evaluation reads from {where}/config.json; "
                              f"remove it (evaluate another encoder to change it)")
        else:
            continue
        try:
            given = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{key}={raw}: not a value") from None
        if given != have:
            raise ConfigError(f"{key}={raw} differs from the preprocessing the encoder was trained with "
                              f"({have!r}, {where}/config.json): evaluation uses the saved preprocessing")


def probe_pool_defaults(ecfg: dict[str, Any], modality_cfg: dict[str, Any]) -> dict[str, Any]:
    """An evaluator that takes several poolings (``eval.pools``: the linear probe) and was given none
    reads the modality's ``probe_pools`` (MRI: ``meanmax``, the mean and the max side by side: a small
    lesion is lost in a mean over the head), the same for the trained and the step-0 encoder; without
    one, the encoder's own pool."""
    if "pools" in ecfg and ecfg["pools"] in (None, []) and modality_cfg.get("probe_pools"):
        return {**ecfg, "pools": [str(p) for p in modality_cfg["probe_pools"]]}
    return ecfg


@dataclass
class EvalSpec:
    """An evaluation: the composed config, the encoder (an export folder, or a contrastive run
    directory for the pair evaluators), where results go, the data source and the device."""

    cfg: DictConfig
    encoder: Path
    out: Path | None
    source: Any
    device: Any
    ecfg: dict[str, Any]

    @property
    def cache(self) -> Path:
        return cache_dir(self.cfg)


def _arg(args: list[str], key: str) -> str | None:
    given = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    return given[-1] if given else None


def encoder_dir_of(args: list[str]) -> Path:
    """The export named by ``encoder=`` (a run directory or an export); ``modality=`` picks the tower
    of a run with several."""
    from mmssl.export import resolve_encoder_dir

    given = _arg(args, "encoder")
    if not given:
        raise ConfigError("needs encoder=PATH (a run directory or an exported encoder)")
    return resolve_encoder_dir(Path(given), _arg(args, "modality"))


def default_eval_out(enc_dir: Path) -> Path:
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


def _eval_device(cfg: DictConfig) -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu")


def resolve_eval(args: list[str], evaluator: str | None = None) -> EvalSpec:
    """One encoder's evaluation (``mmssl eval linear-probe|knn|finetune|layer-probe``, ``mmssl extract``):
    the config composed with the encoder's own modality, the command line checked against the
    preprocessing it was trained with, the modality's probe pools where ``eval.pools`` is unset."""
    from mmssl.data.loader import resolve_source
    from mmssl.schema import check

    enc_dir = encoder_dir_of(args)  # before composing: the keys may not exist in the default modality's config
    saved = read_json_object(enc_dir / "config.json", "an encoder config.json", ("modality",))
    modality = saved["modality"]
    check_preprocessing(args, saved, enc_dir)
    rest = [a for a in args if not a.startswith("modality=")]
    if evaluator and not any(a.startswith("eval=") for a in rest):
        rest.insert(0, f"eval={evaluator}")
    cfg = compose(rest + [f"modality={modality}"])
    check(cfg)
    set_threads(cfg.trainer.threads)
    source = _first_source(resolve_source(to_dict(cfg.data), [modality], cfg.modality[modality].get("preset"),
                                          cache_dir(cfg)))
    out = Path(cfg.out) if cfg.out else default_eval_out(enc_dir)
    ecfg = probe_pool_defaults(to_dict(cfg.eval), to_dict(cfg.modality[modality]))
    return EvalSpec(cfg, enc_dir, out, source, _eval_device(cfg), ecfg)


def resolve_pair_eval(args: list[str], evaluator: str) -> EvalSpec:
    """A contrastive run's evaluation (``encoder=RUN``: ``mmssl eval retrieval|zero-shot``): its two
    modalities, in their order, and paired data."""
    from mmssl.data.loader import resolve_source
    from mmssl.schema import check

    given = _arg(args, "encoder")
    if not given:
        raise ConfigError("needs encoder=RUN (the run directory of a contrastive run)")
    run = Path(given)
    head = run / "heads" / "contrastive.json"
    if not head.exists():
        raise ConfigError(f"{run} is not the run directory of a contrastive run (no heads/contrastive.json)")
    mods = read_json_object(head, "a contrastive head's config", ("modalities",))["modalities"]
    for a in args:
        if a.startswith(("model.", "modality.")) and not a.startswith(tuple(f"modality.{m}.preset" for m in mods)):
            raise ConfigError(f"{a.split('=')[0]} describes the encoders, which evaluation reads from {run}; remove it")
    rest = [a for a in args if not a.startswith("modality=")]
    if not any(a.startswith("eval=") for a in rest):
        rest.insert(0, f"eval={evaluator}")
    cfg = compose(rest + [f"modality=[{','.join(mods)}]"])
    check(cfg)
    set_threads(cfg.trainer.threads)
    source = _first_source(resolve_source(to_dict(cfg.data), mods, None, cache_dir(cfg)))
    out = Path(cfg.out) if cfg.out else run / "eval"
    return EvalSpec(cfg, run, out, source, _eval_device(cfg), to_dict(cfg.eval))
