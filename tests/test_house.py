"""The house rules that keep the core generic: the command line holds no defaults and names no
modality or objective; objectives, the trainer and the evaluators name no modality outside docstrings
and comments (they reach a modality only through the adapter contract and the registries)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from mmssl.registry import MODALITIES, OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
GENERIC = [ROOT / "mmssl" / "objectives", ROOT / "mmssl" / "train", ROOT / "eval"]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _kind_comparisons(tree: ast.AST) -> set[int]:
    """ids of the constants compared with an adapter's ``kind`` (``audio``, ``text``, ...: a kind of
    signal, not a modality's name)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(n, ast.Attribute) and n.attr == "kind"
                                                 for n in ast.walk(node)):
            out |= {id(n) for n in ast.walk(node) if isinstance(n, ast.Constant)}
        # a named kind constant (TEXT_KIND = "text") holds a kind, not a modality's name
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.endswith("_KIND") for t in node.targets):
            out |= {id(n) for n in ast.walk(node.value) if isinstance(n, ast.Constant)}
    return out


def named_in_code(path: Path, names: list[str]) -> list[str]:
    """Where the code of ``path`` names one of ``names`` as an identifier would: a string that is the
    name or joins it to a key (``"text"``, ``"speech_len"``, ``"modality.mri"``), an upper-case
    constant (``TEXT``, ``AUDIO_MODALITIES``) or an imported module path. Docstrings, comments, prose in
    messages ("a text tower"), comparisons with an adapter's ``kind`` and ``*_KIND`` constants are left
    alone."""
    src = path.read_text()
    tree = ast.parse(src)
    skip = _docstrings(tree) | _kind_comparisons(tree)
    alt = "|".join(map(re.escape, names))
    keyish = re.compile(rf"^({alt})$|(^|[_.=\[/])({alt})($|[_.=\]/])|(^|[\s(\[])({alt})[_.=]", re.IGNORECASE)
    const = re.compile(rf"(^|_)({alt})(_|$)", re.IGNORECASE)
    hits = []
    where = f"{path.name}" if ROOT not in path.parents else str(path.relative_to(ROOT))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                and keyish.search(node.value):
            hits.append((node.lineno, f"{where}:{node.lineno}: {node.value[:60]!r}"))
        elif isinstance(node, ast.Name) and node.id.isupper() and not node.id.endswith("_KIND") \
                and const.search(node.id):
            hits.append((node.lineno, f"{where}:{node.lineno}: {node.id}"))
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(re.search(rf"modalities\.({alt})(\.|$)", m) for m in mods):
                hits.append((node.lineno, f"{where}:{node.lineno}: import {mods[0]}"))
    return [h for _, h in sorted(hits)]


def test_named_in_code_finds_what_it_should() -> None:
    """The checker itself: a string literal, a constant and an import are found; docstrings, comments
    and words inside identifiers are not."""
    import tempfile

    src = ('"""A docstring may say speech."""\n'
           'import os  # a comment may say speech\n'
           'from mmssl.modalities.speech.data import X\n'
           'SPEECH_RATE = 1\n'
           'x = os.path.basename("a") + "speech"\n'
           'is_floating_point = True\n'
           'y = f"{x} is a speech tower" + "point_len"\n'
           'z = adapter.kind == "speech"\n')
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        p = Path(d) / "probe.py"
        p.write_text(src)
        hits = named_in_code(p, ["speech", "point"])
    assert [h.split(":")[1] for h in hits] == ["3", "4", "5", "7"], hits


def test_objectives_trainer_and_evaluators_name_no_modality() -> None:
    names = MODALITIES.names()
    hits = [h for d in GENERIC for p in sorted(d.rglob("*.py")) for h in named_in_code(p, names)]
    assert not hits, "modality names outside the adapters (use the adapter contract):\n" + "\n".join(hits)


def test_cli_names_no_modality_or_objective() -> None:
    hits = named_in_code(ROOT / "mmssl" / "cli.py", MODALITIES.names() + OBJECTIVES.names())
    assert not hits, "\n".join(hits)


def test_cli_holds_no_default_values() -> None:
    """Defaults live in configs/ and mmssl.config: the CLI has no default arguments, no ``.get(key,
    default)`` and no numbers beyond positions and exit codes."""
    tree = ast.parse((ROOT / "mmssl" / "cli.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                if not (isinstance(d, ast.Constant) and d.value is None):
                    found.append(f"line {d.lineno}: default argument {ast.unparse(d)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and len(node.args) > 1:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool) \
                and node.value not in (0, 1, 2, 3):
            found.append(f"line {node.lineno}: number {node.value}")
    assert not found, "\n".join(found)


def test_objective_yaml_leaves_the_modalities_keys_unset() -> None:
    """Each default exists once: a key a modality sets under ``objectives.<name>`` is null in the
    objective's yaml (else the yaml's value would silently decide, against the documented chain)."""
    conf = ROOT / "configs"
    clashes = []
    for mpath in sorted((conf / "modality").glob("*.yaml")):
        for obj, keys in (yaml.safe_load(mpath.read_text()).get("objectives") or {}).items():
            opath = conf / "objective" / f"{obj}.yaml"
            assert opath.exists(), f"{mpath.name}: objectives.{obj} names no objective config"
            own = yaml.safe_load(opath.read_text())
            for k in keys or {}:
                if k not in ("trainer", "pool", "adapter", "sizes", "decoder_sizes") and own.get(k) is not None:
                    clashes.append(f"{mpath.name} objectives.{obj}.{k} vs {opath.name} {k}: {own[k]!r}")
    assert not clashes, "\n".join(clashes)
