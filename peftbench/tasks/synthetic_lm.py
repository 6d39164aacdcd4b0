"""``synthetic-lm`` (causal LM, no download): text sampled from a seeded word-level Markov
language whose next word is one of four successors with fixed probabilities, so a model that
learns the transitions drives the loss from ln(vocabulary) towards the chain's entropy."""

from __future__ import annotations

from peftbench.config import TaskConfig
from peftbench.tasks import RawTask, register, synthetic


@register
class SyntheticLM:
    name = "synthetic-lm"
    kind = "causal-lm"

    def check(self, cfg: TaskConfig) -> None:
        synthetic.counts(cfg)

    def num_train_examples(self, cfg: TaskConfig) -> int:
        return synthetic.counts(cfg)[0]

    def load(self, cfg: TaskConfig) -> RawTask:
        """``num_train`` and ``num_eval`` texts of at least ``max_length`` words, one language."""
        n_train, n_eval = synthetic.counts(cfg)
        return RawTask(
            train_text=synthetic.markov_text(n_train, cfg.max_length, cfg.data_seed, cfg.data_seed + 1),
            eval_text=synthetic.markov_text(n_eval, cfg.max_length, cfg.data_seed, cfg.data_seed + 2),
            train_labels=None,
            eval_labels=None,
        )
