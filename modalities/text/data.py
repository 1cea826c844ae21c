"""Text data: raw UTF-8 text in shards, tokenised on decode with open_clip's bundled BPE, padded id
batches with sot/eot-wrapped crops; reading .txt/.jsonl files for ``mmssl data pack``; the embedded
synthetic preset.

Shards hold the raw text (field ``txt``), not ids, so they do not depend on the tokenizer; the
tokenizer is named in ``meta.json`` and in the adapter's ``preprocessing()``."""
from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mmssl.data.pool import pooled
from mmssl.data.shards import BadSample, build_atomically, write_split
from mmssl.registry import PRESETS
from mmssl.types import Batch

TOKENIZER_NAME = "open_clip SimpleTokenizer bpe_simple_vocab_16e6"
VOCAB_SIZE = 49408
SOT, EOT = 49406, 49407  # <start_of_text>, <end_of_text>
SPECIAL_IDS = (SOT, EOT)
CONTEXT_LENGTH = 77  # CLIP's
#: integer labels are class indices (classes 0..max): a larger one is a corrupt label, not a class
MAX_INT_LABEL = 100_000


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    """open_clip's SimpleTokenizer with its bundled vocabulary (never downloads); built once per
    process (reading the 49k merges takes ~0.2 s), also in each loader worker."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    if (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) != (VOCAB_SIZE, SOT, EOT):
        raise RuntimeError(f"open_clip's tokenizer changed: vocab {tok.vocab_size}, sot {tok.sot_token_id}, "
                           f"eot {tok.eot_token_id}; expected {VOCAB_SIZE}, {SOT}, {EOT}")
    return tok


def encode_text(text: str) -> torch.Tensor:
    """text -> int64 [n] = [sot] + BPE ids + [eot], untruncated. The tokenizer lower-cases and cleans
    (ftfy, HTML unescape, whitespace) as open_clip does; literal "<start_of_text>"/"<end_of_text>"
    strings in the text are dropped, so special ids only ever mark the ends."""
    body = [i for i in tokenizer().encode(text) if i not in SPECIAL_IDS]
    return torch.tensor([SOT, *body, EOT], dtype=torch.long)


def crop(ids: torch.Tensor, max_len: int, generator: torch.Generator | None) -> torch.Tensor:
    """Fit a wrapped sequence [sot, body..., eot] into ``max_len`` ids: a window of ``max_len - 2``
    body ids, re-wrapped with sot/eot. Random window start when ``generator`` is given (training),
    the leading window otherwise (evaluation)."""
    if ids.numel() <= max_len:
        return ids
    if max_len < 3:
        raise ValueError(f"text max_len must be >= 3 (sot, one token, eot), not {max_len}")
    body = ids[1:-1]
    w = max_len - 2
    start = int(torch.randint(body.numel() - w + 1, (1,), generator=generator)) if generator is not None else 0
    return torch.cat([ids[:1], body[start:start + w], ids[-1:]])


def check_text(text: Any, name: str) -> str:
    if not isinstance(text, str):
        raise BadSample(f"missing_text: {name}: no string 'text' field")
    if not text.strip():
        raise BadSample(f"empty_text: {name}")
    try:  # JSON may escape a lone surrogate ("\ud800"), which no UTF-8 shard can store
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadSample(f"undecodable: {name}: {e.reason} at character {e.start}") from None
    if encode_text(text).numel() <= 2:
        raise BadSample(f"empty_text: {name}: no tokens after cleaning")
    return text


class TextCodec:
    """Items are ``{"text": str}`` when read and encoded, ``{"text": int64 [n]}`` when decoded."""

    modality = "text"
    suffixes = (".txt", ".jsonl")

    def read_file(self, path: str) -> dict[str, Any]:
        """A .txt file: one document."""
        p = Path(path)
        if p.suffix.lower() != ".txt":
            raise BadSample(f"unsupported_type: {p.name}: read_file reads one .txt document; use read_items")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample(f"undecodable: {p.name}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise BadSample(f"unreadable: {p.name}: {e.strerror}") from None
        return {"text": check_text(text, p.name)}

    def read_items(self, path: str) -> Iterator[tuple[str, dict[str, Any] | BadSample, str | int | None]]:
        """Every item of a file as ``(part, item or the BadSample that rejects it, own label)``, the
        multi-item contract of ``mmssl.data.pack.read_items``. A .txt file is one item (part "") without
        an own label; a .jsonl file holds one JSON object per line, ``{"text": str, "label": str | int
        (optional)}``, part = the line number; blank lines are not items, and a file of none is one
        ``empty_text`` BadSample."""
        p = Path(path)
        if p.suffix.lower() != ".jsonl":
            try:
                yield "", self.read_file(path), None
            except BadSample as e:
                yield "", e, None
            return
        try:
            lines = p.read_bytes().split(b"\n")
        except OSError as e:
            yield "", BadSample(f"unreadable: {p.name}: {e.strerror}"), None
            return
        seen = 0
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            seen += 1
            try:
                item, label = self._json_item(line, f"{p.name}:{n}")
            except BadSample as e:
                yield str(n), e, None
                continue
            yield str(n), item, label
        if not seen:  # a file without a single line is counted, not silently passed over
            yield "", BadSample(f"empty_text: {p.name}: no JSON lines"), None

    def _json_item(self, line: bytes, name: str) -> tuple[dict[str, Any], str | int | None]:
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadSample(f"undecodable: {name}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise BadSample(f"invalid_json: {name}: {e.msg}") from None
        except RecursionError:
            raise BadSample(f"invalid_json: {name}: nested too deeply") from None
        except ValueError as e:  # an integer literal over Python's 4300-digit conversion limit
            raise BadSample(f"bad_label: {name}: {str(e).split(';')[0]}") from None
        if not isinstance(obj, dict):
            raise BadSample(f"invalid_json: {name}: a line must be a JSON object, not {type(obj).__name__}")
        label = obj.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))
                                  or (isinstance(label, int) and not 0 <= label <= MAX_INT_LABEL) or label == ""):
            shown = label if not isinstance(label, int) or label.bit_length() < 64 else f"an integer of {len(str(label))} digits"
            raise BadSample(f"bad_label: {name}: label must be a class name or an integer in [0, {MAX_INT_LABEL}], "
                            f"not {shown!r}")
        return {"text": check_text(obj.get("text"), name)}, label

    def encode(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"txt": item["text"].encode("utf-8")}

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = raw.get("__key__", "?")
        if "txt" not in raw:
            raise BadSample(f"missing_field: {key}: no txt field")
        try:
            text = raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample(f"undecodable: {key}: txt is not UTF-8") from None
        ids = encode_text(text)
        if ids.numel() <= 2:
            raise BadSample(f"empty_text: {key}")
        return {"text": ids}

    def length(self, item: dict[str, Any]) -> int:
        return int(item["text"].numel())

    def collate(self, items: list[dict[str, Any]], max_len: int | None, generator: torch.Generator | None,
                keep_frame_labels: bool = True) -> Batch:
        """-> {"text": int64 [B, L], "text_len": int64 [B]}, padded with 0 beyond text_len. Sequences
        longer than ``max_len`` are cropped (see ``crop``); ``max_len=None`` keeps them whole."""
        seqs = [it["text"] if max_len is None else crop(it["text"], max_len, generator) for it in items]
        lens = torch.tensor([s.numel() for s in seqs], dtype=torch.long)
        out = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, :s.numel()] = s
        return {"text": out, "text_len": lens}


@PRESETS.register("text-synth")
class TextSynthPreset:
    """Synthetic topic sentences (six topic grammars over one shared vocabulary, see ``synth``);
    labels = topics. Generated on first use; generator version frozen once shipped."""

    modality = "text"
    version = 1

    def build(self, out: Path, seed: int = 0) -> None:
        from mmssl.modalities.text import synth

        codec = TextCodec()
        meta: dict[str, Any] = {"name": "text-synth", "modality": "text", "generator_version": synth.GENERATOR_VERSION,
                                "seed": seed, "classes": list(synth.TOPICS), "tokenizer": TOKENIZER_NAME,
                                "splits": {}, "bad_samples": {}}
        for split, n in synth.SPLITS.items():
            def samples(split: str = split, n: int = n) -> Iterator[dict[str, Any]]:
                for i, (sample, label) in enumerate(pooled(
                        synth.generate, split, n, seed=seed, then=lambda s: (codec.encode({"text": s.text}), s.label))):
                    sample.update({"__key__": f"{i:08d}", "cls": str(label).encode(), "sid": str(i).encode()})
                    yield sample

            shards = write_split(samples(), out / split, num_shards=8 if split == "train" else 2)
            meta["splits"][split] = {"shards": shards, "count": n}
        (out / "meta.json").write_text(json.dumps(meta, indent=2))

    def ensure(self, cache_dir: Path, seed: int = 0) -> Path:
        root = Path(cache_dir) / "data" / f"text-synth-v{self.version}-seed{seed}"
        return build_atomically(root, lambda tmp: self.build(tmp, seed))
