"""The report's rank study: quality and cost against rank, and the smallest rank within noise
of the best, where the noise counts the seeds and the finite eval set."""

from __future__ import annotations

import hashlib
import itertools
import math

import pytest
from test_compare import make_record, write

from peftbench import report

_stamp = itertools.count(900)  # a distinct run id for every record made here

# (rank, accuracies over seeds 0 and 1) on 1,000 eval examples; rank 8 is best (0.81)
ACCURACY = {1: (0.70, 0.72), 2: (0.76, 0.78), 4: (0.79, 0.80), 8: (0.80, 0.82)}


def run(rank: int, seed: int, accuracy: float, method: str = "lora", **config) -> dict:
    chash = hashlib.sha256(repr((method, rank, seed, sorted(config.items()))).encode()).hexdigest()[:10]
    rec = make_record(
        method,
        rank=rank,
        seed=next(_stamp),
        chash=chash,
        model="minilm",
        task="text-classification",
        extra_config={"seed": seed},
    )
    rec["config"]["method"] = {"name": method, "rank": rank, **config}
    rec["metrics"].update(
        eval_accuracy=accuracy,
        eval_examples=1000,
        train_flops_per_step=2e9 + rank * 1e7,
        peak_memory_bytes=2**20 * (100 + rank),
    )
    return rec


def build(tmp_path, recs) -> str:
    return report.build([write(tmp_path / "runs", *recs)], tmp_path / "report").read_text()


def test_smallest_rank_within_noise_of_the_best(tmp_path):
    recs = [run(r, s, a) for r, accs in ACCURACY.items() for s, a in enumerate(accs)]
    md = build(tmp_path, recs)
    assert "### Rank study: lora" in md
    # rank 4: seeds' SE 0.0071/sqrt(2) = 0.0050, eval SE sqrt(0.795 x 0.205 / 1000) = 0.0128 -> 0.0137;
    # rank 8: 0.0100 and 0.0124 -> 0.0159; noise between them 0.0210 > 0.015 apart: within noise.
    # rank 2: 0.77, total SE 0.0166, noise to rank 8 0.0230 < 0.04 apart: not.
    assert "| 4 | 2 | 0.7950 ± 0.0071 | 0.0137 | 14,336 | 104.0 | 2.04 |" in md
    assert "| 8 | 2 | 0.8100 ± 0.0141 | 0.0159 | 28,672 | 108.0 | 2.08 |" in md
    assert "Best eval_accuracy: rank 8 (0.8100). Smallest rank within noise of the best: **rank 4** (0.7950;" in md
    assert "the difference 0.0150 is less than the noise 0.0210" in md
    assert "Within noise of the best: rank 4, 8." in md


def test_total_standard_error_adds_seeds_and_eval_set():
    import pandas as pd

    from peftbench.stats import Spread

    r = pd.Series(
        {
            "quality": 0.8,
            "quality_metric": "eval_accuracy (higher is better)",
            "eval_examples": 400,
            "spread": {"eval_accuracy": Spread.of([0.78, 0.82])},
        }
    )
    seeds, evals = 0.02828427 / math.sqrt(2), math.sqrt(0.8 * 0.2 / 400)
    assert report.total_standard_error(r) == pytest.approx(math.hypot(seeds, evals), rel=1e-6)
    single = r.drop("spread")
    assert report.total_standard_error(single) == pytest.approx(evals)
    assert report.total_standard_error(single.drop("eval_examples")) is None


def test_no_rank_study_when_something_else_varies_with_rank(tmp_path):
    """Two alpha values at the same ranks are not one rank sweep: no verdict is given."""
    recs = [run(r, 0, 0.8, alpha=a) for r in (1, 2) for a in (8.0, 16.0)]
    assert "Rank study" not in build(tmp_path, recs)
