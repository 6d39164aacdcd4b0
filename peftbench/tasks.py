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

from methods import ConfigError

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
# task name -> its kind
TASKS = {"synthetic-lm": "causal-lm", "synthetic-cls": "classification", "text-classification": "classification"}


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

DATA_EXTENSIONS = {"csv": "csv", "json": "json", "jsonl": "json"}  # file suffix -> datasets builder


def _is_local(path: str) -> bool:
    """A path that names a file or folder (not a hub dataset id such as ``user/name``)."""
    return Path(path).expanduser().exists() or Path(path).suffix != "" or path.startswith((".", "/", "~"))


def _require_path(cfg: Any) -> None:
    if not cfg.path:
        raise ConfigError("task.path=null: text-classification needs a folder of train/validation "
                          ".csv/.json/.jsonl files or a hub dataset id")


def split_files(cfg: Any) -> dict[str, Path]:
    """The train and evaluation files of a local ``task.path`` folder, by split name."""
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"task.path={cfg.path}: no such folder (allowed: a folder of train/{cfg.eval_split} "
                          f".csv/.json/.jsonl files, or a hub dataset id)")
    files = {}
    for split in dict.fromkeys(("train", cfg.eval_split)):
        found = [folder / f"{split}.{ext}" for ext in DATA_EXTENSIONS if (folder / f"{split}.{ext}").is_file()]
        if not found:
            present = sorted(p.name for p in folder.iterdir() if p.suffix[1:] in DATA_EXTENSIONS)
            key = "task.path" if split == "train" else "task.eval_split"
            value = cfg.path if split == "train" else split
            raise ConfigError(f"{key}={value}: no {split}.csv/.json/.jsonl in {cfg.path}; "
                              f"files there: {', '.join(present) or 'none'}")
        files[split] = found[0]
    return files


def load_splits(cfg: Any) -> dict[str, Any]:
    """``{"train": Dataset, eval_split: Dataset}`` from a local folder or the hub."""
    import datasets

    _require_path(cfg)
    if _is_local(str(cfg.path)):
        return {
            split: datasets.load_dataset(DATA_EXTENSIONS[f.suffix[1:]], data_files={split: str(f)}, split=split)
            for split, f in split_files(cfg).items()
        }
    try:
        ds = datasets.load_dataset(str(cfg.path))
    except Exception as e:  # offline, unknown id, gated: all end the run the same way
        raise ConfigError(f"task.path={cfg.path}: not a local folder, and loading it as a hub dataset "
                          f"failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    for split in ("train", cfg.eval_split):
        if split not in ds:
            key = "task.path" if split == "train" else "task.eval_split"
            raise ConfigError(f"{key}={cfg.path if split == 'train' else split}: the dataset has no "
                              f"{split!r} split; allowed: {', '.join(ds.keys())}")
    return {"train": ds["train"], cfg.eval_split: ds[cfg.eval_split]}


def _check_columns(cfg: Any, splits: dict[str, Any]) -> None:
    for split, ds in splits.items():
        for key, col in (("task.text_column", cfg.text_column), ("task.label_column", cfg.label_column)):
            if col not in ds.column_names:
                raise ConfigError(f"{key}={col}: no such column in the {split} split; "
                                  f"allowed: {', '.join(ds.column_names)}")


def _subset(ds: Any, n: Optional[int], seed: int) -> Any:
    """At most ``n`` examples, a seeded random subset (files are often sorted by label)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def encode_labels(cfg: Any, train: Any, raw_train: list[Any],
                  raw_eval: list[Any]) -> tuple[list[str], list[int], list[int]]:
    """Class names, and the train and eval labels as class ids 0..K-1.

    The dataset's ``ClassLabel`` names when it has them; else integer labels (``1``, ``1.0``,
    ``true``) in increasing order; else string labels in sorted order.
    """
    feature = train.features.get(cfg.label_column)
    if hasattr(feature, "names"):  # ClassLabel: the values are ids already
        return list(feature.names), [int(v) for v in raw_train], [int(v) for v in raw_eval]
    values = raw_train + raw_eval
    missing = sum(v is None for v in values)
    if missing:
        raise ConfigError(f"task.label_column={cfg.label_column}: {missing} examples have no label")
    if all(isinstance(v, (bool, int)) or (isinstance(v, float) and v.is_integer()) for v in values):
        ids = sorted({int(v) for v in values})
        index = {v: i for i, v in enumerate(ids)}
        return [str(v) for v in ids], [index[int(v)] for v in raw_train], [index[int(v)] for v in raw_eval]
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {v: i for i, v in enumerate(names)}
        return names, [index[v] for v in raw_train], [index[v] for v in raw_eval]
    kinds = sorted({type(v).__name__ for v in values})
    raise ConfigError(f"task.label_column={cfg.label_column}: labels must be class ids (integers) or class "
                      f"names (strings); found {', '.join(kinds)} values")


def load_text_classification(cfg: Any) -> RawTask:
    """Load ``cfg.path`` (local folder of CSV/JSON(L) splits, or a hub id) with ``datasets``."""
    splits = load_splits(cfg)
    _check_columns(cfg, splits)
    train = _subset(splits["train"], cfg.num_train, cfg.data_seed)
    ev = _subset(splits[cfg.eval_split], cfg.num_eval, cfg.data_seed + 1)
    names, train_ids, eval_ids = encode_labels(cfg, train, list(train[cfg.label_column]), list(ev[cfg.label_column]))

    def text(values: list[Any]) -> list[str]:
        return ["" if t is None else str(t) for t in values]

    return RawTask(
        train_text=text(train[cfg.text_column]),
        eval_text=text(ev[cfg.text_column]),
        train_labels=train_ids,
        eval_labels=eval_ids,
        num_labels=len(names),
        label_names=names,
    )


def check(cfg: Any) -> None:
    """Cheap checks of a task config before any model is built: for text-classification, the
    folder, its split files and the two columns (read from the first row of each file)."""
    if cfg.name not in TASKS:
        raise ConfigError(f"task.name={cfg.name}: allowed: {', '.join(TASKS)}")
    if cfg.kind != TASKS[cfg.name]:
        raise ConfigError(f"task.kind={cfg.kind}: task {cfg.name} is {TASKS[cfg.name]}; allowed: {TASKS[cfg.name]}")
    if cfg.name != "text-classification":
        for key in ("num_train", "num_eval"):
            if getattr(cfg, key) is None:
                raise ConfigError(f"task.{key}=null: {cfg.name} generates its examples; allowed: an integer >= 1")
        return
    _require_path(cfg)
    if not _is_local(str(cfg.path)):
        return  # a hub dataset is only checked when it is loaded
    for split, f in split_files(cfg).items():
        columns = _first_row_columns(f)
        for key, col in (("task.text_column", cfg.text_column), ("task.label_column", cfg.label_column)):
            if columns is not None and col not in columns:
                raise ConfigError(f"{key}={col}: no such column in {f.name}; allowed: {', '.join(columns)}")


def _first_row_columns(f: Path) -> Optional[list[str]]:
    """Column names from a file's header (CSV) or first record (JSON Lines); None if unknown."""
    import csv
    import json

    with f.open(encoding="utf-8", newline="") as fh:
        if f.suffix == ".csv":
            return next(csv.reader(fh), [])
        first = fh.readline().strip()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return None  # a JSON array or object spread over lines: checked when loaded
    return list(row) if isinstance(row, dict) else None


def load(cfg: Any) -> RawTask:
    """The raw splits of the task named ``cfg.name``."""
    check(cfg)
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
    return load_text_classification(cfg)


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
