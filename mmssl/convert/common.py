"""What every converter needs: a safe state-dict loader and shape-reading helpers."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from mmssl.errors import BadFileError, torch_load_weights


def load_state_dict(src: Path) -> dict[str, Tensor]:
    """A plain state dict saved with torch.save, or a checkpoint dict holding one under
    ``state_dict`` or ``model``. weights_only: a checkpoint file cannot run code."""
    obj = torch_load_weights(src, "a plain state dict saved with torch.save (model.state_dict(), not the model)")
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise BadFileError(src, f"holds no state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise BadFileError(src, f"entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    return obj


def count_indexed(sd: dict[str, Tensor], prefix: str) -> int:
    """Number of numbered sub-modules under ``prefix`` (max index + 1), so one missing key cannot
    shrink the count and hide itself."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = [int(m.group(1)) for k in sd if (m := pat.match(k))]
    return max(found) + 1 if found else 0


def need(sd: dict[str, Tensor], key: str, what: str, hint: str = "") -> Tensor:
    """sd[key], or a one-line error saying which shape could not be read."""
    if key not in sd:
        raise ValueError(f"cannot infer the {what}: the state dict has no {key!r}{hint}")
    return sd[key]


#: (mmssl key, the source keys it is made of: one, or several concatenated along dim 0 as q, k, v)
Plan = list[tuple[str, list[str]]]


def apply_plan(sd: dict[str, Tensor], plan: Plan, skip: tuple[str, ...] = ()
               ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Source tensors -> mmssl tensors by ``plan``: ``(state, unused, unfilled)``, where ``unused`` are
    the source keys no entry read (less those starting with ``skip``: heads left out on purpose) and
    ``unfilled`` the planned keys whose sources are missing, each naming them. Callers turn a non-empty
    ``unused`` or ``unfilled`` into their own one-line error."""
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    unfilled: list[str] = []
    for dst, srcs in plan:
        absent = [s for s in srcs if s not in sd]
        if absent:
            unfilled.append(f"{dst} (needs {', '.join(absent)})")
            continue
        state[dst] = torch.cat([sd[s] for s in srcs], 0) if len(srcs) > 1 else sd[srcs[0]]
        used.update(srcs)
    unused = sorted(k for k in sd if k not in used and not k.startswith(skip))
    return state, unused, unfilled
