"""Tasks: raw text (and labels), tokenized into batches the one training loop consumes.

Built-in tasks need no download:
- ``synthetic-lm`` (causal LM): text sampled from a seeded word-level Markov language whose
  next word is one of four successors with fixed probabilities, so a model that learns the
  transitions drives the loss from ln(vocabulary) towards the chain's entropy.
- ``synthetic-cls`` (classification): English sentences built from positive, negative and
  neutral words; the label says which sentiment words are in the majority.
- ``text-classification``: a local folder of CSV/JSON splits or a hub dataset id, loaded with
  ``datasets`` (for example ``task.path=../shared/data/rt-polarity``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


@dataclass
class RawTask:
    """Untokenized splits. ``labels`` are class ids (classification) or None (causal LM)."""

    train_text: list[str]
    eval_text: list[str]
    train_labels: Optional[list[int]]
    eval_labels: Optional[list[int]]
    num_labels: int = 0
    label_names: Optional[list[str]] = None


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

_POSITIVE = ["good", "great", "excellent", "wonderful", "delightful", "brilliant", "charming",
             "moving", "funny", "beautiful", "superb", "clever", "enjoyable", "fresh", "touching"]
_NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "tedious", "clumsy", "weak", "ugly",
             "stupid", "painful", "bland", "messy", "lazy", "tiresome"]
_NEUTRAL = ["the", "film", "movie", "story", "actor", "plot", "scene", "director", "script", "music",
            "is", "was", "and", "but", "with", "very", "quite", "rather", "its", "a", "this", "that",
            "ending", "cast", "camera", "dialogue", "pace", "at", "times", "often", "really", "feels"]


def sentiment_text(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` sentences and labels (1 = more positive than negative words)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        n_pos, n_neg = rng.randint(0, 3), rng.randint(0, 3)
        if n_pos == n_neg:
            n_pos += 1 if rng.random() < 0.5 else 0
            n_neg += 0 if n_pos > n_neg else 1
        toks = [rng.choice(_NEUTRAL) for _ in range(rng.randint(6, 16))]
        toks += [rng.choice(_POSITIVE) for _ in range(n_pos)] + [rng.choice(_NEGATIVE) for _ in range(n_neg)]
        rng.shuffle(toks)
        texts.append(" ".join(toks))
        labels.append(int(n_pos > n_neg))
    return texts, labels


# ------------------------------------------------------------------------- real data


def load_text_classification(cfg: Any) -> RawTask:
    """Load ``cfg.path`` (local folder of CSV/JSON(L) splits, or a hub id) with ``datasets``."""
    import datasets

    from methods import ConfigError

    if not cfg.path:
        raise ConfigError("task.path=null: text-classification needs a folder of CSV/JSON splits or a hub dataset id")
    path = Path(cfg.path)
    if path.is_dir():
        files: dict[str, str] = {}
        for split in ("train", cfg.eval_split):
            found = [p for ext in ("csv", "json", "jsonl") for p in [path / f"{split}.{ext}"] if p.exists()]
            if not found:
                raise ConfigError(f"task.path={cfg.path}: no {split}.csv/.json/.jsonl in that folder")
            files[split] = str(found[0])
        builder = "csv" if files["train"].endswith(".csv") else "json"
        ds = datasets.load_dataset(builder, data_files=files)
    elif path.suffix or str(cfg.path).startswith((".", "/", "~")):
        raise ConfigError(f"task.path={cfg.path}: no such folder")
    else:
        ds = datasets.load_dataset(str(cfg.path))
    if cfg.eval_split not in ds:
        raise ConfigError(f"task.eval_split={cfg.eval_split}: allowed: {', '.join(ds.keys())}")
    for col in (cfg.text_column, cfg.label_column):
        if col not in ds["train"].column_names:
            key = "task.text_column" if col == cfg.text_column else "task.label_column"
            raise ConfigError(f"{key}={col}: no such column; allowed: {', '.join(ds['train'].column_names)}")
    train, ev = ds["train"], ds[cfg.eval_split]
    if cfg.num_train is not None:
        train = train.select(range(min(cfg.num_train, len(train))))
    if cfg.num_eval is not None:
        ev = ev.select(range(min(cfg.num_eval, len(ev))))
    raw_train, raw_eval = list(train[cfg.label_column]), list(ev[cfg.label_column])
    names = sorted({str(v) for v in raw_train + raw_eval}, key=lambda s: (len(s), s))
    if all(isinstance(v, int) for v in raw_train + raw_eval):
        names = [str(i) for i in range(max(raw_train + raw_eval) + 1)]
    index = {n: i for i, n in enumerate(names)}
    return RawTask(
        train_text=[str(t) for t in train[cfg.text_column]],
        eval_text=[str(t) for t in ev[cfg.text_column]],
        train_labels=[index[str(v)] for v in raw_train],
        eval_labels=[index[str(v)] for v in raw_eval],
        num_labels=len(names),
        label_names=names,
    )


def load(cfg: Any) -> RawTask:
    """The raw splits of the task named ``cfg.name``."""
    from methods import ConfigError

    if cfg.name == "synthetic-lm":
        return RawTask(
            train_text=markov_text(cfg.num_train, cfg.max_length, cfg.data_seed, cfg.data_seed + 1),
            eval_text=markov_text(cfg.num_eval, cfg.max_length, cfg.data_seed, cfg.data_seed + 2),
            train_labels=None,
            eval_labels=None,
        )
    if cfg.name == "synthetic-cls":
        tt, tl = sentiment_text(cfg.num_train, cfg.data_seed + 1)
        et, el = sentiment_text(cfg.num_eval, cfg.data_seed + 2)
        return RawTask(tt, et, tl, el, num_labels=2, label_names=["negative", "positive"])
    if cfg.name == "text-classification":
        return load_text_classification(cfg)
    raise ConfigError(f"task.name={cfg.name}: allowed: synthetic-lm, synthetic-cls, text-classification")


# --------------------------------------------------------------------------- tokenizing


def word_tokenizer(texts: list[str], vocab_size: int):
    """A word-level tokenizer fitted on ``texts`` (no download): the ``vocab_size`` - 4 most
    frequent lower-cased words and punctuation marks, plus [PAD] [UNK] [BOS] [EOS]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


@dataclass
class Split:
    """Tokenized examples: ``ids`` lists of token ids, ``labels`` class ids or None."""

    ids: list[list[int]]
    labels: Optional[list[int]]


def tokenize(raw: RawTask, tokenizer: Any, max_length: int) -> tuple[Split, Split]:
    def enc(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    return Split(enc(raw.train_text), raw.train_labels), Split(enc(raw.eval_text), raw.eval_labels)


def collate(split: Split, index: list[int], pad_id: int, kind: str) -> dict[str, torch.Tensor]:
    """Pad the examples at ``index`` to the longest among them (right padding).

    Causal LM: ``labels`` are the input ids with padding set to -100 (the model shifts them).
    Classification: ``labels`` are the class ids.
    """
    rows = [split.ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    if kind == "causal-lm":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.tensor([split.labels[i] for i in index], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_batches(split: Split, batch_size: int, seed: int, pad_id: int, kind: str) -> Iterator[dict]:
    """Endless shuffled batches, the same order for every method with the same seed."""
    g = torch.Generator().manual_seed(seed)
    n = len(split.ids)
    if n < batch_size:
        from methods import ConfigError

        raise ConfigError(f"train.batch_size={batch_size}: larger than the {n} training examples")
    while True:
        order = torch.randperm(n, generator=g).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield collate(split, order[start : start + batch_size], pad_id, kind)


def eval_batches(split: Split, batch_size: int, pad_id: int, kind: str) -> Iterator[dict]:
    """The evaluation split in order, in batches (the last may be smaller)."""
    n = len(split.ids)
    for start in range(0, n, batch_size):
        yield collate(split, list(range(start, min(n, start + batch_size))), pad_id, kind)
