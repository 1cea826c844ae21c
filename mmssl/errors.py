"""mmssl's user-error types, and readers that turn a bad file into one of them.

A user error (a wrong key or value, a file that is missing, truncated, corrupt, of the wrong kind or
unreadable) is an ``MmsslError``: ``mmssl`` prints it as one line and exits 2, and the Python API raises
it with the same text. Each type also derives from the builtin its callers used to catch (``ValueError``,
``FileNotFoundError``), so existing ``except ValueError`` code keeps working. Anything else is a bug
and keeps its traceback."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MmsslError(Exception):
    """Base of every error that is the user's to fix."""


class ConfigError(MmsslError, ValueError):
    """A wrong key, value or combination on the command line or in a config."""


class UnknownNameError(ConfigError, KeyError):
    """A name that is not registered: a modality, objective, size, model key or data split. A
    ``KeyError`` too, for the callers that look a name up and fall back."""

    def __str__(self) -> str:  # the message, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


class BadFileError(MmsslError, ValueError):
    """A file mmssl reads is missing, empty, truncated, corrupt, of the wrong kind or unreadable.
    The message names the file and what is wrong with it."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path, self.what = Path(path), what
        super().__init__(f"{path}: {what}")


class MissingFileError(BadFileError, FileNotFoundError):
    """A file or folder that should be there is not."""


class CheckpointWriteError(BadFileError, OSError):
    """A checkpoint could not be written (a full disk, a lost mount): the run stops, the previous
    checkpoint stays intact and the partial one is removed."""


def _why(e: BaseException) -> str:
    """A short reason from a library's exception (its first line), for a BadFileError."""
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(e, UnicodeDecodeError):
        return "not text (undecodable bytes)"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def check_readable(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a readable, non-empty file; else a BadFileError naming ``what`` it
    should be."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(p, f"no such file (expected {what})")
    if p.is_dir():
        raise BadFileError(p, f"is a directory, not {what}")
    try:
        with p.open("rb") as f:
            head = f.read(1)
    except OSError as e:
        raise BadFileError(p, _why(e)) from None
    if not head:
        raise BadFileError(p, f"empty file (expected {what})")
    return p


def read_json(path: str | Path, what: str = "a JSON file") -> Any:
    """The parsed JSON of ``path``; a BadFileError when it is missing, empty, unreadable or not JSON."""
    p = check_readable(path, what)
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadFileError(p, _why(e)) from None
    except json.JSONDecodeError as e:
        raise BadFileError(p, f"not valid JSON ({e.msg} at line {e.lineno}); expected {what}") from None


def read_json_object(path: str | Path, what: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object with at least ``keys``; a BadFileError otherwise."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise BadFileError(path, f"holds a JSON {type(obj).__name__}, not an object (expected {what})")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise BadFileError(path, f"lacks {', '.join(missing)} (expected {what})")
    return obj


def read_safetensors(path: str | Path, what: str = "safetensors weights") -> dict[str, Any]:
    """The tensors of a safetensors file; a BadFileError when it is missing, truncated or corrupt."""
    from safetensors.torch import load_file

    p = check_readable(path, what)
    try:
        return load_file(str(p))
    except OSError as e:
        raise BadFileError(p, _why(e)) from None
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError, not exported)
        raise BadFileError(p, f"not a readable safetensors file ({_why(e)}); expected {what}") from None


def torch_load_weights(path: str | Path, what: str = "a torch.save file of tensors") -> Any:
    """``torch.load(weights_only=True)`` of ``path``: no pickle that could run code is executed; a
    refused class, a truncated or corrupt file is a BadFileError naming the file."""
    import pickle

    import torch

    p = check_readable(path, what)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln.strip() for ln in first if "Unsupported global" in ln or "GLOBAL" in ln), first[0] if first else "")
        raise BadFileError(p, f"refused by torch.load(weights_only=True) ({why[:160]}); expected {what}") from None
    except OSError as e:
        raise BadFileError(p, _why(e)) from None
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
        # torch's zip and legacy readers fail on a truncated or foreign file in many ways
        raise BadFileError(p, f"not a torch.save file ({_why(e)}); expected {what}") from None
