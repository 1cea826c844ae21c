"""The synthetic topic corpus: deterministic, well-formed, and labelled by structure rather than by
vocabulary (a bag of words is weak, bigrams are strong)."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
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


def _naive_bayes_accuracy(train: list[synth.Sentence], test: list[synth.Sentence], n: int) -> float:
    """Multinomial naive Bayes over word n-grams (add-one smoothing): what a bag of n-grams tells."""
    k = len(synth.TOPICS)
    counts: list[Counter] = [Counter() for _ in range(k)]
    for s in train:
        w = words(s.text)
        counts[s.label].update(zip(*(w[i:] for i in range(n))))
    vocab = set().union(*counts)
    totals = [sum(c.values()) + len(vocab) for c in counts]
    right = 0
    for s in test:
        w = words(s.text)
        grams = [g for g in zip(*(w[i:] for i in range(n))) if g in vocab]
        scores = [sum(np.log((counts[t][g] + 1) / totals[t]) for g in grams) for t in range(k)]
        right += int(np.argmax(scores)) == s.label
    return right / len(test)


def test_topic_is_in_the_structure_not_in_the_words() -> None:
    train, test = list(synth.generate("train", 3000)), list(synth.generate("test", 1000))
    uni, bi = _naive_bayes_accuracy(train, test, 1), _naive_bayes_accuracy(train, test, 2)
    print(f"naive Bayes: bag of words {uni:.3f}, bag of bigrams {bi:.3f}")
    assert 0.25 < uni < 0.5  # only the rare cue words name the topic
    assert bi > 0.85  # which word follows which does
