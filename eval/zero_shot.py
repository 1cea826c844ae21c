"""Zero-shot classification through a contrastive pair's text tower (CLIP, Radford et al., 2021, sec. 3.1.4).

Each class name is written into every prompt template ("a photo of a {}."), the text tower embeds the
filled prompts, each embedding is L2-normalised, they are averaged over templates and the mean is
normalised again: one class embedding per class. The other tower's item is assigned the class of
highest cosine similarity (ties: the lower class index). No label of the data set is used to build
the classifier, so the protocol has no hyper-parameters beyond the prompts.

``run_zero_shot`` writes ``out/zero_shot.json`` in the common result schema (``accuracy`` with its
bootstrap 95% interval, ``random_init_accuracy`` of the step-0 twin ``encoders_init``) plus per-class
accuracies and the confusion matrix, and ``out/zero_shot.png``. Class names come from the data set's
``meta.json`` ``classes``, templates from its ``prompts`` unless ``eval.prompts`` overrides them."""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmssl.data.loader import DataSource, iter_split
from mmssl.eval.protocol import RANDOM_INIT, TEXT_KIND, PairEval, figure
from mmssl.eval.stats import summarise
from mmssl.registry import MODALITIES
from mmssl.types import Batch

PLACEHOLDER = "{}"


def fill_templates(classes: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """-> texts[c][t]: class c written into template t at its ``{}``."""
    if not classes or not templates:
        raise ValueError("zero-shot needs at least one class name and one prompt template")
    bad = [t for t in templates if PLACEHOLDER not in t]
    if bad:
        raise ValueError(f"prompt templates need a {PLACEHOLDER} where the class name goes: {bad}")
    # replace, not str.format: a template may hold other braces
    return [[t.replace(PLACEHOLDER, c) for t in templates] for c in classes]


def tokenise(modality: str, texts: Sequence[str], max_len: int | None) -> Batch:
    """Raw strings -> one batch of ``modality`` (a text tower's), as its data pipeline makes batches: the
    adapter's codec stores each string as a shard sample would hold it (``encode``), reads it back
    (``decode``: the tokenizer) and collates, cutting to ``max_len``. The codec has no call from a raw
    string to a decoded item, hence the round trip through the stored form."""
    codec = MODALITIES.get(modality).codec
    field = codec.modality  # the item's field, and the batch keys' stem
    batch = codec.collate([codec.decode(codec.encode({field: s})) for s in texts], max_len, None)
    return {k.replace(field, modality, 1): v for k, v in batch.items()}


@torch.no_grad()
def class_text_embeddings(pair: Any, text_modality: str, classes: Sequence[str], templates: Sequence[str],
                          device: torch.device | str, batch_size: int = 256) -> torch.Tensor:
    """The zero-shot classifier: -> [C, E] float32 on ``device``, row c = normalise(mean over templates t
    of normalise(embed(template_t filled with class_c))). Texts are tokenised as the text tower's codec
    does (``tokenise``) and cut to its context (``pair.input_size``)."""
    texts = [s for row in fill_templates(classes, templates) for s in row]  # class-major: [C * T]
    max_len = pair.input_size(text_modality)
    embs = []
    for i in range(0, len(texts), batch_size):
        batch = {k: v.to(device) for k, v in tokenise(text_modality, texts[i:i + batch_size], max_len).items()}
        embs.append(F.normalize(pair.embed(text_modality, batch).float(), dim=1))
    per_prompt = torch.cat(embs).reshape(len(classes), len(templates), -1)  # [C, T, E]
    return F.normalize(per_prompt.mean(1), dim=1)


def zero_shot_predict(items: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """items [n, E], class_emb [C, E] -> predicted class [n] int64: argmax of cosine similarity (the
    first of tied classes)."""
    if not torch.isfinite(items).all() or not torch.isfinite(class_emb).all():
        raise ValueError("zero-shot embeddings hold NaN or inf: the encoder diverged")
    sim = F.normalize(items.float(), dim=1) @ F.normalize(class_emb.float().to(items.device), dim=1).T
    return sim.argmax(1)


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, float | None]:
    """pred [n], labels [n] -> {class name: accuracy on its items, None where it has none}."""
    out: dict[str, float | None] = {}
    for c, name in enumerate(classes):
        sel = labels == c
        out[str(name)] = float((pred[sel] == c).float().mean()) if sel.any() else None
    return out


def confusion(pred: torch.Tensor, labels: torch.Tensor, C: int) -> list[list[int]]:
    """-> counts [C][C], row = true class, column = predicted class."""
    m = torch.zeros(C * C, dtype=torch.long).index_add_(0, labels.long() * C + pred.long(),
                                                        torch.ones_like(labels, dtype=torch.long))
    return m.reshape(C, C).tolist()


# -- the evaluator --------------------------------------------------------------------------------------
def _prompts(source: DataSource, cfg: dict[str, Any]) -> list[str]:
    p = cfg["prompts"] or source.meta.get("prompts")
    if not p:
        raise ValueError(f"zero-shot needs prompt templates: {source.root}/meta.json has no 'prompts'; "
                         f"give eval.prompts=['a photo of a {{}}.']")
    return [p] if isinstance(p, str) else [str(t) for t in p]


@torch.no_grad()
def _embed_items(pairs: dict[str, Any], modality: str, source: DataSource, split: str, batch_size: int,
                 device: torch.device, bad: Counter) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One pass over the split reading only ``modality`` -> ({pair name: [n, E]}, labels [n])."""
    reader = DataSource(source.root, source.meta, [modality])  # no caption decoding
    max_len = next(iter(pairs.values())).input_size(modality)
    embs: dict[str, list[torch.Tensor]] = {p: [] for p in pairs}
    labels: list[torch.Tensor] = []
    for batch in iter_split(reader, split, batch_size, bad, max_len=max_len):
        if "label" not in batch:
            raise ValueError(f"split {split!r} of {source.root} has items without a class label: zero-shot "
                             f"accuracy needs one class per item")
        b = {k: v.to(device) for k, v in batch.items()}
        for name, pair in pairs.items():
            embs[name].append(pair.embed(modality, b).float().cpu())
        labels.append(batch["label"])
    if not labels:
        raise ValueError(f"split {split!r} of {source.root} has no usable samples")
    return {p: torch.cat(e) for p, e in embs.items()}, torch.cat(labels)


def run_zero_shot(path: str | Path, out: str | Path, source: DataSource, cfg: dict[str, Any],
                  device: torch.device, batch_size: int = 32, cache_dir: Path | None = None) -> dict[str, Any]:
    """Zero-shot classification of split ``cfg["split"]`` of ``source`` by the contrastive run ``path``
    (see module doc) -> the result dict, also written to ``out/zero_shot.json`` and plotted in
    ``out/zero_shot.png``. ``cfg``: split, prompts (null: the data set's), defaults in
    configs/eval/zero_shot.yaml. ``cache_dir`` is unused."""
    ev = PairEval("zero_shot", path, source, cfg, device)
    pair = ev.pair
    texts = ev.towers(TEXT_KIND)
    if len(texts) != 1:
        raise ValueError(f"zero-shot classifies through a text tower; the pair in {path} is "
                         f"{'+'.join(pair.modalities)}")
    text = texts[0]
    other = next(m for m in pair.modalities if m != text)
    classes = [str(c) for c in (source.meta.get("classes") or [])]
    if not classes:
        raise ValueError(f"zero-shot needs class names: {source.root}/meta.json has no 'classes'")
    prompts = _prompts(source, ev.ecfg)
    fill_templates(classes, prompts)  # refuse bad templates before reading any data
    split = str(ev.ecfg["split"])

    bad: Counter = Counter()
    items, labels = _embed_items(ev.twins, other, source, split, batch_size, device, bad)
    C = len(classes)
    if int(labels.min()) < 0 or int(labels.max()) >= C:
        raise ValueError(f"labels of split {split!r} lie outside the {C} classes of {source.root}/meta.json")
    counts = torch.bincount(labels, minlength=C)
    result: dict[str, Any] = {**ev.header(other), "split": split}
    for prefix, p in ev.twins.items():
        pred = zero_shot_predict(items[prefix], class_text_embeddings(p, text, classes, prompts, device).cpu())
        result.update(summarise([(pred == labels).float()], prefix=prefix))  # accuracy, _std, _ci95, _per_seed
        result[f"{prefix}per_class_accuracy"] = per_class_accuracy(pred, labels, classes)
        result[f"{prefix}confusion"] = confusion(pred, labels, C)
    result.update({
        "seeds": 1,
        # the stronger of the two trivial baselines: always guessing the most common class (= 1/C if balanced)
        "chance": float(counts.max()) / len(labels), "chance_uniform": 1.0 / C,
        "n_items": len(labels), "n_test": len(labels), "num_classes": C, "classes": classes, "prompts": prompts,
        "skipped_samples": dict(bad),
    })
    where = ev.write(out, result, plot_zero_shot)
    ci = result["accuracy_ci95"]
    print(f"zero-shot ({other} by {text}, {len(prompts)} prompts): trained {result['accuracy']:.3f} "
          f"[{ci[0]:.3f}, {ci[1]:.3f}] | random init {result['random_init_accuracy']:.3f} | chance "
          f"{result['chance']:.3f} | {len(labels)} items, {C} classes -> {where}", file=sys.stdout, flush=True)
    return result


def plot_zero_shot(r: dict[str, Any], path: Path) -> None:
    """Per-class accuracy bars, trained against random init; overall accuracies in the legend."""
    classes = r["classes"]
    text = next(m for m in r["modalities"] if m != r["modality"])
    width = 0.38
    with figure(path, figsize=(max(4.8, 1.6 + 0.5 * len(classes)), 3.4)) as ax:
        for j, (prefix, name, colour) in enumerate([("", "trained", "tab:blue"),
                                                    (RANDOM_INIT, "random init", "tab:gray")]):
            xs = [i + (j - 0.5) * width for i in range(len(classes))]
            vals = [r[f"{prefix}per_class_accuracy"][c] or 0.0 for c in classes]
            ax.bar(xs, vals, width, color=colour, label=f"{name} ({r[f'{prefix}accuracy']:.2f})")
        ax.axhline(r["chance"], color="k", lw=0.8, ls="--", label="chance")
        many = len(classes) > 6
        ax.set_xticks(range(len(classes)), classes, rotation=45 if many else 0, ha="right" if many else "center",
                      fontsize=7)
        ax.set_ylim(0, 1.25)  # room for the legend above the bars
        ax.set_ylabel("accuracy")
        ax.set_title(f"zero-shot {r['modality']} by {text}, {r['n_items']} items ({r['split']}), "
                     f"{len(r['prompts'])} prompts", fontsize=9)
        ax.legend(loc="upper left", fontsize=7, ncol=3)
