"""Embedded paired presets: ``scene-captions`` (image + text) and ``sound-captions`` (speech + text).

Each sample of a pair preset holds both modalities' codec fields (``png`` or ``flac``, and ``txt``,
the caption), ``sid`` and ``cls`` (the label index, for zero-shot classification with ``classes`` and
``prompts`` from meta.json). Captions repeat across items by design (a few hundred distinct captions
or fewer), so retrieval counts any item with the identical caption as a hit; meta.json records the
number of distinct captions per split under ``captions``."""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from mmssl.data.pool import pooled
from mmssl.data.shards import build_atomically, write_split
from mmssl.modalities.image.data import ImageCodec
from mmssl.modalities.speech.data import SpeechCodec
from mmssl.modalities.text.data import TOKENIZER_NAME, TextCodec
from mmssl.registry import PRESETS

#: (the other modality's encoded fields, caption, label) for one item
Pair = tuple[dict[str, Any], str, int]


def pair_sample(i: int, fields: dict[str, Any], caption: str, label: int) -> dict[str, Any]:
    """One shard sample: the other modality's encoded ``fields`` plus the caption's ``txt``, ``sid``
    (= ``i``, unique within the split) and ``cls``."""
    s = dict(fields)
    s.update(TextCodec().encode({"text": caption}))
    s.update({"__key__": f"{i:08d}", "sid": str(i).encode(), "cls": str(int(label)).encode()})
    return s


def _samples(pairs: Iterable[Pair], captions: Counter[str]) -> Iterator[dict[str, Any]]:
    """Shard samples numbered from 0, counting each caption into ``captions`` on the way."""
    for i, (fields, caption, label) in enumerate(pairs):
        captions[caption] += 1
        yield pair_sample(i, fields, caption, label)


def write_pairs(out: Path, meta: dict[str, Any],
                splits: dict[str, Callable[[], Iterable[Pair]]]) -> dict[str, Any]:
    """Write every split's pairs into shards under ``out/<split>/`` (8 train shards, 2 for the other
    splits), complete ``meta`` with ``splits`` (shards, count), ``captions`` (distinct captions per
    split) and ``bad_samples``, write ``out/meta.json`` and return the meta."""
    meta = {**meta, "splits": {}, "captions": {}, "bad_samples": {}}
    for split, make in splits.items():
        captions: Counter[str] = Counter()
        shards = write_split(_samples(make(), captions), out / split, num_shards=8 if split == "train" else 2)
        meta["splits"][split] = {"shards": shards, "count": sum(captions.values())}
        meta["captions"][split] = len(captions)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


class _PairPreset(ABC):
    """What both pair presets share: sizes, the cache folder, the build through ``write_pairs``."""

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, str]]
    version: ClassVar[int] = 1

    @abstractmethod
    def generator(self) -> Any:
        """The generator module: ``GENERATOR_VERSION``, ``SPLITS``, ``CLASSES``, ``PROMPTS``,
        ``generate(split, n, seed)`` yielding items with ``caption`` and ``label``."""

    @abstractmethod
    def encode(self, item: Any) -> dict[str, Any]:
        """A generated item -> the non-text modality's encoded fields."""

    def extra_meta(self) -> dict[str, Any]:
        return {}

    def build(self, out: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> None:
        """Generate the preset into ``out``. ``sizes`` (split -> items; default the generator's
        ``SPLITS``) is for small test builds only: a shipped preset always has the full sizes."""
        gen = self.generator()
        sizes = dict(gen.SPLITS if sizes is None else sizes)
        meta: dict[str, Any] = {
            "name": self.name, "modalities": list(self.modalities),
            "generator_version": gen.GENERATOR_VERSION, "seed": seed,
            "classes": list(gen.CLASSES), "prompts": list(gen.PROMPTS),
            "tokenizer": TOKENIZER_NAME, **self.extra_meta()}

        def pairs(split: str) -> Callable[[], Iterator[Pair]]:
            return lambda: pooled(gen.generate, split, sizes[split], seed=seed,
                                  then=lambda x: (self.encode(x), x.caption, x.label))

        write_pairs(Path(out), meta, {s: pairs(s) for s in sizes})

    def ensure(self, cache_dir: Path, seed: int = 0) -> Path:
        root = Path(cache_dir) / "data" / f"{self.name}-v{self.version}-seed{seed}"
        return build_atomically(root, lambda tmp: self.build(tmp, seed))


@PRESETS.register("scene-captions")
class SceneCaptionsPreset(_PairPreset):
    """32x32 scenes of one coloured shape, captioned "a {size} {colour} {shape} {position}"; label =
    shape (``modalities/pairs/scenes.py``). Train 6,000 / val 500 / test 1,000; 180 possible captions."""

    name = "scene-captions"
    modalities = ("image", "text")
    version = 1

    def generator(self) -> Any:
        from mmssl.modalities.pairs import scenes

        return scenes

    def encode(self, item: Any) -> dict[str, Any]:
        return ImageCodec().encode({"image": item.pixels.transpose(2, 0, 1)})

    def extra_meta(self) -> dict[str, Any]:
        from mmssl.modalities.pairs import scenes

        return {"image_size": scenes.SIZE, "caption_templates": [scenes.TEMPLATE],
                "num_captions": scenes.NUM_CAPTIONS}


@PRESETS.register("sound-captions")
class SoundCaptionsPreset(_PairPreset):
    """Short synthetic sounds (tones, chirps, noise bursts, click rhythms, warbles) at 16 kHz, captioned
    from one template per kind; label = kind (``modalities/pairs/sounds.py``). Train 6,000 / val 500 /
    test 1,000; 32 possible captions."""

    name = "sound-captions"
    modalities = ("speech", "text")
    version = 1

    def generator(self) -> Any:
        from mmssl.modalities.pairs import sounds

        return sounds

    def encode(self, item: Any) -> dict[str, Any]:
        return SpeechCodec().encode({"speech": item.wav})

    def extra_meta(self) -> dict[str, Any]:
        from mmssl.modalities.pairs import sounds

        return {"sample_rate": sounds.SAMPLE_RATE, "caption_templates": list(sounds.TEMPLATES.values()),
                "num_captions": len(sounds.all_captions())}
