"""``sentiment`` (real data, built in): rt-polarity movie reviews (Pang & Lee 2005, shipped in
``data/rt-polarity``) as an instruction task. The prompt asks whether a review is positive or
negative; the response is one word, ``positive`` or ``negative``. Accuracy by generation takes
the first word of the greedy answer; accuracy by choice compares the two words' log-likelihood
(``task.choices``)."""

from __future__ import annotations

from typing import Optional

from peftbench.config import TaskConfig
from peftbench.errors import ConfigError
from peftbench.tasks import RawTask, data, instruction, register

QUESTION = "Is this movie review positive or negative? Answer with one word.\n\nReview: {text}"
WORDS = {0: "negative", 1: "positive"}


def examples(cfg: TaskConfig) -> dict[str, list[instruction.Example]]:
    """The train and eval splits as (prompt, response) pairs."""
    out = {}
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for split, f in data.split_files(cfg, ("csv",)).items():
        columns, rows = data.read_rows(cfg, f)
        for key in ("text_column", "label_column"):
            if getattr(cfg, key) not in columns:
                raise ConfigError(
                    f"task.{key}={getattr(cfg, key)}: no such column in {f.name}; allowed: {', '.join(columns)}"
                )
        pairs = []
        for i, row in enumerate(rows, 2):  # line 1 is the header
            label = str(row[cfg.label_column]).strip()
            if label not in ("0", "1"):
                raise ConfigError(
                    f"task.label_column={cfg.label_column}: {f.name} line {i} has label {label!r}; "
                    "allowed: 0 (negative) or 1 (positive)"
                )
            prompt = system + [{"role": "user", "content": QUESTION.format(text=str(row[cfg.text_column]).strip())}]
            pairs.append((prompt, WORDS[int(label)]))
        out[split] = pairs
    return out


@register
class Sentiment:
    name = "sentiment"
    kind = "causal-lm"

    def check(self, cfg: TaskConfig) -> None:
        instruction.check_generation(cfg)
        examples(cfg)

    def num_train_examples(self, cfg: TaskConfig) -> Optional[int]:
        n = len(examples(cfg)["train"])
        return n if cfg.num_train is None else min(n, cfg.num_train)

    def load(self, cfg: TaskConfig) -> RawTask:
        found = examples(cfg)
        train = instruction.seeded_subset(found["train"], cfg.num_train, cfg.data_seed)
        ev = instruction.seeded_subset(found[cfg.eval_split], cfg.num_eval, cfg.data_seed + 1)
        return instruction.raw_task(cfg, train, ev)
