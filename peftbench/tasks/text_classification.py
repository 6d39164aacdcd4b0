"""``text-classification`` (real data): sentences and labels from a local folder of
train/<eval_split> .csv/.json/.jsonl files or a hub dataset id, loaded with ``datasets``
(for example ``task.path=../shared/data/rt-polarity``). Labels may be integers or strings."""

from __future__ import annotations

from typing import Any, Optional

from peftbench.config import TaskConfig
from peftbench.tasks import RawTask, data, register

COLUMNS = ("text_column", "label_column")  # the task keys that name a column


@register
class TextClassification:
    name = "text-classification"
    kind = "classification"

    def check(self, cfg: TaskConfig) -> None:
        data.check_local(cfg, COLUMNS)

    def num_train_examples(self, cfg: TaskConfig) -> Optional[int]:
        return data.num_local_train(cfg)

    def load(self, cfg: TaskConfig) -> RawTask:
        """At most ``num_train`` / ``num_eval`` examples of each split, a seeded subset."""
        splits = data.load_splits(cfg)
        data.check_columns(cfg, splits, COLUMNS)
        train = data.subset(splits["train"], cfg.num_train, cfg.data_seed)
        ev = data.subset(splits[cfg.eval_split], cfg.num_eval, cfg.data_seed + 1)
        names, train_ids, eval_ids = data.encode_labels(
            cfg, train, list(train[cfg.label_column]), list(ev[cfg.label_column])
        )

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
