"""``synthetic-cls`` (classification, no download): English sentences built from positive,
negative and neutral words; the label says which sentiment words are in the majority."""

from __future__ import annotations

from typing import Any

from peftbench.tasks import RawTask, register, synthetic


@register
class SyntheticCls:
    name = "synthetic-cls"
    kind = "classification"

    def check(self, cfg: Any) -> None:
        synthetic.check_counts(cfg)

    def num_train_examples(self, cfg: Any) -> int:
        return cfg.num_train

    def load(self, cfg: Any) -> RawTask:
        """``num_train`` and ``num_eval`` sentences, labelled 0 (negative) or 1 (positive)."""
        tt, tl = synthetic.sentiment_text(cfg.num_train, cfg.data_seed + 1)
        et, el = synthetic.sentiment_text(cfg.num_eval, cfg.data_seed + 2)
        return RawTask(tt, et, tl, el, num_labels=2, label_names=["negative", "positive"])
