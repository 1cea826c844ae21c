"""Atomic checkpoints: safetensors weights, the optimizer state through torch.save (read back with
weights_only=True), RNG states and data positions as tensors/JSON. Nothing here unpickles code.

Under ``trainer.strategy=fsdp`` weights and optimizer state are a ``torch.distributed.checkpoint``
folder (``dcp/``: every rank writes its shards, tensors plus a metadata file, no pickled code run on
load) in the same temporary checkpoint folder, moved into place by the same rename; DCP reshards on
load, so such a checkpoint resumes at another world size."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mmssl import faults
from mmssl.atomic import replace_dir
from mmssl.errors import (
    BadFileError,
    MissingFileError,
    read_json_object,
    read_safetensors,
    torch_load_weights,
)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's CPU generator and, on a GPU, only its own device's (each rank saves its own)."""
    s = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return s


def set_rng_state(s: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"], torch.cuda.current_device())


def tmp_dir(ckpt_root: Path, name: str) -> Path:
    return ckpt_root / f".tmp-{name}"


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    """Every rank writes its own RNG and data position into the shared temporary folder."""
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in rng_state().items()}, str(tmp / f"rng_rank{rank}.safetensors"))
    (tmp / f"state_rank{rank}.json").write_text(json.dumps(state))
    faults.point("ckpt_rank_state")


SHARDED = "dcp"  # the torch.distributed.checkpoint folder inside a checkpoint (trainer.strategy=fsdp)


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter names (DTensor shards under FSDP, plain tensors in
    one process): the form torch.distributed.checkpoint saves and reshards on load."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_sharded(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank: its shards of weights and optimizer state into ``tmp/dcp`` (torch.distributed.checkpoint;
    rank 0 adds the metadata). A failed write is an OSError on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp / SHARDED))
    except CheckpointException as e:
        errs = [f for f in getattr(e, "failures", {}).values()]
        first = next((x for x in errs if isinstance(x, OSError)), None)
        raise OSError(getattr(first, "errno", None), (getattr(first, "strerror", None) or str(e).splitlines()[0])) from None
    faults.point("ckpt_weights")


#: what a DCP ``.metadata`` file may name: its own record types, tensor sizes, dtypes and layouts
_DCP_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")
_DCP_NAMES = {("torch", "Size"), ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
              ("torch", "float64"), ("torch", "int64"), ("torch", "int32"), ("torch", "int8"), ("torch", "uint8"),
              ("torch", "bool"), ("torch", "strided"), ("torch", "contiguous_format"), ("torch", "preserve_format"),
              ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
              ("builtins", "getattr"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # a path: StorageMeta.checkpoint_id


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes its ``.metadata`` with pickle; read it naming DCP's own record classes only, so a
    crafted file cannot run code (the tensors and other entries DCP reads with weights_only=True)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_DCP_MODULES) or (module, name) in _DCP_NAMES:
            if (module, name) == ("builtins", "getattr"):
                return _safe_getattr
            return super().find_class(module, name)
        if (module, name) == ("torch.serialization", "_get_layout"):  # how torch pickles torch.strided
            return _safe_layout
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _safe_getattr(obj: Any, name: str) -> Any:
    # dtypes and memory formats pickle as getattr(torch, "float32"); nothing else may be looked up
    if obj is torch and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
        return getattr(torch, name)
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not part of a checkpoint's metadata")


def _safe_layout(name: str) -> torch.layout:
    layout = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise pickle.UnpicklingError(f"{name!r} is not a tensor layout")
    return layout


def _reader(path: Path) -> Any:
    """A FileSystemReader whose metadata is read by ``_MetadataUnpickler``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            with open(self._get_metadata_path(rank), "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
                    raise BadFileError(Path(self._get_metadata_path(rank)), f"is not a checkpoint's metadata ({e})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore weights and optimizer from ``path/dcp`` into this run's layout, whatever the world size
    that wrote it (DCP reads the slices each shard needs), and this rank's RNG if the checkpoint has
    one. -> (trainer meta, this rank's state or None where the writing run had fewer ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = read_json_object(path / "trainer.json", "a checkpoint's trainer.json", ("step",))
    if not (path / SHARDED / ".metadata").exists():
        raise MissingFileError(path, "holds no sharded weights (dcp/): it was written under trainer.strategy=ddp; "
                               "resume with trainer.strategy=ddp")
    if optimizer is None:
        raise ValueError("a sharded checkpoint is restored together with its optimizer")
    state = _dcp_state(model, optimizer)
    reader = _reader(path / SHARDED)
    reader.read_metadata()  # a refused or broken .metadata is a BadFileError here (DCP would swallow it)
    try:
        dcp.load(state, storage_reader=reader)
    except BadFileError:
        raise
    except Exception as e:  # noqa: BLE001 (DCP wraps every rank's failure into one exception)
        raise BadFileError(path / SHARDED, f"does not fit this run's model ({str(e).splitlines()[0][:200]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{rank}.safetensors"
    if not rng_file.exists():
        return meta, None
    rank_state = read_json_object(path / f"state_rank{rank}.json", "a checkpoint's per-rank state")
    set_rng_state(read_safetensors(rng_file, "a checkpoint's RNG state"))
    return meta, rank_state


def finish(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
           names: list[str], ckpt_root: Path, weights: bool = True) -> None:
    """Rank 0: add weights and optimizer (unless the ranks wrote them sharded already: ``weights``
    False) and meta, then move the folder into place under each name."""
    if weights:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        faults.point("ckpt_weights")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        faults.point("ckpt_optimizer")
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
    for i, name in enumerate(names):
        dst = ckpt_root / name
        if i < len(names) - 1:
            src = tmp.with_name(tmp.name + f"-{name}")
            if src.exists():
                shutil.rmtree(src)
            shutil.copytree(tmp, src)
            replace_dir(src, dst)
        else:
            replace_dir(tmp, dst)


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder holds (its trainer.json), or None if unreadable."""
    try:
        return int(json.loads((path / "trainer.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find(ckpt_root: Path, name: str = "last") -> Path | None:
    for cand in (ckpt_root / name, ckpt_root / f"{name}.old"):
        if (cand / "trainer.json").exists():
            return cand
    return None


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, rank: int,
         device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights, optimizer and this rank's RNG; returns (trainer meta, this rank's state)."""
    meta = read_json_object(path / "trainer.json", "a checkpoint's trainer.json", ("step",))
    rng_file = path / f"rng_rank{rank}.safetensors"
    if not rng_file.exists():
        raise MissingFileError(path, f"no state for rank {rank}: resume with the same number of processes")
    rank_state = read_json_object(path / f"state_rank{rank}.json", "a checkpoint's per-rank state")
    state = read_safetensors(path / "model.safetensors", "a checkpoint's weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BadFileError(path / "model.safetensors", f"does not fit this run's model ({str(e).splitlines()[0]})") from None
    if optimizer is not None:
        saved = torch_load_weights(path / "optimizer.pt", "a checkpoint's optimizer state")
        try:
            optimizer.load_state_dict(saved)
        except (KeyError, ValueError, TypeError) as e:
            raise BadFileError(path / "optimizer.pt", f"does not fit this run's optimizer ({e})") from None
    set_rng_state(read_safetensors(rng_file, "a checkpoint's RNG state"))
    return meta, rank_state


def remove_stale_tmp(ckpt_root: Path) -> None:
    """Half-written checkpoints of a crashed run are temporary folders; clear them."""
    if ckpt_root.exists():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
    os.makedirs(ckpt_root, exist_ok=True)
