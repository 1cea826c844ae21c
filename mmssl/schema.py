"""Typed schemas of the config groups, checked right after composition and before anything is built.

Each group is a dataclass whose fields carry the key's type and allowed range; ``check(cfg)`` turns the
composed config into one ``ConfigError`` that names the key, the value and what is allowed (so
``trainer.lr=abc`` fails in a second with exit code 2 and no run directory, instead of after the model
and the unit targets are built). The values themselves stay in ``configs/``: the schema holds no
defaults."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig


def spec(kind: type | tuple[type, ...], low: float | None = None, high: float | None = None,
         choices: tuple[Any, ...] | None = None, nullable: bool = False, low_open: bool = False) -> Any:
    """A schema field: ``kind`` (int, float, str, bool or list), an inclusive range ``[low, high]``
    (``low_open``: ``low`` itself excluded), the allowed ``choices``, and whether null is allowed."""
    return field(metadata={"kind": kind, "low": low, "high": high, "choices": choices, "nullable": nullable,
                           "low_open": low_open})


@dataclass
class TrainerSchema:
    max_steps: int = spec(int, low=0)
    batch_size: int = spec(int, low=1)
    accumulate: int = spec(int, low=1)
    strategy: str = spec(str, choices=("ddp", "fsdp"))
    activation_checkpointing: bool = spec(bool)
    lr: float = spec(float, low=0, low_open=True)
    weight_decay: float = spec(float, low=0)
    betas: list = spec(list)  # noqa: RUF009 (spec() is a dataclasses.field)
    eps: float = spec(float, low=0, low_open=True)
    warmup_steps: int = spec(int, low=0)
    schedule: str = spec(str, choices=("cosine", "constant", "infinite"))
    min_lr_factor: float = spec(float, low=0, high=1)
    cooldown_fraction: float = spec(float, low=0, high=1)
    constant_factor: float = spec(float, low=0, high=1)
    anneal_fraction: float = spec(float, low=0, high=1)
    peft: str = spec(str, nullable=True)  # its choices: PEFT_MODES, checked by the trainer before it writes
    unfreeze_last: int = spec(int, low=0)
    lora_rank: int = spec(int, low=1)
    lora_alpha: float = spec(float, low=0, low_open=True)
    lora_dropout: float = spec(float, low=0, high=1)
    clip_grad: float = spec(float, low=0, nullable=True)
    seed: int = spec(int)
    device: str = spec(str, choices=("auto", "cpu", "cuda"))
    precision: str = spec(str, choices=("auto", "bf16", "fp32"))
    num_workers: int = spec(int, low=0)
    threads: Any = spec((int, str), low=1, choices=("auto",), nullable=True)  # noqa: RUF009
    log_every: int = spec(int, low=1)
    save_minutes: float = spec(float, low=0)
    ckpt_every: int = spec(int, low=0)
    max_nonfinite: int = spec(int, low=1)
    progress: bool = spec(bool)
    tensorboard: bool = spec(bool)
    find_unused_parameters: bool = spec(bool)
    eval_every: int = spec(int, low=0)
    eval_items: int = spec(int, low=1)
    eval_split: str = spec(str, choices=("train", "val", "test"))
    knn_bank: int = spec(int, low=1)
    knn_k: int = spec(int, low=1)


@dataclass
class DataSchema:
    name: str = spec(str)
    path: str = spec(str, nullable=True)
    seed: int = spec(int)
    eval_batch_size: int = spec(int, low=1)
    on_error: str = spec(str, choices=("skip", "raise"))
    pack: bool = spec(bool)
    sources: list = spec(list, nullable=True)  # noqa: RUF009


#: objective keys checked wherever an objective has them (each objective's other keys are its own)
OBJECTIVE_KEYS = {
    "mask_ratio": spec(float, low=0, high=1, nullable=True, low_open=True),
    "mask_mode": spec(str, choices=("drop", "replace"), nullable=True),
    "unmasked_weight": spec(float, low=0),
    "temperature": spec(float, low=0, low_open=True),
    "k": spec((int, list), low=2, nullable=True),  # a list: one codebook per k (hubert)
    "layer": spec((int, list), low=1, nullable=True),  # a list: one teacher layer per codebook (hubert)
    "topics": spec(int, low=2, nullable=True),
    "topic_iters": spec(int, low=1),
    "topic_weight": spec(float, low=0),
    "locate_weight": spec(float, low=0, nullable=True),
    "distill_weight": spec(float, low=0),
    "embed_dim": spec(int, low=1),
    "ema_decay": spec(float, low=0, high=1, nullable=True),
    "ema_end_decay": spec(float, low=0, high=1, nullable=True),
}

@dataclass
class ModelSchema:
    name: str = spec(str)  # its choices: the size tables in mmssl/sizes.py, checked by the factory
    dim: int = spec(int, low=1, nullable=True)
    depth: int = spec(int, low=1, nullable=True)
    heads: int = spec(int, low=1, nullable=True)
    ffn_dim: int = spec(int, low=1, nullable=True)


SPLIT = ("train", "val", "test")
#: evaluator keys checked wherever an evaluator has them: one meaning per name across configs/eval/
EVAL_KEYS = {
    **{k: spec(str, choices=SPLIT) for k in ("split", "split_train", "split_val", "split_test")},
    "label_fraction": spec((float, list), low=0, high=1, low_open=True),
    "seeds": spec(int, low=1),
    "seed": spec(int),
    "max_train": spec(int, low=1, nullable=True),
    "cache_features": spec(bool),
    "layer": spec(int, low=-1),
    "layers": spec(list, nullable=True),
    "pool": spec(str, choices=("mean", "max", "cls", "meanmax"), nullable=True),
    "pools": spec(list, nullable=True),
    "solver": spec(str, choices=("sgd", "lbfgs")),
    "lrs": spec(list),
    "wds": spec(list),
    "C": spec(list),
    "epochs": spec(int, low=1),
    "min_steps": spec(int, low=0),
    "batch_size": spec(int, low=1),
    "probe_batch_size": spec(int, low=1, nullable=True),
    "max_iter": spec(int, low=1),
    "baseline": spec(bool),
    "normalize": spec(bool),
    "schedule": spec(str, choices=("cosine", "constant")),
    "lr": spec(float, low=0, low_open=True),
    "min_lr": spec(float, low=0),
    "warmup_epochs": spec(float, low=0),
    "layer_decay": spec(float, low=0, high=1, low_open=True),
    "weight_decay": spec(float, low=0),
    "drop_path": spec(float, low=0, high=1),
    "label_smoothing": spec(float, low=0, high=1),
    "head_norm": spec(str, choices=("batch", "none")),
    "clip_grad": spec(float, low=0, nullable=True),
    "augment": spec(bool),
    "mode": spec(str, choices=("full", "lora")),
    "freeze_first": spec(int, low=0),
    "tune_last": spec(int, low=0, nullable=True),
    "lora_rank": spec(int, low=1),
    "lora_alpha": spec(float, low=0, low_open=True),
    "lora_dropout": spec(float, low=0, high=1),
    "lora_lr": spec(float, low=0, low_open=True, nullable=True),
    "lora_train_norms": spec(bool),
    "k": spec((int, list), low=1),
    "T": spec(float, low=0, low_open=True),
    "preprocess": spec(str, choices=("none", "center", "zscore")),
    "ks": spec(list),
    "bootstrap": spec(int, low=0),
    "prompts": spec(list, nullable=True),
}

GROUPS = {"trainer": TrainerSchema, "data": DataSchema, "model": ModelSchema}
#: the groups whose keys differ by choice (objective=, eval=): each known key checked where present
KEYED = {"objective": OBJECTIVE_KEYS, "eval": EVAL_KEYS}


def _problem(value: Any, meta: dict[str, Any]) -> str | None:
    """What is wrong with ``value`` under a field's ``meta``, or None."""
    if value is None:
        return None if meta["nullable"] else "null is not allowed"
    kinds = meta["kind"] if isinstance(meta["kind"], tuple) else (meta["kind"],)
    choices = meta["choices"]
    if isinstance(value, str) and str in kinds:
        if not choices or value in choices:
            return None
        if int not in kinds:
            return f"expected one of {', '.join(map(str, choices))}"
    if bool in kinds:
        return None if isinstance(value, bool) else "expected true or false"
    if list in kinds and (isinstance(value, (list, tuple)) or len(kinds) == 1):
        # a number-or-list key (label_fraction, k) checks each element as the number
        if not isinstance(value, (list, tuple)):
            return "expected a list"
        if len(kinds) == 1:
            return None
        if not value:
            return "expected a non-empty list"
        scalar = {**meta, "kind": tuple(k for k in kinds if k is not list), "nullable": False}
        return next((f"[{i}]: {why}" for i, v in enumerate(value) if (why := _problem(v, scalar))), None)
    if float not in kinds and int not in kinds:
        return "expected a string"
    want = "a number" if float in kinds else "an integer"
    if choices:
        want += f" or one of {', '.join(map(str, choices))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (float not in kinds and isinstance(value, float)):
        return f"expected {want}"
    low, high, open_ = meta["low"], meta["high"], meta["low_open"]
    if (low is not None and (value < low or (open_ and value == low))) or (high is not None and value > high):
        parts = ([f"{'>' if open_ else '>='} {low}"] if low is not None else []) + ([f"<= {high}"] if high is not None else [])
        return "must be " + " and ".join(parts)
    return None


def check(cfg: DictConfig) -> None:
    """Every schema key of the composed ``cfg``: its type and range; raises ConfigError at the first
    wrong one, naming the key, the value and what is allowed."""
    from mmssl.config import ConfigError, to_dict

    def fail(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"{key}={value!r}: {why}")

    for group, schema in GROUPS.items():
        values = to_dict(cfg[group]) if group in cfg else {}
        for f in fields(schema):
            if f.name in values and values[f.name] != "???":
                why = _problem(values[f.name], f.metadata)
                if why:
                    fail(f"{group}.{f.name}", values[f.name], why)
    for group, keys in KEYED.items():
        values = to_dict(cfg[group]) if group in cfg else {}
        for k, meta in keys.items():
            if k in values:
                why = _problem(values[k], meta.metadata)
                if why:
                    fail(f"{group}.{k}", values[k], why)
