"""Synthetic topic corpus: the embedded default text data set.

Sentences from six topic "dialects" of one small English-like grammar, labelled by topic. Every topic
uses the same ~100 words with the same overall frequencies; what differs is *structure*:

* **Word order.** Each topic has its own clause order (subject-verb-object, subject-object-verb or
  verb-subject-object) and adjective position (before or after the noun): the six combinations, one
  per topic ("the baker the stone heavy lifted" vs "lifted the baker the heavy stone"). A clause uses
  a random order with probability ``ORDER_NOISE``. Topics also differ mildly in where an adverb and a
  time phrase go.
* **Pairings.** Per topic, each subject allows 6 of the 12 verbs, each verb 4 of the 16 object nouns
  and 2 of the 8 adverbs, each noun 4 of the 16 adjectives. The tables are balanced designs (every word
  appears in the same number of allowed sets), so the unigram distribution is the same in every topic;
  a pair such as "heavy stone" or "lifted ... stone" points to one or two topics. A fraction ``NOISE``
  of paired choices ignores the tables.
* **A weak lexical cue.** With probability ``CUE_PROB`` a clause gets a prepositional phrase naming
  one of its topic's two own words ("near the oven"); nothing else is topic-exclusive.

A bag of words finds the topic only through the rare cue words (about 0.4 accuracy for 6 classes;
a randomly initialised micro encoder's mean-pooled probe scores about the same), while a model of which
words follow which recovers it (a linear probe on bag-of-bigrams: about 0.95). Masked language
modelling learns word order first (where the adjective, where the verb), which is what lifts the
probe after a short CPU run; the pairings take longer.

Sentences have 1-3 clauses joined by connectives, 8-30 words, every word one BPE token. The output is
a pure function of ``(GENERATOR_VERSION, split, seed, index)``; the grammar tables depend on
``GENERATOR_VERSION`` only. ``GENERATOR_VERSION`` is frozen once shipped: any change that alters a
single sentence must bump it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mmssl.data.synth_splits import balanced_labels, split_code, split_count

GENERATOR_VERSION: int = 1
SPLITS = {"train": 8000, "val": 1000, "test": 1000}
MIN_WORDS, MAX_WORDS = 8, 30

TOPICS: list[str] = ["kitchen", "harbour", "farm", "forge", "bank", "school"]
#: each topic's own words, used only by the weak lexical cue
CUE_WORDS: dict[str, tuple[str, str]] = {
    "kitchen": ("oven", "soup"), "harbour": ("anchor", "wave"), "farm": ("harvest", "barn"),
    "forge": ("hammer", "iron"), "bank": ("coin", "ledger"), "school": ("chalk", "lesson"),
}
SUBJECTS = ["farmer", "sailor", "doctor", "teacher", "child", "merchant", "singer", "baker"]
VERBS = ["moved", "found", "carried", "painted", "opened", "washed", "pushed", "watched", "lifted",
         "cleaned", "sold", "repaired"]
NOUNS = ["river", "engine", "garden", "market", "letter", "window", "bridge", "horse", "candle", "mirror",
         "basket", "tower", "lamp", "wheel", "stone", "bottle"]
ADJECTIVES = ["red", "old", "quiet", "heavy", "bright", "small", "cold", "broken", "green", "dark", "sharp",
              "soft", "tall", "empty", "warm", "strange"]
ADVERBS = ["slowly", "quickly", "carefully", "quietly", "again", "often", "gently", "twice"]
PREPOSITIONS = ["near", "under", "behind", "beside", "across", "from"]
CONNECTIVES = ["and", "while", "because", "then", "but"]
TIME_PHRASES = [("in", "the", "morning"), ("at", "night"), ("after", "the", "rain"), ("before", "dinner"),
                ("on", "monday"), ("during", "the", "winter")]

CUE_PROB = 0.12   # per clause: a phrase with one of the topic's own words
NOISE = 0.1       # per paired choice: ignore the topic's table
ORDER_NOISE = 0.1  # per clause: a random word order instead of the topic's
ADJ_PROB, ADV_PROB, PP_PROB, TIME_PROB = 0.85, 0.6, 0.35, 0.5
#: per topic: verb position (SVO, SOV or VSO) and adjective position (before or after the noun);
#: the six combinations, one per topic
VERB_ORDER = ["svo", "sov", "vso", "svo", "sov", "vso"]
ADJ_AFTER = [False, False, False, True, True, True]
#: per topic: P(adverb before the verb), P(time phrase at the start)
ADV_FRONT = [0.15, 0.85, 0.15, 0.85, 0.5, 0.5]
TIME_FRONT = [0.15, 0.15, 0.85, 0.85, 0.15, 0.85]
CLAUSE_P = [0.3, 0.45, 0.25]  # 1, 2 or 3 clauses


def _balanced_table(rng: np.random.Generator, a: int, b: int, k: int) -> np.ndarray:
    """[a, k] indices into range(b): row i is the allowed set of item i. Every j in range(b) appears
    in exactly a * k / b rows (a * k must be a multiple of b), so a uniform first item gives a uniform
    second item whatever the table."""
    assert (a * k) % b == 0 and k <= b
    rho, sigma = rng.permutation(a), rng.permutation(b)
    return np.array([[sigma[(rho[i] * k + j) % b] for j in range(k)] for i in range(a)])


@dataclass(frozen=True)
class Grammar:
    subj_verbs: np.ndarray  # [topics, 8, 6]
    verb_nouns: np.ndarray  # [topics, 12, 4]
    verb_advs: np.ndarray   # [topics, 12, 2]
    noun_adjs: np.ndarray   # [topics, 16, 4]


def grammar() -> Grammar:
    """The topic tables: a function of GENERATOR_VERSION only (the language is fixed; seeds vary the
    sentences)."""
    rng = np.random.default_rng([GENERATOR_VERSION, 7919])
    t = len(TOPICS)
    return Grammar(
        subj_verbs=np.stack([_balanced_table(rng, len(SUBJECTS), len(VERBS), 6) for _ in range(t)]),
        verb_nouns=np.stack([_balanced_table(rng, len(VERBS), len(NOUNS), 4) for _ in range(t)]),
        verb_advs=np.stack([_balanced_table(rng, len(VERBS), len(ADVERBS), 2) for _ in range(t)]),
        noun_adjs=np.stack([_balanced_table(rng, len(NOUNS), len(ADJECTIVES), 4) for _ in range(t)]),
    )


_GRAMMAR = grammar()


@dataclass
class Sentence:
    text: str
    label: int


def _pick(rng: np.random.Generator, allowed: np.ndarray, n: int) -> int:
    """One index: from the allowed row, or (with probability NOISE) from all n."""
    if rng.random() < NOISE:
        return int(rng.integers(n))
    return int(allowed[rng.integers(len(allowed))])


def _article(words: list[str]) -> list[str]:
    """"a" -> "an" before a vowel."""
    return [("an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in "aeiou" else w)
            for i, w in enumerate(words)]


def _noun_phrase(rng: np.random.Generator, topic: int, noun: int, adj_after: bool) -> list[str]:
    words = ["the" if rng.random() < 0.7 else "a"]
    if rng.random() < ADJ_PROB:
        adj = ADJECTIVES[_pick(rng, _GRAMMAR.noun_adjs[topic, noun], len(ADJECTIVES))]
        return words + ([NOUNS[noun], adj] if adj_after else [adj, NOUNS[noun]])
    return words + [NOUNS[noun]]


def _clause(rng: np.random.Generator, topic: int) -> list[str]:
    g = _GRAMMAR
    if rng.random() < ORDER_NOISE:
        order, adj_after = VERB_ORDER[int(rng.integers(3))], bool(rng.random() < 0.5)
    else:
        order, adj_after = VERB_ORDER[topic], ADJ_AFTER[topic]
    subj = int(rng.integers(len(SUBJECTS)))
    verb = _pick(rng, g.subj_verbs[topic, subj], len(VERBS))
    noun = _pick(rng, g.verb_nouns[topic, verb], len(NOUNS))
    subject = ["the" if rng.random() < 0.8 else "a", SUBJECTS[subj]]
    obj = _noun_phrase(rng, topic, noun, adj_after)
    adverb = ADVERBS[_pick(rng, g.verb_advs[topic, verb], len(ADVERBS))] if rng.random() < ADV_PROB else None
    front = adverb is not None and rng.random() < ADV_FRONT[topic]
    vp = [adverb, VERBS[verb]] if front else [VERBS[verb]]
    parts = {"svo": subject + vp + obj, "sov": subject + obj + vp, "vso": vp + subject + obj}[order]
    words = [w for w in parts if w is not None]
    if adverb is not None and not front:
        words.append(adverb)
    if rng.random() < PP_PROB:
        words.append(PREPOSITIONS[int(rng.integers(len(PREPOSITIONS)))])
        words += _noun_phrase(rng, topic, int(rng.integers(len(NOUNS))), adj_after)
    if rng.random() < CUE_PROB:
        words += [PREPOSITIONS[int(rng.integers(len(PREPOSITIONS)))], "the",
                  CUE_WORDS[TOPICS[topic]][int(rng.integers(2))]]
    return words


def sentence(rng: np.random.Generator, topic: int) -> list[str]:
    """One sentence of ``topic`` as words (punctuation included), MIN_WORDS-MAX_WORDS words long."""
    while True:
        n = int(rng.choice(len(CLAUSE_P), p=CLAUSE_P)) + 1
        words = _clause(rng, topic)
        for _ in range(n - 1):
            words += [",", CONNECTIVES[int(rng.integers(len(CONNECTIVES)))]] + _clause(rng, topic)
        if rng.random() < TIME_PROB:
            phrase = list(TIME_PHRASES[int(rng.integers(len(TIME_PHRASES)))])
            words = phrase + [","] + words if rng.random() < TIME_FRONT[topic] else words + phrase
        n_words = sum(w not in ",." for w in words)
        if MIN_WORDS <= n_words <= MAX_WORDS:
            return _article(words) + ["."]


def detokenize(words: list[str]) -> str:
    """Words -> a sentence string: capitalised, no space before punctuation."""
    s = " ".join(words).replace(" ,", ",").replace(" .", ".")
    return s[0].upper() + s[1:]



def generate(split: str, n: int | None = None, seed: int = 0, start: int = 0) -> Iterator[Sentence]:
    """Yield ``n`` sentences of ``split`` (default: its size in ``SPLITS``).

    Sentence ``i`` depends only on ``(split, seed, i)``, so a shorter ``n`` yields a prefix. Labels are
    balanced: a shuffled repetition of the topics over the split's nominal size.
    ``start`` skips the first ``start`` items (one worker's chunk, mmssl/data/pool.py)."""
    n, seed = split_count(split, n, seed, SPLITS)
    code = split_code(split)
    total = max(n, SPLITS.get(split, 0))
    labels = balanced_labels(GENERATOR_VERSION, seed, split, total, len(TOPICS))
    for i in range(start, n):
        rng = np.random.default_rng([GENERATOR_VERSION, seed, code, 1, i])
        topic = int(labels[i])
        yield Sentence(detokenize(sentence(rng, topic)), topic)
