"""``instruction`` (real data): supervised fine-tuning on prompt/response pairs, the loss on the
response tokens only, from a local folder of train/<eval_split> .jsonl/.json/.csv files (or a hub
dataset id when online).

Two layouts, columns configurable:
- Alpaca: ``instruction`` (``task.prompt_column``), optional ``input`` (``task.input_column``,
  appended to the instruction after a blank line), ``output`` (``task.response_column``);
- chat: ``messages`` (``task.messages_column``), a list of ``{"role", "content"}``; the last
  message, the assistant's, is the response, the messages before it the prompt (a conversation
  that does not end with an assistant message is refused: its last turns would be dropped).

Text fields are strings in both layouts (an Alpaca field may be a number, as CSV readers type a
column of digits); a list or an object is refused in one line, never trained on as its repr.

The reference answer of an eval example (for accuracy by generation) is its response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from peftbench.config import TaskConfig
from peftbench.errors import ConfigError
from peftbench.tasks import RawTask, answers, data, register

FORMATS = ("auto", "alpaca", "messages")
ROLES = ("system", "user", "assistant")
Example = tuple[list[dict[str, str]], str]  # (prompt messages, response)


def layout(cfg: TaskConfig, columns: list[str]) -> str:
    """alpaca or messages, from ``task.format`` and the columns the data has."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"task.format={cfg.format}: allowed: {', '.join(FORMATS)}")
    if cfg.format != "auto":
        return cfg.format
    return "messages" if cfg.messages_column in columns else "alpaca"


def check_columns(cfg: TaskConfig, columns: list[str], where: str) -> str:
    """The layout, after checking that its columns are present (one line naming the key)."""
    fmt = layout(cfg, columns)
    keys = ("messages_column",) if fmt == "messages" else ("prompt_column", "response_column")
    for key in keys:
        if getattr(cfg, key) not in columns:
            raise ConfigError(
                f"task.{key}={getattr(cfg, key)}: no such column in {where}; "
                f"allowed: {', '.join(map(str, columns)) or 'none'} (or set task.format)"
            )
    return fmt


def _text(value: Any, key: str, column: str, where: str) -> str:
    """A text field of an Alpaca row: a string (a number, as CSV readers type a column of digits,
    is its text; missing is empty). A list, an object or a boolean is refused in one line naming
    the key, as a chat file's non-text content is: neither is trained on as its Python repr."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"task.{key}={column}: {where} holds a {type(value).__name__}, not text; allowed: a string")
    return str(value).strip()


def example(cfg: TaskConfig, row: dict[str, Any], fmt: str, where: str) -> Example:
    """One row as (prompt messages, response); one-line errors for an empty response or a
    malformed message list."""
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if fmt == "alpaca":
        instruction = _text(row.get(cfg.prompt_column), "prompt_column", cfg.prompt_column, where)
        extra = _text(row.get(cfg.input_column), "input_column", cfg.input_column, where) if cfg.input_column else ""
        response = _text(row.get(cfg.response_column), "response_column", cfg.response_column, where)
        if not response:
            raise ConfigError(
                f"task.response_column={cfg.response_column}: {where} has an empty response; allowed: a non-empty text"
            )
        if not instruction:
            raise ConfigError(
                f"task.prompt_column={cfg.prompt_column}: {where} has an empty instruction; allowed: a non-empty text"
            )
        return system + [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}], response
    messages: Any = row.get(cfg.messages_column)  # any JSON value until checked below
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        raise ConfigError(
            f"task.messages_column={cfg.messages_column}: {where} is not a list of "
            f"{{role, content}} messages; allowed: roles {', '.join(ROLES)} with text content"
        )
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not messages[last]["content"].strip():
        raise ConfigError(
            f"task.messages_column={cfg.messages_column}: {where} has an empty response "
            "(no non-empty assistant message); allowed: at least one"
        )
    if last != len(messages) - 1:  # a turn after the response would be dropped without a word
        raise ConfigError(
            f"task.messages_column={cfg.messages_column}: {where} has {len(messages) - 1 - last} message(s) "
            "after the last assistant message (the response); allowed: a conversation that ends with it"
        )
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    if not any(m["role"] == "user" for m in prompt):
        raise ConfigError(
            f"task.messages_column={cfg.messages_column}: {where} has no user message before "
            "the response; allowed: at least one"
        )
    if system and prompt[0]["role"] != "system":
        prompt = system + prompt
    return prompt, messages[last]["content"].strip()


def local_examples(cfg: TaskConfig, split: str, f: Path) -> list[Example]:
    columns, rows = data.read_rows(cfg, f)
    if not rows:  # before the columns: an empty file has none
        raise ConfigError(f"task.path={cfg.path}: {f.name} holds no examples; allowed: at least one")
    fmt = check_columns(cfg, columns, f.name)
    return [example(cfg, row, fmt, f"{f.name} example {i + 1}") for i, row in enumerate(rows)]


def hub_examples(cfg: TaskConfig) -> dict[str, list[Example]]:
    out = {}
    for split, ds in data.load_splits(cfg).items():
        fmt = check_columns(cfg, ds.column_names, f"the {split} split")
        out[split] = [example(cfg, row, fmt, f"{split} example {i + 1}") for i, row in enumerate(ds)]
    return out


def examples(cfg: TaskConfig) -> dict[str, list[Example]]:
    """Every example of the train and eval splits (local files are read and checked in full)."""
    data.require_path(cfg)
    if data.is_local(str(cfg.path)):
        return {split: local_examples(cfg, split, f) for split, f in data.split_files(cfg).items()}
    return hub_examples(cfg)


def seeded_subset(items: list[Any], n: Optional[int], seed: int) -> list[Any]:
    """At most ``n`` items, a seeded random subset in a fixed order (all of them if n is null)."""
    import random

    if n is None or n >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def raw_task(cfg: TaskConfig, train: list[Example], ev: list[Example], answers_: Optional[list[str]] = None) -> RawTask:
    """The RawTask of instruction examples; reference answers default to the responses."""
    return RawTask(
        train_text=[r for _, r in train],
        eval_text=[r for _, r in ev],
        train_labels=None,
        eval_labels=None,
        train_prompts=[p for p, _ in train],
        eval_prompts=[p for p, _ in ev],
        eval_answers=answers_ if answers_ is not None else [r for _, r in ev],
        choices=list(cfg.choices) if cfg.choices else None,
    )


def check_generation(cfg: TaskConfig) -> None:
    """The generation settings every instruction task shares."""
    answers.rule(cfg.answer_rule, cfg.answer_regex)
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"task.max_new_tokens={cfg.max_new_tokens}: must be >= 1")
    if cfg.num_generate is not None and cfg.num_generate < 0:
        raise ConfigError(f"task.num_generate={cfg.num_generate}: must be >= 0 (0 skips accuracy) or null")
    if cfg.choices is not None and (len(cfg.choices) < 2 or any(not str(c).strip() for c in cfg.choices)):
        raise ConfigError(f"task.choices={list(cfg.choices)}: allowed: null, or at least 2 non-empty answers")


@register
class Instruction:
    name = "instruction"
    kind = "causal-lm"

    def check(self, cfg: TaskConfig) -> None:
        check_generation(cfg)
        data.require_path(cfg)
        if data.is_local(str(cfg.path)):
            examples(cfg)  # reads and checks every example: milliseconds for files of a few MB

    def num_train_examples(self, cfg: TaskConfig) -> Optional[int]:
        if not data.is_local(str(cfg.path)):
            return None
        n = len(examples(cfg)["train"])
        return n if cfg.num_train is None else min(n, cfg.num_train)

    def load(self, cfg: TaskConfig) -> RawTask:
        found = examples(cfg)
        train = seeded_subset(found["train"], cfg.num_train, cfg.data_seed)
        ev = seeded_subset(found[cfg.eval_split], cfg.num_eval, cfg.data_seed + 1)
        return raw_task(cfg, train, ev)
