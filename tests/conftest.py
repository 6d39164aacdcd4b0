"""Shared test helpers: compose a peftbench config exactly as the CLI would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
RT_POLARITY = REPO.parent / "shared" / "data" / "rt-polarity"


def compose_config(*overrides: str):
    """The resolved config for ``python -m peftbench <overrides>`` (no run)."""
    from peftbench import app

    return app.compose(*overrides)


def peft_virtual_tokens_broken(task: str = "CAUSAL_LM", generation: bool = False) -> bool:
    """Whether Hugging Face peft, the reference, cannot run virtual-token methods (prefix and
    prompt tuning) here: peft 0.21.2 and earlier pass the KV cache as ``past_key_values``, which
    transformers 5.24 renamed ``cache``, so its generation runs without the virtual tokens and it
    refuses prefix tuning on sequence classification. Our side of such a test still runs; the
    parity with peft is then checked in .ci/run's other environment (transformers' floor)."""
    import peft
    import transformers
    from packaging.version import Version

    broken = Version(transformers.__version__) >= Version("5.24") and Version(peft.__version__) <= Version("0.21.2")
    return broken and (generation or task != "CAUSAL_LM")


PEFT_BROKEN_WHY = (
    "peft <= 0.21.2 on transformers >= 5.24 (cache renamed): the reference runs without the virtual "
    "tokens; parity with peft is checked in .ci/run's transformers-floor environment"
)


# A tiny run: few short examples, one latency point, no decode measurement (add train.steps).
TINY_RUN = (
    "train.batch_size=2",
    "train.timing_warmup=2",
    "task.num_train=16",
    "task.num_eval=4",
    "task.max_length=32",
    "measure.latency_repeats=2",
    "measure.latency_warmup=1",
    "measure.latency_length=16",
    "measure.latency_grid_batches=[1]",
    "measure.latency_grid_lengths=[16]",
    "measure.decode_tokens=0",
)


@pytest.fixture
def tiny_run(tmp_path):
    """Run peftbench in-process with tiny settings; returns (record, path)."""
    from peftbench.cli import run_and_write as run

    def go(*overrides: str):
        cfg = compose_config(
            "train.steps=4",
            *TINY_RUN,
            f"results_dir={tmp_path}",
            *overrides,
        )
        return run(cfg)

    return go
