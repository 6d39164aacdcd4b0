"""``synthetic-lm`` (causal LM, no download): text sampled from a seeded word-level Markov
language whose next word is one of four successors with fixed probabilities, so a model that
learns the transitions drives the loss from ln(vocabulary) towards the chain's entropy."""

from __future__ import annotations

from typing import Any

from peftbench.tasks import RawTask, register, synthetic


@register
class SyntheticLM:
    name = "synthetic-lm"
    kind = "causal-lm"

    def check(self, cfg: Any) -> None:
        synthetic.check_counts(cfg)

    def num_train_examples(self, cfg: Any) -> int:
        return cfg.num_train

    def load(self, cfg: Any) -> RawTask:
        """``num_train`` and ``num_eval`` texts of at least ``max_length`` words, one language."""
        return RawTask(
            train_text=synthetic.markov_text(cfg.num_train, cfg.max_length, cfg.data_seed, cfg.data_seed + 1),
            eval_text=synthetic.markov_text(cfg.num_eval, cfg.max_length, cfg.data_seed, cfg.data_seed + 2),
            train_labels=None,
            eval_labels=None,
        )
