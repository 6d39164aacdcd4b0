"""The gate's history (``peftbench.history``): which figures an entry keeps, where a figure
changed, the committed history rebuilt from git's versions of the baseline, and the report's
section that plots it (``--history``)."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_compare import make_record, write

from peftbench import history, report
from peftbench.report import command

from conftest import REPO


def rec(method: str, *, commit: str, stamp: str, machine: str = "AMD EPYC", **metrics: float) -> dict:
    r = make_record(method)
    r["provenance"].update({"git_sha": commit, "timestamp": stamp, "device_name": machine, "device_type": "cpu"})
    r["metrics"].update(metrics)
    return r


def test_an_entry_keeps_the_gated_figures_of_each_run_and_the_newest_commit():
    a = rec("lora", commit="a" * 40, stamp="2026-12-01T10:00:00+00:00", train_step_ms_median=100.0)
    b = rec("full", commit="b" * 40, stamp="2026-12-01T11:00:00+00:00", eval_loss=2.5)
    e = history.entry([a, b], "gate")
    assert (e["commit"], e["date"], e["machine"], e["source"]) == (
        "b" * 40,
        "2026-12-01T11:00:00+00:00",
        "AMD EPYC",
        "gate",
    )
    lora = e["figures"]["lora rank=8/tiny-llama/synthetic-lm"]
    assert lora["train_step_ms_median"] == 100.0 and "trainable_params" in lora and "peak_memory_bytes" in lora
    assert "train_tokens_per_s" not in lora and "train_step_ms_iqr" not in lora  # not gated
    assert e["figures"]["full/tiny-llama/synthetic-lm"]["eval_loss"] == 2.5
    assert [history.kind(k, True) for k in ("trainable_params", "eval_loss", "decode_ms_per_token")] == [
        "exact",
        "quality",
        "timing",
    ]


def entries(*figs: dict, machines: tuple[str, ...] = ()) -> list[dict]:
    return [
        {"commit": f"{i}" * 40, "machine": (machines or ("m",) * len(figs))[i], "device_type": "cpu", "figures": f}
        for i, f in enumerate(figs)
    ]


def test_changes_are_every_exact_or_quality_difference_and_timings_beyond_the_step():
    es = entries(
        {"r": {"trainable_params": 10, "eval_loss": 2.0, "train_step_ms_median": 100.0}},
        {"r": {"trainable_params": 10, "eval_loss": 2.0, "train_step_ms_median": 120.0}},  # +20%: noise
        {"r": {"trainable_params": 12, "eval_loss": 1.9, "train_step_ms_median": 160.0}},  # +33%
    )
    found = {(c["metric"], c["to_commit"][0]) for c in history.changes(es)}
    assert found == {("trainable_params", "2"), ("eval_loss", "2"), ("train_step_ms_median", "2")}
    # another machine's timings are not a change of the figure
    other = entries({"r": {"train_step_ms_median": 100.0}}, {"r": {"train_step_ms_median": 500.0}}, machines=("m", "n"))
    assert history.changes(other) == []


def test_append_and_read_back(tmp_path):
    runs = write(tmp_path / "runs", rec("lora", commit="c" * 40, stamp="2026-12-02T00:00:00+00:00"))
    path = tmp_path / "h" / "gate.jsonl"
    for _ in range(2):
        assert history.main(["append", str(path), str(runs)]) == 0
    got = history.read(path)
    assert len(got) == 2 and got[0] == got[1] and got[0]["commit"] == "c" * 40
    path.write_text('{"commit": "x"}\n')
    with pytest.raises(ValueError, match="gate.jsonl:1: not a history entry"):
        history.read(path)
    assert history.main(["append", str(path), str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert history.main(["append", str(path), str(tmp_path / "empty")]) == 2


def shallow() -> bool:
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"], capture_output=True, text=True
    )
    return out.stdout.strip() != "false"


@pytest.mark.skipif(shallow(), reason="needs the repository's history (a full clone)")
def test_the_committed_history_starts_with_every_committed_baseline():
    committed = history.read(REPO / "results" / "history" / "gate.jsonl")
    rebuilt = json.loads(json.dumps(history.baseline_entries()))
    assert committed[: len(rebuilt)] == rebuilt
    assert len(rebuilt) >= 4 and all(e["source"].startswith("baseline ") for e in rebuilt)
    # the CPU-attention FLOP change of 3fefe6b shows as exact changes at that baseline
    at = {c["to_commit"][:7] for c in history.changes(rebuilt) if c["kind"] == "exact"}
    assert "b95a21d" in at


def test_the_report_plots_the_history_and_names_the_commits_where_a_figure_changed(tmp_path):
    es = entries(
        {"lora/tiny-llama/synthetic-lm": {"train_flops_per_step": 5.0, "train_step_ms_median": 10.0}},
        {"lora/tiny-llama/synthetic-lm": {"train_flops_per_step": 6.0, "train_step_ms_median": 10.0}},
    )
    path = tmp_path / "gate.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in es))
    runs = write(tmp_path / "runs", make_record("lora"))
    report.build([str(runs)], tmp_path / "out", str(path))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## History of the gated figures" in md
    assert f"| {'0' * 7} → {'1' * 7} | lora/tiny-llama/synthetic-lm | train_flops_per_step | exact | 5 | 6 |" in md
    assert (tmp_path / "out" / "history-exact.png").is_file() and (tmp_path / "out" / "history-timing.png").is_file()
    assert not (tmp_path / "out" / "history-quality.png").exists()  # no quality figure changed
    # a file that is not a history: one line, exit 2, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert command.main(["--results", str(runs), "--out", str(tmp_path / "none"), "--history", str(bad)]) == 2
    assert not (tmp_path / "none").exists()
