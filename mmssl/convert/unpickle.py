"""Reading fairseq's pickled checkpoints without fairseq and without running anything in them.

A fairseq ``.pt`` file is a ``torch.save`` pickle of a dict: ``model`` (the state dict), ``args`` (an
``argparse.Namespace``, older releases) or ``cfg`` (a plain dict, or an OmegaConf ``DictConfig`` in the
first Hydra-era releases), ``optimizer_history``, ``extra_state``, ``task_state`` (HuBERT's:
``fairseq.data.dictionary.Dictionary`` objects) and optimizer state. ``torch.load(weights_only=True)``
refuses all but tensors and builtin containers; here it runs with an allow-list
(``torch.serialization.safe_globals``) of exactly the names such files hold, each mapped to an inert
stand-in: a record class whose instances only receive the pickled attributes, so neither fairseq nor
omegaconf code runs and a pickled name outside the list is refused before anything is called.
``plain`` turns the stand-ins back into dicts and lists."""
from __future__ import annotations

import argparse
import pickle
import typing
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

from mmssl.errors import BadFileError, check_readable


class Record:
    """An inert stand-in for a pickled class: ``NEWOBJ`` makes an empty instance, ``BUILD`` fills its
    ``__dict__`` (no ``__setstate__``: nothing of the original class runs), a ``REDUCE`` call only keeps
    its arguments."""

    pickled_as = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        inst = super().__new__(cls)
        if args:
            inst.__dict__["_args"] = args
        return inst

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.pickled_as} {sorted(self.__dict__)}>"


def _record(full_name: str) -> type[Record]:
    return type(full_name.rpartition(".")[2], (Record,), {"pickled_as": full_name})


#: omegaconf 2.x's pickled containers, nodes and metadata (its __setstate__ is not run: the stand-in
#: takes the state as attributes, which ``plain`` reads)
OMEGACONF = ["omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
             "omegaconf.base.Metadata"] + [f"omegaconf.nodes.{n}" for n in (
                 "AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode", "BytesNode",
                 "PathNode", "ValueNode")]
#: fairseq's own classes in release files: HuBERT's task_state holds its label Dictionary objects
FAIRSEQ = ["fairseq.data.dictionary.Dictionary"]
#: numpy scalars (a validation loss in extra_state) are kept as records, their values unread
NUMPY = ["numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype"]

STAND_INS: dict[str, type[Record]] = {n: _record(n) for n in OMEGACONF + FAIRSEQ + NUMPY}

#: real classes admitted as they are: plain containers whose unpickling runs no code of theirs
#: (Namespace and OrderedDict take a __dict__ / items; defaultdict and the builtin types are called
#: with the pickled arguments, which are themselves admitted names only; typing.Any is a marker)
REAL: list[tuple[Any, str]] = [
    (argparse.Namespace, "argparse.Namespace"), (OrderedDict, "collections.OrderedDict"),
    (defaultdict, "collections.defaultdict"), (typing.Any, "typing.Any"),
    (dict, "builtins.dict"), (list, "builtins.list"), (tuple, "builtins.tuple"), (set, "builtins.set"),
    (int, "builtins.int"), (float, "builtins.float"), (str, "builtins.str"), (bool, "builtins.bool"),
    (bytes, "builtins.bytes"), (type(None), "builtins.NoneType"),
]


def allowed_names() -> list[str]:
    """Every global name a checkpoint may hold beyond torch's own tensor rebuilders (for the docs)."""
    return sorted([n for _, n in REAL] + list(STAND_INS))


def _refused(e: Exception) -> str:
    """The refused class's name from torch's weights-only error text."""
    text = str(e)
    for marker in ("Unsupported global: GLOBAL ", "unsupported GLOBAL ", "unrecognized function ",
                   "allowlisted via `add_safe_globals` but got ", "types allowlisted via `add_safe_globals`, but got "):
        if marker in text:
            return text.split(marker, 1)[1].split()[0].rstrip(".,")
    first = text.strip().splitlines()
    return first[-1].strip()[:160] if first else type(e).__name__


def load_checkpoint(path: str | Path, what: str = "a fairseq checkpoint (.pt)") -> Any:
    """The unpickled checkpoint, tensors on the CPU, stand-ins where fairseq / omegaconf classes were
    pickled. A name outside the allow-list is a BadFileError naming it, raised before anything of the
    file is called; a truncated or foreign file is one too."""
    import torch

    p = check_readable(path, what)
    safe = [(cls, name) for name, cls in STAND_INS.items()] + REAL
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadFileError(p, f"refused to unpickle {_refused(e)}: not one of the plain containers a fairseq "
                              f"checkpoint holds, so nothing in the file was run") from None
    except OSError as e:
        raise BadFileError(p, f"unreadable ({type(e).__name__}: {e})") from None
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadFileError(p, f"not a torch.save file ({type(e).__name__}: {first[:160]}); expected {what}") from None


def plain(obj: Any) -> Any:
    """Stand-ins and Namespaces -> dicts and lists, recursively: an OmegaConf DictConfig becomes the dict
    of its content (nodes their values), a ListConfig a list, a Namespace or another record the dict of
    its attributes. Tensors and scalars are returned as they are."""
    if isinstance(obj, Record):
        name = obj.pickled_as
        if name.endswith(("DictConfig", "ListConfig")):
            content = obj.__dict__.get("_content")
            if content is None or isinstance(content, str):  # None config, or "???" (missing) / an interpolation
                return content
            return plain(content)
        if name.startswith("omegaconf.nodes."):
            return plain(obj.__dict__.get("_val"))
        return {k: plain(v) for k, v in obj.__dict__.items() if k != "_args"}
    if isinstance(obj, argparse.Namespace):
        return {k: plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
