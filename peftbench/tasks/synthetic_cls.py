"""``synthetic-cls`` (classification, no download): English sentences built from positive,
negative and neutral words; the label says which sentiment words are in the majority."""

from __future__ import annotations

from peftbench.config import TaskConfig
from peftbench.tasks import RawTask, register, synthetic


@register
class SyntheticCls:
    name = "synthetic-cls"
    kind = "classification"

    def check(self, cfg: TaskConfig) -> None:
        synthetic.counts(cfg)

    def num_train_examples(self, cfg: TaskConfig) -> int:
        return synthetic.counts(cfg)[0]

    def load(self, cfg: TaskConfig) -> RawTask:
        """``num_train`` and ``num_eval`` sentences, labelled 0 (negative) or 1 (positive)."""
        tt, tl = synthetic.sentiment_text(synthetic.counts(cfg)[0], cfg.data_seed + 1)
        et, el = synthetic.sentiment_text(synthetic.counts(cfg)[1], cfg.data_seed + 2)
        return RawTask(tt, et, tl, el, num_labels=2, label_names=["negative", "positive"])
