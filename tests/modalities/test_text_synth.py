"""The synthetic topic corpus: deterministic, well-formed, and labelled by structure rather than by
vocabulary (a bag of words is weak, bigrams are strong)."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch

from mmssl.eval.probe_fit import linear_probe
from mmssl.modalities.text import synth
from mmssl.modalities.text.data import encode_text


def words(text: str) -> list[str]:
    return text.lower().replace(",", " ,").replace(".", " .").split()


def test_determinism_prefix_and_splits() -> None:
    a = [s.text for s in synth.generate("val", 20, seed=3)]
    assert a == [s.text for s in synth.generate("val", 20, seed=3)]
    assert a[:7] == [s.text for s in synth.generate("val", 7, seed=3)]
    assert a != [s.text for s in synth.generate("val", 20, seed=4)]
    assert a != [s.text for s in synth.generate("test", 20, seed=3)]
    assert synth.SPLITS["test"] >= 1000 and synth.SPLITS["val"] >= 500


def test_sentences_are_well_formed_and_every_word_is_one_token() -> None:
    sents = list(synth.generate("train", 500))
    lexicon = set()
    for s in sents:
        w = words(s.text)
        n = sum(x not in ",." for x in w)
        assert synth.MIN_WORDS <= n <= synth.MAX_WORDS and s.text[0].isupper() and s.text.endswith(".")
        assert not re.search(r"\ba [aeiou]", s.text.lower())  # "an" before vowels
        lexicon.update(w)
    lengths = [sum(x not in ",." for x in words(s.text)) for s in sents]
    assert min(lengths) <= 10 and max(lengths) >= 25  # varied lengths
    for w in lexicon:  # one BPE token per word: ids and words align
        assert encode_text(w).numel() == 3, w
    assert len(lexicon) < 120 and set(Counter(s.label for s in sents)) == set(range(len(synth.TOPICS)))


def test_tables_are_balanced_so_unigrams_do_not_name_the_topic() -> None:
    g = synth.grammar()
    for table, n in ((g.subj_verbs, len(synth.VERBS)), (g.verb_nouns, len(synth.NOUNS)),
                     (g.verb_advs, len(synth.ADVERBS)), (g.noun_adjs, len(synth.ADJECTIVES))):
        for t in range(len(synth.TOPICS)):
            counts = np.bincount(table[t].ravel(), minlength=n)
            assert (counts == counts[0]).all()  # every word in the same number of allowed sets
        # topics differ in their pairings
        assert len({table[t].tobytes() for t in range(len(synth.TOPICS))}) == len(synth.TOPICS)


def _counts(sents: list[synth.Sentence], vocab: dict, n: int) -> torch.Tensor:
    x = torch.zeros(len(sents), len(vocab))
    for i, s in enumerate(sents):
        w = words(s.text)
        for gram in zip(*(w[k:] for k in range(n))):
            if gram in vocab:
                x[i, vocab[gram]] += 1
    return x


def test_topic_is_in_the_structure_not_in_the_words() -> None:
    tr, va, te = (list(synth.generate(s, n)) for s, n in (("train", 2000), ("val", 500), ("test", 1000)))
    acc = {}
    for n in (1, 2):
        vocab: dict = {}
        for s in tr:
            w = words(s.text)
            for gram in zip(*(w[k:] for k in range(n))):
                vocab.setdefault(gram, len(vocab))
        x = [_counts(d, vocab, n) for d in (tr, va, te)]
        y = [torch.tensor([s.label for s in d]) for d in (tr, va, te)]
        acc[n] = linear_probe(x[0], y[0], x[1], y[1], x[2], y[2], [0.1, 1.0]).test_accuracy
    print(f"bag of words {acc[1]:.3f}, bag of bigrams {acc[2]:.3f}")
    assert 0.25 < acc[1] < 0.5  # only the rare cue words
    assert acc[2] > 0.8  # which words go together
