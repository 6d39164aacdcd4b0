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
