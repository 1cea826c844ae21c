"""Reading a Hugging Face model directory (``config.json`` + safetensors) and moving tensors between
mmssl's and transformers' names by one key plan, in either direction.

Nothing here imports ``transformers``: the directory is read as files (no network, no
``trust_remote_code``, no pickles; a ``pytorch_model.bin`` alone is refused)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from mmssl.convert.common import Plan, apply_plan
from mmssl.errors import BadFileError, MissingFileError, read_json, read_json_object, read_safetensors

#: a plan: (mmssl key, the transformers keys it is made of). One key is copied; several (q, k, v)
#: are concatenated along dim 0 into mmssl's fused qkv, and split back on export.


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory whose config.json is a transformers config (``model_type``), not an mmssl
    export's (``modality``)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        cfg = read_json(p)
    except BadFileError:
        return False
    return isinstance(cfg, dict) and "model_type" in cfg and "modality" not in cfg


def read_hf_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json, the state dict of ``model.safetensors`` or of the shards that
    ``model.safetensors.index.json`` lists). One-line errors for missing or corrupt files."""
    d = Path(path)
    cfg = read_json_object(d / "config.json", "a transformers config.json", ("model_type",))
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return cfg, dict(read_safetensors(single, "the model's weights"))
    if index.is_file():
        idx = read_json_object(index, "a safetensors shard index", ("weight_map",))
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(idx["weight_map"].values())):
            sd.update(read_safetensors(d / shard, "a shard of the model's weights"))
        return cfg, sd
    if (d / "pytorch_model.bin").is_file():
        raise BadFileError(d, "holds pytorch_model.bin only: a pickle, which mmssl does not load; re-save it with "
                              "save_pretrained(dir, safe_serialization=True) to get model.safetensors")
    raise MissingFileError(d, "no model.safetensors (or model.safetensors.index.json) beside config.json")


def strip_prefix(sd: dict[str, Tensor], prefixes: Iterable[str], marker: str) -> dict[str, Tensor]:
    """A task model's state dict (``HubertForCTC``: ``hubert.*`` + ``lm_head.*``) -> the base model's
    keys, when ``marker`` (a key every base model has) sits under one of ``prefixes``; the task heads
    keep their names, so the plan reports them as unused or the caller skips them."""
    for p in prefixes:
        if p + marker in sd:
            return {k.removeprefix(p): v for k, v in sd.items()}
    return sd


def problems(what: str, unused: list[str], unfilled: list[str]) -> BadFileError | ValueError:
    """One summary line (the CLI prints the first line), then the full lists."""
    parts = []
    if unused:
        parts.append(f"{len(unused)} keys not used ({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''})")
    if unfilled:
        parts.append(f"{len(unfilled)} keys not filled ({', '.join(unfilled[:4])}{', ...' if len(unfilled) > 4 else ''})")
    lines = [f"cannot convert the {what}: " + "; ".join(parts)]
    lines += [f"  unused: {k}" for k in unused] + [f"  unfilled: {k}" for k in unfilled]
    return ValueError("\n".join(lines))


def plan_in(sd: dict[str, Tensor], plan: Plan, skip: tuple[str, ...], what: str) -> dict[str, Tensor]:
    """transformers tensors -> mmssl tensors by ``plan``. Every source key must be used or start with
    one of ``skip`` (heads left out on purpose), every planned mmssl key filled: else one error naming
    them all."""
    state, unused, unfilled = apply_plan(sd, plan, skip)
    if unused or unfilled:
        raise problems(what, unused, unfilled)
    return state


def plan_out(state: dict[str, Tensor], plan: Plan) -> dict[str, Tensor]:
    """mmssl tensors -> transformers tensors by ``plan`` (a fused qkv is split into equal thirds)."""
    out: dict[str, Tensor] = {}
    for src, dsts in plan:
        t = state[src]
        parts = t.chunk(len(dsts), 0) if len(dsts) > 1 else (t,)
        for name, part in zip(dsts, parts):
            out[name] = part.detach().clone().contiguous()
    return out


def check_filled(template: dict[str, Tensor], state: dict[str, Tensor], buffers: set[str], what: str) -> None:
    """Every mmssl parameter filled with the right shape and nothing extra, else one error."""
    unfilled = [k for k in template if k not in state and k not in buffers]
    unfilled += [f"{k} (shape {tuple(state[k].shape)}, mmssl needs {tuple(template[k].shape)})"
                 for k in state if k in template and state[k].shape != template[k].shape]
    unused = [f"{k} (no such mmssl key)" for k in state if k not in template]
    if unused or unfilled:
        raise problems(what, unused, unfilled)
