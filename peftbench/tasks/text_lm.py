"""``text-lm`` (real data, causal LM): domain adaptation on a plain-text corpus, from a local
folder of train/<eval_split> files, ``.txt`` (one text per line, blank lines skipped) or
``.csv/.json/.jsonl`` with a ``text_column``, or a hub dataset id. The texts are packed
(``batching.pack_split``): joined with EOS into one token stream and cut into blocks of
``max_length`` tokens, so the number of examples is known only once they are tokenized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftbench.config import TaskConfig
from peftbench.errors import ConfigError
from peftbench.tasks import RawTask, data, register

COLUMNS = ("text_column",)  # the task keys that name a column (not used by .txt files)
EXTENSIONS = (*data.DATA_EXTENSIONS, "txt")  # a .csv/.json/.jsonl split file wins over a .txt one
ALLOWED = "UTF-8 encoded .txt files (one text per line) or .csv/.json/.jsonl files"


def _texts(cfg: TaskConfig, where: str, values: Any) -> list[str]:
    """The non-blank texts among ``values``; a one-line ConfigError naming ``where`` if none."""
    texts = [str(t) for t in values if t is not None and str(t).strip()]
    if not texts:
        raise ConfigError(f"task.path={cfg.path}: {where} holds no text; allowed: {ALLOWED} with a non-blank text")
    return texts


def _lines(cfg: TaskConfig, f: Path) -> list[str]:
    return _texts(cfg, f.name, data.decode(cfg, f, ALLOWED).splitlines())


def _read(cfg: TaskConfig, split: str, f: Path) -> list[str]:
    """The non-blank texts of one local split file."""
    if f.suffix == ".txt":
        return _lines(cfg, f)
    return _texts(cfg, f.name, data.load_file(cfg, split, f)[cfg.text_column])


@register
class TextLM:
    name = "text-lm"
    kind = "causal-lm"

    def check(self, cfg: TaskConfig) -> None:
        """A local folder's split files: UTF-8, parseable, with ``text_column`` (.csv/.json/.jsonl)
        and a non-blank text (.txt). A hub dataset is only checked when it is loaded."""
        data.require_path(cfg)
        if not data.is_local(str(cfg.path)):
            return
        for f in data.split_files(cfg, EXTENSIONS).values():
            if f.suffix == ".txt":
                _lines(cfg, f)
            else:
                data.check_file(cfg, f, COLUMNS)

    def num_train_examples(self, cfg: TaskConfig) -> None:
        return None  # blocks of max_length tokens: their number depends on the tokenizer

    def load(self, cfg: TaskConfig) -> RawTask:
        """The first ``num_train`` / ``num_eval`` non-blank texts of each split (null: all), in
        file order, so that neighbouring texts stay neighbours in the packed stream."""
        if data.is_local(str(cfg.path)):
            texts = {s: _read(cfg, s, f) for s, f in data.split_files(cfg, EXTENSIONS).items()}
        else:
            splits = data.load_splits(cfg)
            data.check_columns(cfg, splits, COLUMNS)
            texts = {s: _texts(cfg, f"the {s} split", ds[cfg.text_column]) for s, ds in splits.items()}
        return RawTask(
            train_text=texts["train"][: cfg.num_train],
            eval_text=texts[cfg.eval_split][: cfg.num_eval],
            train_labels=None,
            eval_labels=None,
            pack=True,
        )
