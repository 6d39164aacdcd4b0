"""Quality with its spread: the seeds sweep, records that differ only in seed pooled into one
row (mean ± sample std, n) by the report and the gate, and the noise that a difference between
two rows, or a change against the baseline, has to beat."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from omegaconf import OmegaConf
from test_compare import make_record, write

from peftbench import app, cli, compare, report
from peftbench.records import reader as records

from conftest import compose_config

_stamp = itertools.count(100)  # a distinct run id (its time stamp) for every record made here


def run(method: str, seed: int, accuracy: float, *, rank: int = 8, examples: int | None = None, **metrics) -> dict:
    """A valid ok record of ``method`` with ``config.seed = seed`` and the given eval accuracy."""
    rec = make_record(method, rank=rank, seed=next(_stamp), extra_config={"seed": seed}, quality=5.0 + seed / 10)
    rec["metrics"]["eval_accuracy"] = accuracy
    if examples is not None:
        rec["metrics"]["eval_examples"] = examples
    rec["metrics"].update(metrics)
    return rec


def seeds(method: str, accuracies: list[float], **kw) -> list[dict]:
    return [run(method, s, a, **kw) for s, a in enumerate(accuracies)]


def markdown(tmp_path, *recs: dict) -> str:
    folder = write(tmp_path / "runs", *recs)
    return report.build([folder], tmp_path / "report").read_text()


# ------------------------------------------------------------------------------ the sweep
def test_the_seeds_sweep_is_three_jobs_that_differ_only_in_seed():
    jobs = app.check_jobs(cli.APP, ["-m", "+sweep=seeds", "method=lora"])
    assert not isinstance(jobs, int), jobs
    assert len(jobs) == 3 and len({j.config_hash for j in jobs}) == 3
    configs = [OmegaConf.to_container(compose_config(*j.overrides), resolve=True) for j in jobs]
    assert [c.pop("seed") for c in configs] == [0, 1, 2]
    assert configs[0] == configs[1] == configs[2]
    # the same three runs as a sweep on the command line: resume treats them as one
    by_hand = app.check_jobs(cli.APP, ["-m", "seed=0,1,2", "method=lora"])
    assert [j.config_hash for j in by_hand] == [j.config_hash for j in jobs]


# --------------------------------------------------------------------------- the grouping
def test_records_are_grouped_by_everything_but_the_seed():
    lora = seeds("lora", [0.80, 0.82, 0.78])
    lora[1]["config"]["results_dir"] = "elsewhere"  # where a record is written is no difference
    rank16 = run("lora", 0, 0.80, rank=16)
    estimate = run("lora", 1, 0.80)
    estimate["kind"] = "estimate"  # the same config, estimated rather than measured
    bare = {"run_id": "1-bare", "config_hash": None, "kind": "measured"}
    groups = list(records.seed_groups([lora[2], rank16, lora[0], estimate, lora[1], bare]).values())
    assert groups == [lora, [rank16], [estimate], [bare]]  # first appearance first, by seed within
    # of two records of one seed, the newest
    again = run("lora", 1, 0.5)
    assert records.seed_groups([*lora, again])[records.seed_free_key(again)] == [lora[0], again, lora[2]]


@pytest.mark.parametrize(
    "key, direction",
    [
        ("eval_loss", "lower"),
        ("train_loss_final", "lower"),
        ("eval_accuracy", "higher"),
        ("mmlu_accuracy", "higher"),
        ("choice_accuracy", "higher"),
        ("wikitext_perplexity", "lower"),
        ("forgetting_kl", "lower"),
        ("eval_loss_initial", None),  # before training: not the method's quality
        ("eval_peak_memory_bytes", None),
        ("eval_examples", None),
        ("train_step_ms_median", None),
    ],
)
def test_one_definition_of_a_quality_metric(key, direction):
    assert compare.quality_direction(key) == direction


def test_the_report_pools_seeds_into_one_row(tmp_path):
    lora = seeds("lora", [0.80, 0.82, 0.78])
    steps = [r["metrics"]["train_step_ms_median"] for r in lora]
    md = markdown(tmp_path, run("full", 0, 0.95), *lora)
    table = md.split("quality: ")[0]
    assert table.count("| lora ") == 1 and "seed=" not in table  # one row, its label without the seed
    assert "| 0.8000 ± 0.0200 (n=3) |" in table
    # cost figures: the mean over the seeds
    assert f"| {sum(steps) / 3:,.1f} (2.0) |" in table
    # every quality metric, with the seeds, in the table under it
    assert "| run | n | seeds | eval_accuracy | eval_loss | train_loss_final |" in md
    assert "| lora | 3 | 0, 1, 2 | 0.8000 ± 0.0200 | 5.1000 ± 0.1000 | 5.1000 ± 0.1000 |" in md
    assert "| full | 1 | 0 | 0.9500 | 5.0000 | 5.0000 |" in md
    # records.csv keeps one row per record
    assert len(pd.read_csv(tmp_path / "report" / "records.csv")) == 4


# ------------------------------------------------------------------------------ the noise
def test_within_noise_sentence_only_when_rows_differ_by_less_than_the_noise(tmp_path):
    lora, adapter = seeds("lora", [0.80, 0.82, 0.78]), seeds("adapter", [0.79, 0.81, 0.80])
    md = markdown(tmp_path / "close", *lora, *adapter)
    # noise = sqrt((0.02/sqrt 3)^2 + (0.01/sqrt 3)^2) = 0.0129 > the 0.0000 between the means
    assert (
        "Within noise: adapter and lora differ in eval_accuracy by 0.0000, less than the noise 0.0129 "
        "(their standard errors combined), so this comparison cannot tell them apart."
    ) in md
    far = seeds("adapter", [0.90, 0.92, 0.91])
    assert "Within noise" not in markdown(tmp_path / "far", *lora, *far)


def test_a_single_accuracy_uses_the_binomial_error_when_the_examples_are_known(tmp_path):
    # 0.80 and 0.81 on 1,066 examples each: se 0.01225 and 0.01202, noise 0.0172 > 0.01
    md = markdown(tmp_path / "n", run("lora", 0, 0.80, examples=1066), run("adapter", 0, 0.81, examples=1066))
    assert "Within noise: adapter and lora differ in eval_accuracy by 0.0100, less than the noise 0.0172" in md
    assert "±" not in md  # single runs: no spread, no pooling
    # without the number of examples one run has no known noise: nothing is said
    assert "Within noise" not in markdown(tmp_path / "no-n", run("lora", 0, 0.80), run("adapter", 0, 0.81))


# ------------------------------------------------------------------------------- the gate
def shifted(recs: list[dict], by: float) -> list[dict]:
    out = []
    for r in recs:
        c = run(r["method"], r["config"]["seed"], r["metrics"]["eval_accuracy"] + by)
        c["config_hash"], c["run_id"], c["train_step_ms"] = r["config_hash"], r["run_id"], r["train_step_ms"]
        c["metrics"]["train_step_ms_median"] = r["metrics"]["train_step_ms_median"]
        out.append(c)
    return out


def gate(tmp_path, base: list[dict], cur: list[dict], *args: str) -> int:
    return compare.main([str(write(tmp_path / "b", *base)), str(write(tmp_path / "c", *cur)), *args])


def test_a_drop_within_two_standard_errors_of_three_seeds_passes(tmp_path, capsys):
    base = seeds("lora", [0.80, 0.82, 0.78])
    # 2 points lower: today's rule (0.01 absolute) would fail it; 2 SE = 2 x 0.0163 = 0.0327
    assert gate(tmp_path, base, shifted(base, -0.02)) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "eval_accuracy" in ln)
    assert "0.8 ± 0.02 (n=3)" in line and "0.78 ± 0.02 (n=3)" in line and "changed" in line
    assert "margin 0.0327 = max(tolerance 0.01, 2 SE 0.0327)" in line
    assert "3 run(s) matched" in out


def test_a_large_drop_fails_against_three_seeds(tmp_path, capsys):
    base = seeds("lora", [0.80, 0.82, 0.78])
    assert gate(tmp_path, base, shifted(base, -0.10)) == 1
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "eval_accuracy" in ln)
    assert "0.7 ± 0.02 (n=3)" in line and "FAIL" in line


def test_single_seed_quality_keeps_todays_rule(tmp_path, capsys):
    base = [run("lora", 0, 0.80)]
    assert gate(tmp_path / "a", base, shifted(base, -0.02)) == 1  # beyond the 0.01 tolerance
    assert gate(tmp_path / "b", base, shifted(base, -0.005)) == 0
    capsys.readouterr()
    # n = 1 on one side: run by run, today's rule (the seeds the current side lacks are missing)
    three = seeds("lora", [0.80, 0.82, 0.78])
    assert gate(tmp_path / "c", three, shifted(three[:1], -0.02), "--allow-missing") == 1
    out = capsys.readouterr().out
    assert "±" not in out and "lora rank=8/tiny-llama/synthetic-lm seed=1" in out and "missing" in out
