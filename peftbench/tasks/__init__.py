"""Tasks: raw text (and labels), tokenized into batches the one training loop consumes.

A task is a small class registered under its config name (``task=synthetic-lm`` is
``conf/task/synthetic-lm.yaml`` is ``peftbench/tasks/synthetic_lm.py`` is the ``task`` of a
record); adding one is that file plus that YAML. The protocol every task satisfies, each call
taking the resolved ``task`` config group::

    task = tasks.REGISTRY[cfg.name]
    task.name, task.kind               # "synthetic-lm"; "causal-lm" or "classification"
    task.check(cfg)                    # its own keys, cheaply, before any model is built
    task.num_train_examples(cfg)       # training examples load() returns; None if unknown
    task.load(cfg)                     # a RawTask: the untokenized train and eval splits

The harness calls the free functions below, which dispatch on ``cfg.name``: ``check``,
``num_train_examples`` and ``load``, then ``word_tokenizer``, ``tokenize``, ``train_batches``
and ``eval_batches`` (from ``batching``), the same for every task. Generated text lives in
``synthetic``; reading local files or hub datasets in ``data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

from peftbench.config import TaskConfig
from peftbench.errors import ConfigError
from peftbench.tasks.batching import (  # noqa: F401  (re-exported: the harness calls tasks.tokenize)
    SPECIALS,
    Split,
    collate,
    eval_batches,
    eval_order,
    tokenize,
    train_batches,
    word_tokenizer,
)


@dataclass
class RawTask:
    """Untokenized splits. ``labels`` are class ids (classification) or None (causal LM).

    Instruction tasks (supervised fine-tuning) also set ``train_prompts`` / ``eval_prompts``: per
    example, the chat messages before the response (a list of ``{"role", "content"}`` dicts);
    ``train_text`` / ``eval_text`` are then the responses, the only tokens the loss is taken on.
    ``eval_answers``: the reference answer of each eval example for accuracy by generation
    (None: no generation accuracy); ``choices``: the fixed set of answers, for accuracy by
    scoring each choice's log-likelihood (None: open answers). ``pack``: concatenate the texts
    and cut them into blocks of ``max_length`` tokens (plain-text language modelling).
    """

    train_text: list[str]
    eval_text: list[str]
    train_labels: Optional[list[int]]
    eval_labels: Optional[list[int]]
    num_labels: int = 0
    label_names: Optional[list[str]] = None
    train_prompts: Optional[list[list[dict[str, str]]]] = None
    eval_prompts: Optional[list[list[dict[str, str]]]] = None
    eval_answers: Optional[list[str]] = None
    choices: Optional[list[str]] = None
    pack: bool = False


class Task(Protocol):
    name: str
    kind: str

    def check(self, cfg: TaskConfig) -> None: ...

    def num_train_examples(self, cfg: TaskConfig) -> Optional[int]: ...

    def load(self, cfg: TaskConfig) -> RawTask: ...


REGISTRY: dict[str, Task] = {}


def register(cls: type[Any]) -> type[Any]:
    """Class decorator: make ``cls`` available as ``task=<cls.name>``."""
    if cls.name in REGISTRY:
        raise RuntimeError(f"task name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls()
    return cls


def _task(cfg: TaskConfig) -> Task:
    if cfg.name not in REGISTRY:
        raise ConfigError(f"task.name={cfg.name}: allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[cfg.name]


def check(cfg: TaskConfig) -> None:
    """Cheap checks of a task config before any model is built: the keys every task shares,
    then the task's own (for local data files, every line of them)."""
    task = _task(cfg)
    if cfg.kind != task.kind:
        raise ConfigError(f"task.kind={cfg.kind}: task {cfg.name} is {task.kind}; allowed: {task.kind}")
    if cfg.vocab_size < len(SPECIALS) + 1:
        raise ConfigError(
            f"task.vocab_size={cfg.vocab_size}: the word-level tokenizer needs its {len(SPECIALS)} "
            f"special tokens ({', '.join(SPECIALS)}) and at least one word; "
            f"allowed: an integer >= {len(SPECIALS) + 1}"
        )
    task.check(cfg)


def num_train_examples(cfg: TaskConfig) -> Optional[int]:
    """Training examples ``load`` will return, known before anything is loaded (generated tasks
    and local files; files are read, not loaded), or None when unknown (a hub dataset)."""
    return _task(cfg).num_train_examples(cfg)


def load(cfg: TaskConfig) -> RawTask:
    """The raw splits of the task named ``cfg.name``."""
    check(cfg)
    return _task(cfg).load(cfg)


def _import_all() -> None:
    """Import every module of this package; each task module registers its task."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        importlib.import_module(f"{__name__}.{info.name}")


_import_all()
