"""The evaluation harness every evaluator runs in, as DINOv2's evaluators share their setup.

What each evaluation of an encoder repeats lives here, once:

- the configuration: ``ecfg`` completed with the packaged ``configs/eval/<name>.yaml`` (``eval_config``),
  so a default is written in one place, the yaml, whether the CLI or a test calls the evaluator;
- the encoder and its random-init twin: the run's step-0 weights (``encoders_init/``), else the same
  architecture freshly initialised (``EncoderEval``); for a contrastive run, its pair of towers and the
  step-0 pair (``PairEval``), and which tower is of which kind (``ModalityAdapter.kind``);
- the labelled data: ``eval.max_train`` (a seeded cap on the training items, ``train_pool``) and
  ``eval.label_fraction`` x ``eval.seeds`` (stratified subsets, ``EncoderEval.subsets``);
- the result file: the header ``mmssl report`` reads, the largest fraction's summaries, ``seconds``,
  the atomic write of ``out/<name>.json`` (``results.write_result``) and the plot ``out/<name>.png``,
  with the plotting pieces the evaluators share (``figure``, ``fraction_bars``).

An evaluator keeps what is its own: the probe fit, the k-NN vote, the fine-tuning loop, its metrics."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache, cached_property
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml

from mmssl.data.loader import DataSource
from mmssl.encoder import Encoder
from mmssl.eval.feature_cache import cache_root_for
from mmssl.eval.features import init_encoder, input_size
from mmssl.eval.results import header, pair_init_label, write_result
from mmssl.eval.stats import fractions_and_seeds, label_subset
from mmssl.export import load_encoder, load_pair
from mmssl.registry import MODALITIES

#: result keys of the trained encoder carry no prefix, those of its random-init twin this one
TRAINED, RANDOM_INIT = "", "random_init_"
#: the ``ModalityAdapter.kind`` of a text tower (a kind, not a modality name: any text modality has it)
TEXT_KIND = "text"
#: (key prefix, legend, colour) of the sides a plot compares
SIDES = {TRAINED: ("trained", "tab:blue"), RANDOM_INIT: ("random init", "tab:gray"),
         "features_baseline_": ("classical features", "tab:orange")}


# -- configuration -------------------------------------------------------------------------------------
@cache
def _packaged(name: str) -> dict[str, Any]:
    path = files("mmssl.configs").joinpath("eval").joinpath(f"{name}.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"no configs/eval/{name}.yaml in mmssl.configs")
    return yaml.safe_load(path.read_text()) or {}


def eval_defaults(name: str) -> dict[str, Any]:
    """``configs/eval/<name>.yaml`` as shipped in ``mmssl.configs``: the one place an evaluator's
    defaults are written (a fresh copy: the caller may change it)."""
    return copy.deepcopy(_packaged(name))


def eval_config(name: str, ecfg: Mapping[str, Any]) -> dict[str, Any]:
    """``ecfg`` with each key it lacks taken from ``eval_defaults(name)``. The CLI composes ``ecfg`` from
    the same yaml, so nothing changes there; a caller with a partial dict gets what the CLI runs."""
    return {**eval_defaults(name), **ecfg}


# -- labelled data -------------------------------------------------------------------------------------
def train_pool(n: int, max_train: int | None) -> torch.Tensor:
    """Indices of the training items an evaluation may label: ``max_train`` of the n drawn at random
    (seed 0; extraction order follows length, so the first ones would not be a sample), in drawn order;
    all n in order when ``max_train`` is unset."""
    if not max_train:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[: int(max_train)]


def top_fraction(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``label_fractions`` row of the largest fraction: the one a result's headline reports."""
    return max(rows, key=lambda r: r["label_fraction"])


def headline(row: Mapping[str, Any], prefixes: Sequence[str] = (TRAINED, RANDOM_INIT),
             metric: str = "accuracy") -> dict[str, Any]:
    """A row's ``summarise`` keys (``<prefix>accuracy``, ``_std``, ``_ci95``, ``_per_seed``) of each side."""
    starts = tuple(f"{p}{metric}" for p in prefixes)
    return {k: v for k, v in row.items() if k.startswith(starts)}


# -- evaluations ---------------------------------------------------------------------------------------
class Evaluation:
    """What every evaluation has: a name (its result file's stem and its ``configs/eval/<name>.yaml``),
    its completed config ``ecfg``, its device and its clock."""

    def __init__(self, name: str, ecfg: Mapping[str, Any], device: torch.device) -> None:
        self.t0 = time.perf_counter()
        self.name = name
        self.ecfg = eval_config(name, ecfg)
        self.device = device

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 2)

    def write(self, out: str | Path, result: dict[str, Any],
              plot: Callable[[dict[str, Any], Path], None]) -> Path:
        """Stamp ``result["seconds"]``, write ``out/<name>.json`` atomically and plot ``out/<name>.png``
        -> the JSON's path."""
        result["seconds"] = self.seconds()
        return write_result(out, self.name, result, plot)


class EncoderEval(Evaluation):
    """One encoder's evaluation: the trained encoder and its random-init twin on ``device`` (the run's
    step-0 weights when it kept them, else a fresh initialisation, ``features.init_encoder``), the input
    size it was trained on, and the label fractions x seeds of ``ecfg``."""

    def __init__(self, name: str, encoder_path: str | Path, source: DataSource, ecfg: Mapping[str, Any],
                 device: torch.device) -> None:
        super().__init__(name, ecfg, device)
        self.path, self.source = encoder_path, source
        self.encoder = load_encoder(encoder_path, device=device)
        init, self.init_source = init_encoder(Path(encoder_path), self.encoder)
        self.init = init.to(device)
        self.input_size = input_size(self.encoder)
        self.fractions, self.seeds = fractions_and_seeds(self.ecfg)

    @property
    def twins(self) -> dict[str, Encoder]:
        """{result key prefix: encoder}: the trained encoder, then its random-init twin."""
        return {TRAINED: self.encoder, RANDOM_INIT: self.init}

    def cache_root(self, cache_dir: Path | None) -> Path | None:
        """Where cached features live (``eval.cache_features``; None: nowhere)."""
        return cache_root_for(cache_dir, bool(self.ecfg["cache_features"]))

    def train_pool(self, n: int) -> torch.Tensor:
        """``train_pool`` with ``eval.max_train``."""
        return train_pool(n, self.ecfg["max_train"])

    def subsets(self, labels: torch.Tensor, fractions: Sequence[float] | None = None
                ) -> Iterator[tuple[float, list[tuple[int, torch.Tensor]]]]:
        """For each label fraction (``fractions``, default ``eval.label_fraction`` in its order):
        (fraction, [(seed, indices into ``labels`` of that seed's stratified subset)])."""
        for f in self.fractions if fractions is None else fractions:
            yield f, [(s, label_subset(labels, f, s)) for s in self.seeds]

    def header(self) -> dict[str, Any]:
        return header(self.name, self.encoder, self.path, self.source, self.init_source)

    def print_summary(self, title: str, r: dict[str, Any], path: Path) -> None:
        """One line: trained accuracy [95% interval] | random init | classical features (where measured) |
        test items and classes -> the result file."""
        ci = r["accuracy_ci95"]
        base = f" | classical features {r['features_baseline_accuracy']:.3f}" if "features_baseline_accuracy" in r else ""
        print(f"{title}: trained {r['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | random init "
              f"{r['random_init_accuracy']:.3f}{base} | {r['n_test']} test items, {r['num_classes']} classes, "
              f"{r['seconds']:.0f}s -> {path}", flush=True)

    def result(self, rows: list[dict[str, Any]], prefixes: Sequence[str] = (TRAINED, RANDOM_INIT),
               **fields: Any) -> dict[str, Any]:
        """The common schema: the header, the largest fraction's summaries of each side, every
        fraction's row and the seed count, then the evaluator's ``fields``."""
        return {**self.header(), **headline(top_fraction(rows), prefixes), "label_fractions": rows,
                "seeds": len(self.seeds), **fields}


class PairEval(Evaluation):
    """A contrastive run's evaluation: its pair of towers in the shared space (``mmssl.export.load_pair``)
    and, loaded when first asked for, the step-0 pair (``encoders_init`` with ``heads_init``), its
    random-init twin."""

    def __init__(self, name: str, path: str | Path, source: DataSource, ecfg: Mapping[str, Any],
                 device: torch.device) -> None:
        super().__init__(name, ecfg, device)
        self.path, self.source = path, source
        self.pair = load_pair(path, which="encoders", device=device)

    @cached_property
    def init(self) -> Any:
        return load_pair(self.path, which="encoders_init", device=self.device)

    @property
    def twins(self) -> dict[str, Any]:
        return {TRAINED: self.pair, RANDOM_INIT: self.init}

    def towers(self, kind: str) -> list[str]:
        """The pair's modalities whose adapter is of ``kind`` (audio | text | image | point | signal |
        volume), in the pair's order."""
        return [m for m in self.pair.modalities if MODALITIES.get(m).kind == kind]

    def header(self, modality: str) -> dict[str, Any]:
        """The keys ``mmssl report`` reads; ``modality``: what the result is named after."""
        return {"evaluator": self.name, "modality": modality, "modalities": list(self.pair.modalities),
                "encoder": str(self.path), "data": str(self.source.root),
                "random_init_source": pair_init_label(self.init)}


# -- plots ---------------------------------------------------------------------------------------------
@contextmanager
def figure(path: Path, ncols: int = 1, figsize: tuple[float, float] = (6.4, 3.4)) -> Iterator[Any]:
    """matplotlib (headless) axes of one row of ``ncols`` panels -> laid out and saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def fraction_bars(ax: Any, r: dict[str, Any], prefixes: Sequence[str], digits: int = 3,
                  chance: bool = True) -> None:
    """Bars of ``<prefix>accuracy`` per label fraction of result ``r``, one per side, with the 95%
    interval as whiskers and the value above; chance (1 / classes) dashed."""
    rows = r["label_fractions"]
    width = 0.8 / len(prefixes)
    for j, prefix in enumerate(prefixes):
        name, colour = SIDES[prefix]
        xs = [i + (j - (len(prefixes) - 1) / 2) * width for i in range(len(rows))]
        vals = [row[f"{prefix}accuracy"] for row in rows]
        ci = [row[f"{prefix}accuracy_ci95"] for row in rows]
        err = [[max(v - c[0], 0.0) for v, c in zip(vals, ci)], [max(c[1] - v, 0.0) for v, c in zip(vals, ci)]]
        ax.bar(xs, vals, width, yerr=err, capsize=3, color=colour, label=name)
        for x, v, c in zip(xs, vals, ci):
            ax.text(x, max(v, c[1]) + 0.02, f"{v:.{digits}f}", ha="center", fontsize=7)
    if chance:
        ax.axhline(1.0 / max(r["num_classes"], 1), color="k", lw=0.8, ls="--", label="chance")
    ax.set_xticks(range(len(rows)), [f"{row['label_fraction']:g}\n(n={row['n_train']})" for row in rows])
    ax.set_xlabel("label fraction (training items)")
    ax.set_ylim(0, 1.1)
