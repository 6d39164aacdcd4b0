"""``report.html`` (``peftbench.report.html``): one self-contained page that opens offline, with
the records table, the Pareto view (seeds pooled, with their spread) and the Markdown report; and
the committed LLM report's page drawn by a real browser (headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from test_compare import write
from test_report_llm import llm

from peftbench import report
from peftbench.report import html

from conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# how the browser runs here: no sandbox (root), no GPU, no network calls of its own
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=10000",
)  # fmt: skip


def page_data(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    assert m is not None
    return json.loads(m.group(1))


def outside_references(text: str) -> list[str]:
    """The page's tags that would load something from outside the file."""
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", text)
    return [t for t in tags if re.search(r'\b(?:src|href)="(?!data:)', t)]


def test_the_page_holds_every_record_and_pools_seeds_for_the_pareto_view(tmp_path):
    recs = [llm("full", gen=0.8), llm("lora", 0, gen=0.70), llm("lora", 1, gen=0.74), llm("adapter", gen=0.6)]
    recs[1]["config"]["results_dir"] = "x</script><script>alert(1)</script>"  # cannot end the data early
    write(tmp_path / "runs", *recs)
    report.build([str(tmp_path / "runs")], tmp_path / "out")
    text = (tmp_path / "out" / "report.html").read_text()
    assert outside_references(text) == []
    data = page_data(text)
    assert len(data["rows"]) == 4
    col = data["columns"].index
    rows = {(r[col("method")], r[col("seed")]): (r, g) for r, g in zip(data["rows"], data["group"])}
    # the two LoRA seeds share a pooling group; different methods do not
    assert rows[("lora", 0)][1] == rows[("lora", 1)][1] != rows[("full", 0)][1]
    assert rows[("lora", 1)][0][col("quality")] == 0.74
    assert data["direction"]["peak_bytes"] == "lower" and data["direction"]["train_tokens_per_s"] == "higher"
    assert set(data["quality_direction"].values()) == {"higher"}
    assert {"method", "model", "task", "lever"} <= set(data["filters"])
    # the Markdown report is inside, its plots as data URIs
    assert "<h1>peftbench report</h1>" in text
    assert re.search(r'<img alt="Quality against memory" src="data:image/png;base64,', text)


def test_a_cell_that_is_not_finite_is_null_not_nan():
    assert [html.plain(v) for v in (float("nan"), float("inf"), 3, "a", None)] == [None, None, 3, "a", None]
    assert html.direction("eval_loss") == "lower" and html.direction("eval_accuracy") == "higher"
    assert html.direction("decode_ms_per_token") == "lower" and html.direction("method.rank") is None


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_committed_llm_report_draws_its_table_and_plot_in_headless_chromium(tmp_path):
    page = REPO / "reports" / "llm" / "report.html"
    done = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 of 6 rows" in dom  # the table was drawn by the page's script
    assert len(re.findall(r"<tbody>.*?</tbody>", dom, re.S)[0].split("<tr>")) - 1 == 6
    assert 'class="main-svg"' in dom  # plotly drew the Pareto view
    assert dom.count('class="point"') == 4  # full, LoRA (3 seeds pooled into one), adapter, prefix
