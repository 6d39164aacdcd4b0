"""Seeded generators of the built-in tasks' text (no download), shared by ``synthetic-lm`` and
``synthetic-cls``. Same seeds, same texts: tests/test_tasks.py pins them by hash."""

from __future__ import annotations

import random

from peftbench.config import TaskConfig
from peftbench.errors import ConfigError


def counts(cfg: TaskConfig) -> tuple[int, int]:
    """The numbers of train and eval examples a generated task generates; a one-line
    ``ConfigError`` when either is null."""
    for key in ("num_train", "num_eval"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"task.{key}=null: {cfg.name} generates its examples; allowed: an integer >= 1")
    return int(cfg.num_train or 0), int(cfg.num_eval or 0)


# --------------------------------------------------------------------------- synthetic LM

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_SUCCESSOR_P = [0.55, 0.25, 0.15, 0.05]


def markov_language(seed: int, n_words: int = 500) -> tuple[list[str], list[list[int]]]:
    """A seeded vocabulary of pseudo-words and, per word, its four possible successors."""
    rng = random.Random(seed)
    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    words: list[str] = []
    seen = set()
    while len(words) < n_words:
        w = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 2, 3))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    successors = [rng.sample(range(n_words), len(_SUCCESSOR_P)) for _ in range(n_words)]
    return words, successors


def markov_text(n: int, n_tokens: int, lang_seed: int, sample_seed: int) -> list[str]:
    """``n`` texts of at least ``n_tokens`` words each ('.' ends a sentence)."""
    words, successors = markov_language(lang_seed)
    rng = random.Random(sample_seed)
    out = []
    for _ in range(n):
        toks: list[str] = []
        cur = rng.randrange(50)
        while len(toks) < n_tokens:
            toks.append(words[cur])
            if rng.random() < 0.08:
                toks.append(".")
                cur = rng.randrange(50)
            else:
                cur = rng.choices(successors[cur], weights=_SUCCESSOR_P)[0]
        out.append(" ".join(toks))
    return out


# -------------------------------------------------------------------- synthetic classification

POSITIVE = [
    "good",
    "great",
    "excellent",
    "wonderful",
    "delightful",
    "brilliant",
    "charming",
    "moving",
    "funny",
    "beautiful",
    "superb",
    "clever",
    "enjoyable",
    "fresh",
    "touching",
]
NEGATIVE = [
    "bad",
    "awful",
    "terrible",
    "boring",
    "dull",
    "tedious",
    "clumsy",
    "weak",
    "ugly",
    "stupid",
    "painful",
    "bland",
    "messy",
    "lazy",
    "tiresome",
]
NEUTRAL = [
    "the",
    "film",
    "movie",
    "story",
    "actor",
    "plot",
    "scene",
    "director",
    "script",
    "music",
    "is",
    "was",
    "and",
    "but",
    "with",
    "very",
    "quite",
    "rather",
    "its",
    "a",
    "this",
    "that",
    "ending",
    "cast",
    "camera",
    "dialogue",
    "pace",
    "at",
    "times",
    "often",
    "really",
    "feels",
]


def sentiment_text(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` sentences and labels (1 = more positive than negative words)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        n_pos, n_neg = rng.randint(0, 3), rng.randint(0, 3)
        if n_pos == n_neg:
            n_pos += 1 if rng.random() < 0.5 else 0
            n_neg += 0 if n_pos > n_neg else 1
        toks = [rng.choice(NEUTRAL) for _ in range(rng.randint(6, 16))]
        toks += [rng.choice(POSITIVE) for _ in range(n_pos)] + [rng.choice(NEGATIVE) for _ in range(n_neg)]
        rng.shuffle(toks)
        texts.append(" ".join(toks))
        labels.append(int(n_pos > n_neg))
    return texts, labels
