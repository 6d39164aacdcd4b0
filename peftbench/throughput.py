"""Training throughput from per-step times and sizes: the one rule for every ``train_*_per_s``
figure, used by the training loop (one process) and by ``ranks.combine`` (a distributed run,
where a step lasts as long as its slowest rank and counts the global batch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from peftbench.timing import stats


@dataclass
class StepRecorder:
    """Per-step times (ms) and sizes of the timed optimizer steps: ``tokens`` (attended, i.e.
    not padding), ``padded`` (every position of the input ids) and ``samples`` (examples),
    reduced to medians and IQRs by ``metrics``."""

    ms: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    padded: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)

    def add(self, ms: float, micro: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step of ``ms`` milliseconds over the micro-batches ``micro``."""
        self.ms.append(ms)
        self.tokens.append(sum(int(b["attention_mask"].sum()) for b in micro))
        self.padded.append(sum(b["input_ids"].numel() for b in micro))
        self.samples.append(sum(b["input_ids"].shape[0] for b in micro))

    def rate(self, counts: list[int]) -> dict[str, float]:
        """Median and IQR of ``counts`` per second over the steps."""
        return stats([c / ms * 1e3 for c, ms in zip(counts, self.ms)])

    def metrics(self) -> dict[str, Any]:
        """``train_step_ms_median``/``_iqr``, tokens (and padded tokens, samples) per second,
        and the number of timed steps."""
        if not self.ms:
            return {"train_timed_steps": 0}
        st, tok = stats(self.ms), self.rate(self.tokens)
        return {
            "train_step_ms_median": st["median"],
            "train_step_ms_iqr": st["iqr"],
            "train_tokens_per_s": tok["median"],
            "train_tokens_per_s_iqr": tok["iqr"],
            "train_padded_tokens_per_s": self.rate(self.padded)["median"],
            "train_samples_per_s": self.rate(self.samples)["median"],
            "train_timed_steps": len(self.ms),
        }
