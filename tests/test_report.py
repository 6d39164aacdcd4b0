"""The report: a table and plots from a records folder, with bad files, failures and estimates."""

from __future__ import annotations

import errno
import json
import os

import pandas as pd
import pytest
from test_compare import FULL_PARAMS, make_record, write

from peftbench import report

from conftest import REPO

GPU = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def results(tmp_path):
    cpu = [
        make_record("full", seed=1),
        make_record("lora", rank=4, seed=2),
        make_record("lora", rank=8, seed=3),
        make_record("lora", rank=16, seed=4),
    ]
    adapter = make_record("adapter", seed=5)
    adapter["config"]["method"]["variant"] = "houlsby"
    failed = make_record("lora", rank=32, seed=6, status="failed")
    estimate = make_record("lora", seed=7, kind="estimate", model="llama2-7b", task=None, chash="e" * 10)
    gpu = [
        make_record("full", seed=8, device=GPU, device_type="cuda", step_ms=5.0),
        make_record("lora", seed=9, device=GPU, device_type="cuda", step_ms=3.0),
    ]
    folder = write(tmp_path / "runs", *cpu, adapter, failed, estimate, *gpu)
    (folder / "bad.json").write_text("{truncated")
    (folder / "foreign.json").write_text(json.dumps({"name": "not a record"}))
    return folder


def test_report_tables_plots_and_skips(results, tmp_path, capsys):
    out = tmp_path / "report"
    page = report.build([results], out)
    assert "skipped" in capsys.readouterr().err
    md = page.read_text()
    df = pd.read_csv(out / "records.csv")
    assert len(df) == 9  # the two bad files are not rows
    # a bad file is reported, not fatal
    assert "bad.json" in md and "foreign.json" in md and "## Skipped files" in md
    # one group per (device, model, task): CPU and GPU numbers never share a table or a chart
    assert "## tiny-llama / synthetic-lm on AMD EPYC" in md and f"## tiny-llama / synthetic-lm on {GPU}" in md
    cpu_section = md.split(f"on {GPU}")[0]
    assert "nvidia" not in "".join(line for line in cpu_section.splitlines() if line.startswith("!["))
    # ratios against full fine-tuning of the same device, model and task
    lora8 = df[(df["device"] == "AMD EPYC") & (df["method"] == "lora") & (df["method.rank"] == 8)].iloc[0]
    assert lora8["trainable_vs_full"] == pytest.approx(3584 * 8 / FULL_PARAMS)
    assert lora8["memory_vs_full"] == pytest.approx(16_000_000 / 50_000_000)
    # failed runs are listed, not plotted; estimates have their own table
    failed_section = md.split("## Failed runs (not plotted)")[1]
    assert "FloatingPointError: nan" in failed_section
    assert "rank=32" not in cpu_section.split("## Failed runs")[0]
    est = md.split("## Estimates (computed, not measured)")[1]
    assert "llama2-7b" in est and "llama2-7b" not in md.split("## Estimates")[0]
    # the plots: params (log), memory breakdown, throughput, latency grid, rank sweep, Pareto front
    for kind in ("params", "memory", "throughput", "latency", "lora-ranks", "pareto"):
        png = out / f"tiny-llama-synthetic-lm-amd-epyc-{kind}.png"
        assert png.stat().st_size > 5000, kind
        assert f"]({png.name})" in md
    assert (out / "latency.csv").stat().st_size > 0
    # labels tell runs of one method apart by the settings that differ
    assert {"lora rank=4", "lora rank=8", "lora rank=16"} <= set(df["label"])


def test_pareto_front():
    # (memory, quality) with loss: lower is better on both axes
    pts = [(10.0, 5.0), (20.0, 4.0), (30.0, 4.5), (5.0, 6.0), (25.0, 4.0)]
    assert report.pareto(pts, higher_better=False) == [0, 1, 3]
    assert report.pareto([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8)], higher_better=True) == [0, 1]


def test_missing_results_folder_is_an_error(tmp_path, capsys):
    assert report.main(["--results", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_report_of_the_committed_default_results_is_unchanged(tmp_path, monkeypatch):
    """The committed example report is what the report code makes of the committed records
    (text outputs; the plots depend on the matplotlib version)."""
    monkeypatch.chdir(REPO)
    report.build(["results/default"], tmp_path)
    for name in ("report.md", "records.csv", "latency.csv"):
        assert (tmp_path / name).read_text() == (REPO / "reports" / "default" / name).read_text(), name


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_out_path_that_cannot_be_written_is_refused_first(results, tmp_path, capsys, monkeypatch, where):
    target = tmp_path / "taken"
    target.write_text("keep me")
    out, why = {
        "a file": (target, "exists and is not a folder"),
        "under a file": (target / "report", f"cannot be created: {target} is not a folder"),
        "read-only": (tmp_path / "new", f"cannot be written: no permission to write in {tmp_path}"),
    }[where]
    if where == "read-only":  # as root, permissions would not stop the write: the check is what is tested
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    before = sorted(tmp_path.rglob("*"))
    assert report.main(["--results", str(results), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"peftbench.report: error: --out={out}: {why}\n"
    assert sorted(tmp_path.rglob("*")) == before and target.read_text() == "keep me"


def test_a_write_that_fails_at_the_end_is_one_line_and_exit_1(results, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    out = tmp_path / "report"
    assert report.main(["--results", str(results), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"peftbench.report: error: {out / 'records.csv'}: No space left on device"
    assert not any("Traceback" in line for line in err)


def test_valid_records_without_the_usual_metrics_make_a_report(tmp_path):
    """The schema requires no particular metric: a record with none is a row, not a crash."""
    bare = {"schema_version": 1, "kind": "measured", "status": "ok", "model": "m", "task": None, "metrics": {}}
    folder = write(
        tmp_path / "runs",
        {**bare, "run_id": "1-full", "method": "full"},
        {**bare, "run_id": "2-lora", "method": "lora", "metrics": {"eval_loss": 2.0}},
    )
    assert report.main(["--results", str(folder), "--out", str(tmp_path / "report")]) == 0
    assert len(pd.read_csv(tmp_path / "report" / "records.csv")) == 2
