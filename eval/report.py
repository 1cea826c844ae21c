"""``mmssl report RUN_DIR... [out=DIR]``: every evaluation result of several runs in one Markdown table,
with plots (probe accuracy per layer, accuracy per label fraction, pretrained against random init).

A result is a ``*.json`` found anywhere under a run directory (``checkpoints/``, ``encoders*/``,
``heads/``, ``tensorboard/`` and hidden folders excluded) that carries an ``"evaluator"`` key (the
common schema of issue 7), or the core linear probe's ``linear_probe.json`` (no ``"evaluator"`` key;
``accuracy``, ``random_init_accuracy``, ``features_baseline_accuracy``, ``layer``). Other JSON files
(data meta, feature-cache notes) are not results and are left alone. A result file that cannot be
read, or lacks the numbers a row needs, is skipped and listed in the report with the reason; it
never stops the report. The objective and the number of steps come from ``RUN/config.yaml`` and the
last ``step`` of ``RUN/metrics.jsonl`` (else ``trainer.max_steps``) where those exist."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EXCLUDED_DIRS = ("checkpoints", "heads", "tensorboard")
CORE_PROBE_KEYS = ("accuracy", "random_init_accuracy", "features_baseline_accuracy", "layer")
#: evaluators scored by recall at K rather than accuracy (tabled apart by ``retrieval_table``)
RANKING_EVALUATORS = ("retrieval",)
RECALL_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


@dataclass
class RunInfo:
    name: str
    path: Path
    objective: str = "-"
    steps: str = "-"
    modality: str = "-"


@dataclass
class Result:
    run: RunInfo
    file: Path                      # relative to the run directory
    data: dict[str, Any]            # the JSON, with "evaluator" filled in for the core probe
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per label fraction


def _excluded(rel: Path) -> bool:
    return any(p in EXCLUDED_DIRS or p.startswith(("encoders", ".")) for p in rel.parts[:-1])


def _run_info(path: Path, name: str) -> RunInfo:
    info = RunInfo(name=name, path=path)
    cfg_path = path / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
    except (OSError, yaml.YAMLError):
        cfg = None
    if isinstance(cfg, dict):
        obj = cfg.get("objective")
        info.objective = str(obj.get("name", "-")) if isinstance(obj, dict) else "-"
        mod = cfg.get("modality")
        info.modality = "+".join(mod) if isinstance(mod, dict) else "-"
        steps = (cfg.get("trainer") or {}).get("max_steps") if isinstance(cfg.get("trainer"), dict) else None
        info.steps = "-" if steps is None else str(steps)
    last = _last_step(path / "metrics.jsonl")
    if last is not None:
        info.steps = str(last)
    return info


def _with_encoder_run(info: RunInfo, data: dict[str, Any]) -> RunInfo:
    """Results kept outside their run (``out=DIR``): objective and steps from the run directory of the
    evaluated encoder (``RUN/encoders/<modality>``) when the folder given has no config.yaml."""
    if (info.path / "config.yaml").is_file() or not isinstance(data.get("encoder"), str):
        return info
    enc = Path(data["encoder"])
    run = enc.parent.parent if enc.parent.name.startswith("encoders") else enc
    if not (run / "config.yaml").is_file():
        return info
    found = _run_info(run, info.name)
    found.path = info.path
    return found


def _last_step(path: Path) -> int | None:
    """The ``step`` of the last complete line of metrics.jsonl (reads only its tail)."""
    if not path.is_file():
        return None
    with path.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 8192))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            return rec["step"]
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _as_result(data: Any, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the result with its "evaluator", None) | (None, why it is skipped) | (None, None): not a result."""
    if not isinstance(data, dict):
        return (None, "not a JSON object") if name == "linear_probe.json" else (None, None)
    if "evaluator" not in data:
        if name != "linear_probe.json" and not all(k in data for k in CORE_PROBE_KEYS):
            return None, None
        data = {**data, "evaluator": "linear_probe"}
    if data.get("evaluator") in RANKING_EVALUATORS:  # recalls, not accuracies: their own table
        return None, None
    missing = [k for k in ("accuracy", "random_init_accuracy") if not _is_number(data.get(k))]
    if missing:
        return None, f"partial: no {', '.join(missing)}"
    fr = data.get("label_fractions")
    if fr is not None:
        ok = isinstance(fr, list) and fr and all(
            isinstance(e, dict) and _is_number(e.get("label_fraction")) and _is_number(e.get("accuracy"))
            and _is_number(e.get("random_init_accuracy")) for e in fr)
        if not ok:
            return None, "partial: malformed label_fractions"
    return data, None


def _rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per label fraction (the core probe: one row at fraction 1)."""
    if data.get("label_fractions"):
        return sorted(data["label_fractions"], key=lambda e: e["label_fraction"])
    return [{"label_fraction": 1.0, "n_train": data.get("n_train"),
             **{k: v for k, v in data.items() if k.startswith(("accuracy", "random_init_accuracy"))}}]


def collect(run_dirs: Sequence[Path]) -> tuple[list[Result], list[tuple[str, str]]]:
    """Every result under the run directories -> (results, [(path, why skipped)])."""
    results: list[Result] = []
    skipped: list[tuple[str, str]] = []
    paths = [Path(p) for p in run_dirs]
    names = [p.resolve().name or str(p) for p in paths]
    for path, name in zip(paths, names):
        label = name if names.count(name) == 1 else str(path)
        if not path.is_dir():
            skipped.append((str(path), "not a directory"))
            continue
        info = _run_info(path, label)
        for f in sorted(path.rglob("*.json")):
            rel = f.relative_to(path)
            if _excluded(rel) or not f.is_file():
                continue
            try:
                data = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                skipped.append((str(f), f"unreadable JSON ({type(e).__name__})"))
                continue
            res, why = _as_result(data, f.name)
            if why:
                skipped.append((str(f), why))
            elif res is not None:
                results.append(Result(_with_encoder_run(info, res), rel, res, _rows(res)))
    return results, skipped


# -- formatting ----------------------------------------------------------------------------------------
def _fmt_acc(row: dict[str, Any], prefix: str, seeds: int) -> str:
    k = prefix + "accuracy"
    s = f"{row[k]:.3f}"
    if seeds > 1 and _is_number(row.get(k + "_std")):
        s += f" ± {row[k + '_std']:.3f}"
    ci = row.get(k + "_ci95")
    if isinstance(ci, list) and len(ci) == 2 and all(_is_number(v) for v in ci):
        s += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return s


def _detail(d: dict[str, Any]) -> str:
    """A few settings that tell results of one evaluator apart."""
    ev = d["evaluator"]
    parts = []
    if ev == "layer_probe":
        b = d.get("best_single_layer")
        if isinstance(b, dict) and _is_number(b.get("accuracy")):
            parts.append(f"best single layer {b.get('layer')} {b['accuracy']:.3f}")
    for key, short in (("layer", "layer"), ("pool", "pool"), ("k", "k"), ("T", "T"), ("mode", "mode")):
        if key in d and not isinstance(d[key], (dict, list)):
            parts.append(f"{short} {d[key]}")
    if _is_number(d.get("features_baseline_accuracy")):
        parts.append(f"classical features {d['features_baseline_accuracy']:.3f}")
    return ", ".join(parts) or "-"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def results_table(results: list[Result]) -> list[str]:
    head = ["run", "modality", "objective", "steps", "evaluator", "detail", "label fraction", "n train", "seeds",
            "accuracy ± std [95% CI]", "random init ± std [95% CI]", "Δ", "file"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        d = r.data
        seeds = int(d["seeds"]) if _is_number(d.get("seeds")) else 1
        for row in r.rows:
            cells = [r.run.name, str(d.get("modality") or r.run.modality), r.run.objective, r.run.steps,
                     d["evaluator"], _detail(d), f"{row['label_fraction']:g}",
                     "-" if row.get("n_train") is None else str(row["n_train"]), str(seeds), _fmt_acc(row, "", seeds),
                     _fmt_acc(row, "random_init_", seeds), f"{row['accuracy'] - row['random_init_accuracy']:+.3f}",
                     str(r.file)]
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return lines


def _numbers(v: Any, n: int | None = None) -> list[float] | None:
    """v if it is a (non-empty, length-n) list of finite numbers, else None."""
    if isinstance(v, list) and v and all(_is_number(x) for x in v) and (n is None or len(v) == n):
        return [float(x) for x in v]
    return None


def layer_table(results: list[Result]) -> list[str]:
    """Learned layer weights and single-layer accuracies of every layer-weighted probe."""
    lines = []
    for r in results:
        d = r.data
        names = d.get("layer_names")
        if d["evaluator"] != "layer_probe" or not isinstance(names, list) or not names:
            continue
        table = [(label, _numbers(d.get(key), len(names))) for label, key in (
            ("layer weight", "layer_weights"), ("layer weight, random init", "random_init_layer_weights"),
            ("single-layer accuracy", "per_layer_accuracy"),
            ("single-layer accuracy, random init", "random_init_per_layer_accuracy"))]
        table = [(label, vals) for label, vals in table if vals is not None]
        if not table:
            continue
        lines += [f"**{_md_escape(r.run.name)}** (`{r.file}`)", "",
                  "| | " + " | ".join(_md_escape(str(n)) for n in names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for label, vals in table] + [""]
    return lines


# -- plots ---------------------------------------------------------------------------------------------
def _label(r: Result) -> str:
    return f"{r.run.name} {r.data['evaluator']}" + (f" ({r.file.parent})" if str(r.file.parent) != "." else "")


def _ci_err(rows: list[dict[str, Any]], prefix: str) -> list[list[float]] | None:
    """Asymmetric error bars [[below...], [above...]] from the 95% intervals, where every row has one."""
    k = prefix + "accuracy"
    cis = [row.get(k + "_ci95") for row in rows]
    if not all(isinstance(c, list) and len(c) == 2 for c in cis):
        return None
    return [[max(row[k] - c[0], 0.0) for row, c in zip(rows, cis)],
            [max(c[1] - row[k], 0.0) for row, c in zip(rows, cis)]]


def _finish(fig: Any, ax: Any, title: str, path: Path, legend_size: int = 7) -> None:
    """The accuracy axis, title and legend every report plot shares; save and close."""
    import matplotlib.pyplot as plt

    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_layers(results: list[Result], path: Path) -> bool:
    lp = [(r, acc) for r in results if r.data["evaluator"] == "layer_probe"
          and (acc := _numbers(r.data.get("per_layer_accuracy"))) is not None]
    if not lp:
        return False
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (r, acc) in enumerate(lp):
        c = f"C{i % 10}"
        ax.plot(range(len(acc)), acc, "o-", color=c, label=f"{_label(r)}, trained")
        racc = _numbers(r.data.get("random_init_per_layer_accuracy"), len(acc))
        if racc is not None:
            ax.plot(range(len(racc)), racc, "o--", color=c, alpha=0.6, label=f"{_label(r)}, random init")
    names = [r.data.get("layer_names") for r, _ in lp]
    longest = max(len(acc) for _, acc in lp)
    if all(n == names[0] for n in names) and isinstance(names[0], list) and len(names[0]) == longest:
        ax.set_xticks(range(longest), [str(n) for n in names[0]])
    else:
        ax.set_xticks(range(longest))
        ax.set_xlabel("layer (block index; the last point of a run may be its final output)")
    ax.set_ylabel("test accuracy, single layer")
    _finish(fig, ax, "probe accuracy per layer", path, legend_size=7)
    return True


def plot_fractions(results: list[Result], path: Path) -> bool:
    results = [r for r in results if len(r.rows) > 1]  # a single fraction is no curve
    if not results:
        return False
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, r in enumerate(results):
        c = f"C{i % 10}"
        x = [row["label_fraction"] for row in r.rows]
        for prefix, style, alpha, who in (("", "o-", 1.0, "trained"), ("random_init_", "s--", 0.6, "random init")):
            y = [row[prefix + "accuracy"] for row in r.rows]
            ax.errorbar(x, y, yerr=_ci_err(r.rows, prefix), fmt=style, color=c, alpha=alpha, capsize=3,
                        label=f"{_label(r)}, {who}")
    ax.set_xscale("log")
    ax.set_xlabel("label fraction")
    ax.set_ylabel("test accuracy (95% CI)")
    _finish(fig, ax, "accuracy per label fraction", path, legend_size=7)
    return True


def plot_pretrained_vs_random(results: list[Result], path: Path) -> bool:
    if not results:
        return False
    import matplotlib.pyplot as plt

    tops = [r.rows[-1] for r in results]  # the largest label fraction of each result
    x = list(range(len(results)))
    w = 0.4
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(results) + 2), 3.8))
    ax.bar([i - w / 2 for i in x], [t["accuracy"] for t in tops], w, yerr=_ci_err(tops, ""), capsize=3,
           color="tab:blue", label="pretrained")
    ax.bar([i + w / 2 for i in x], [t["random_init_accuracy"] for t in tops], w, yerr=_ci_err(tops, "random_init_"),
           capsize=3, color="tab:gray", label="random init")
    ax.set_xticks(x, [_label(r).replace(" ", "\n", 1) for r in results], fontsize=7)
    ax.set_ylabel("test accuracy (95% CI)")
    _finish(fig, ax, "pretrained vs random init", path, legend_size=8)
    return True


# -- the report ----------------------------------------------------------------------------------------
def retrieval_table(run_dirs: Sequence[Path]) -> list[str]:
    """One row per ``retrieval.json`` under the runs: each recall, trained / random init."""
    head = ["run", "pair", "n items", "captions", *RECALL_KEYS, "file"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in map(Path, run_dirs):
        for f in sorted(path.rglob("retrieval.json")) if path.is_dir() else []:
            try:
                d = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(d, dict) or not all(_is_number(d.get(k)) and _is_number(d.get("random_init_" + k))
                                                  for k in RECALL_KEYS):
                continue
            cells = [path.resolve().name, "+".join(d.get("modalities") or []), str(d.get("n_items", "-")),
                     str(d.get("n_captions", "-")),
                     *[f"{d[k]:.3f} / {d['random_init_' + k]:.3f}" for k in RECALL_KEYS], str(f.relative_to(path))]
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return lines if len(lines) > 2 else []


def build_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Gather the results of ``run_dirs`` into ``out/report.md`` and the PNGs it links; -> its path."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results, skipped = collect(run_dirs)
    results.sort(key=lambda r: (r.run.name, r.data["evaluator"], str(r.file)))
    lines = ["# mmssl report", "", "Runs: " + ", ".join(f"`{p}`" for p in run_dirs), "",
             (f"{len(results)} result files, {len(skipped)} skipped. Accuracy is on the test split at each label "
              "fraction; ± is the standard deviation over seeds (shown with more than one seed), brackets the "
              "bootstrap 95% interval over test items; Δ = pretrained − random init (step-0 weights of the run, "
              "or a fresh initialisation of the same architecture)."), ""]
    if results:
        lines += ["## Results", ""] + results_table(results) + [""]
        lt = layer_table(results)
        if lt:
            lines += ["## Layer-weighted probes", "", ("Softmax layer weights learned by the probe, and the test "
                                                       "accuracy of the same probe on each layer alone."), ""] + lt
    rt = retrieval_table(run_dirs)
    if rt:
        lines += ["## Retrieval", "", "Recall at K on the test split, trained / random init (step 0).", ""] + rt + [""]
    plots = [("layer_accuracy.png", "Probe accuracy per layer", plot_layers),
             ("label_fractions.png", "Accuracy per label fraction", plot_fractions),
             ("pretrained_vs_random.png", "Pretrained vs random init", plot_pretrained_vs_random)]
    written = [(name, title) for name, title, fn in plots if fn(results, out / name)]
    if written:
        lines += ["## Plots", ""]
        for name, title in written:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    if skipped:
        lines += ["## Skipped", "", f"{len(skipped)} files skipped:", ""]
        lines += [f"- `{p}`: {why}" for p, why in skipped] + [""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md


def main_report(paths: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """``mmssl report RUN_DIR... [out=DIR]`` (default ``out=report``): writes the report, prints where."""
    if not paths:
        raise ValueError("mmssl report needs at least one run directory")
    md = build_report([Path(p) for p in paths], Path(out) if out else Path("report"))
    print(f"report of {len(paths)} run directories -> {md}", flush=True)
    return md
