"""The report of instruction-tuning records (a pretrained LLM): which metric is the quality,
the before/after and memory tables, the Pareto fronts against memory and training time, and
the noise of a single accuracy; records of the older kinds report as before."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
from test_compare import make_record, write

from peftbench import report
from peftbench.report import render

from conftest import REPO

_stamp = itertools.count(500)  # a distinct run id (its time stamp) for every record made here


def llm(
    method: str,
    seed: int = 0,
    *,
    rank: int = 8,
    gen: float = 0.5,
    choice: float = 0.6,
    step_ms: float = 100.0,
    steps: int = 30,
    **metrics: float,
) -> dict:
    """A valid ok record of an instruction run: ``gen`` / ``choice`` are the tuned accuracies,
    zero-shot 0.2 / 0.4; eval loss 2.0 -> 1.0; forgetting KL 0.01 and CE delta 0.02 (nats);
    addition skill 0.9 -> 0.8; 200 generated of 1,000 eval examples; ``step_ms`` median."""
    rec = make_record(
        method, rank=rank, seed=next(_stamp), model="smollm2-135m", task="instruction", extra_config={"seed": seed}
    )
    rec["config"]["train"]["steps"] = steps
    rec["metrics"].update(
        {
            "eval_generate_accuracy": gen,
            "eval_generate_accuracy_initial": 0.2,
            "eval_choice_accuracy": choice,
            "eval_choice_accuracy_initial": 0.4,
            "eval_generate_examples": 200,
            "eval_examples": 1000,
            "eval_loss": 1.0,
            "eval_loss_initial": 2.0,
            "eval_perplexity": math.e,
            "forgetting_kl": 0.01,
            "forgetting_kl_initial": 0.0,
            "forgetting_ce_delta": 0.02,
            "forgetting_ce_delta_initial": 0.0,
            "skill_accuracy": 0.8,
            "skill_accuracy_initial": 0.9,
            "train_step_ms_median": step_ms,
            "inference_latency_unmerged_ms": 12.0,
            "decode_ms_per_token": 3.0,
            **metrics,
        }
    )
    return rec


def build(tmp_path, *recs: dict) -> str:
    return report.build([write(tmp_path / "runs", *recs)], tmp_path / "report").read_text()


# ------------------------------------------------------------------- which metric is quality
@pytest.mark.parametrize(
    "drop, key",
    [
        ((), "eval_generate_accuracy (higher is better)"),
        (("eval_generate_accuracy",), "eval_choice_accuracy (higher is better)"),
        (("eval_generate_accuracy", "eval_choice_accuracy"), "eval_accuracy (higher is better)"),
        (("eval_generate_accuracy", "eval_choice_accuracy", "eval_accuracy"), "eval_loss (lower is better)"),
    ],
)
def test_quality_prefers_generation_then_choice_then_accuracy_then_loss(drop, key):
    rec = llm("lora", eval_accuracy=0.7)
    for k in drop:
        rec["metrics"][k] = None  # a null metric is as good as none
    r = report.row(rec)
    assert r["quality_metric"] == key
    assert r["quality"] == rec["metrics"][key.split()[0]]


# ------------------------------------------------------------------------------ the tables
def test_before_after_and_memory_tables_pinned(tmp_path):
    lora = [llm("lora", s, gen=g, choice=0.65) for s, g in enumerate([0.50, 0.55, 0.60])]
    full = llm("full", gen=0.70, choice=0.75, step_ms=200.0, eval_loss=0.8, forgetting_kl=0.05)
    md = build(tmp_path, full, *lora)
    section = md.split("### Quality before and after training")[1].split("### Peak training memory")[0]
    assert (
        "| run | n | seeds | accuracy, generation (before → after) | accuracy, choice (before → after) "
        "| eval loss (before → after) | perplexity | forgetting KL | CE delta | addition skill (before → after) |"
    ) in section
    assert (
        "| full | 1 | 0 | 0.2000 → 0.7000 | 0.4000 → 0.7500 | 2.0000 → 0.8000 | 2.7183 | 0.0500 | 0.0200 "
        "| 0.9000 → 0.8000 |"
    ) in section
    # three seeds pooled into one row: mean ± sample std
    assert (
        "| lora | 3 | 0, 1, 2 | 0.2000 ± 0.0000 → 0.5500 ± 0.0500 | 0.4000 ± 0.0000 → 0.6500 ± 0.0000 "
        "| 2.0000 ± 0.0000 → 1.0000 ± 0.0000 | 2.7183 ± 0.0000 | 0.0100 ± 0.0000 | 0.0200 ± 0.0000 "
        "| 0.9000 ± 0.0000 → 0.8000 ± 0.0000 |"
    ) in section
    assert "- **forgetting KL**: mean per-token KL(base ‖ model)" in section and "(nats/token" in section
    memory = md.split("### Peak training memory, breakdown (MiB)")[1].split("###")[0]
    assert (
        "| run | peak | weights | gradients | optimizer | activations | train tok/s | train s | latency ms "
        "| unmerged ms | decode ms/token | checkpoint MiB |"
    ) in memory
    # 50e6 B = 47.7 MiB, 12e6 = 11.4, 24e6 = 22.9, 2e6 = 1.9; 200 ms x 30 steps = 6.0 s
    assert "| full | 47.7 | 11.4 | 11.4 | 22.9 | 1.9 | " in memory and " | 6.0 | 10.00 | 12.00 | 3.00 | " in memory
    assert "| lora | 15.3 | 11.4 | 0.1 | 0.2 | 1.9 | " in memory and " | 3.0 | 10.00 | 12.00 | 3.00 | 0.110 |" in memory
    assert "- **train s**: seconds per training run: median step ms x `train.steps` / 1000" in memory
    assert "quality: eval_generate_accuracy (higher is better)" in md
    # zero-shot figures are not quality: not in the seeds table
    seeds_header = next(ln for ln in md.splitlines() if ln.startswith("| run | n | seeds | eval_"))
    assert "_initial" not in seeds_header and "eval_generate_accuracy" in seeds_header


# ---------------------------------------------------------------------------- the Pareto fronts
def test_pareto_front_of_accuracy_against_cost():
    # (cost, accuracy): higher accuracy is better, lower cost is better
    pts = [(3.0, 0.50), (6.0, 0.70), (4.0, 0.45), (9.0, 0.70), (1.0, 0.30), (5.0, 0.65)]
    assert report.pareto(pts, higher_better=True) == [0, 1, 4, 5]
    # the same points as a loss (lower is better): only the cheapest, lowest one
    assert report.pareto(pts, higher_better=False) == [4]


def test_time_axis_is_median_step_times_steps():
    df = pd.DataFrame({"train_step_ms_median": [100.0, 250.0, 80.0, None], "train_steps": [30, 0, None, 10]})
    assert report.train_seconds(df).tolist() == pytest.approx([3.0, math.nan, math.nan, math.nan], nan_ok=True)
    assert report.train_seconds(pd.DataFrame({"train_steps": [5]})).isna().all()


def test_both_pareto_plots_use_the_selected_quality_and_its_direction(tmp_path, monkeypatch):
    seen = []
    real = report.pareto
    monkeypatch.setattr(render, "pareto", lambda pts, higher: seen.append((pts, higher)) or real(pts, higher))
    recs = [
        llm("full", gen=0.70, step_ms=200.0),  # 47.7 MiB, 6 s
        llm("lora", rank=4, gen=0.60, step_ms=100.0),  # 15.3 MiB, 3 s
        llm("lora", rank=8, gen=0.50, step_ms=120.0),  # beaten by rank 4 on both axes
        llm("prefix", gen=0.55, step_ms=50.0, peak_memory_bytes=60_000_000),  # fastest, most memory
    ]
    md = build(tmp_path, *recs)
    assert "| full | 1 | 0 | 0.2000 → 0.7000 |" in md  # no seeds pooled: each row names its seed
    (mem, higher_mem), (time, higher_time) = seen
    assert higher_mem and higher_time  # accuracy: higher is better
    acc = [0.70, 0.60, 0.50, 0.55]  # the order of the rows: full, then by method and rank
    assert [q for _, q in mem] == acc and [q for _, q in time] == acc
    assert [t for t, _ in time] == pytest.approx([6.0, 3.0, 3.6, 1.5])  # s = ms x 30 / 1000
    assert report.pareto(mem, True) == [0, 1] and report.pareto(time, True) == [0, 1, 3]
    for name, title in (("pareto", "Quality against memory"), ("pareto-time", "Quality against training time")):
        png = tmp_path / "report" / f"smollm2-135m-instruction-amd-epyc-{name}.png"
        assert png.stat().st_size > 5000 and f"![{title}]({png.name})" in md


# ------------------------------------------------------------------------------ the noise
def test_a_single_generation_accuracy_uses_the_generated_examples(tmp_path):
    # 0.50 and 0.52 on 200 generated examples: se 0.0354 and 0.0353, noise 0.0500 > 0.02
    # (on the 1,000 eval examples the noise would be 0.0223; on 200 it is what counts)
    md = build(tmp_path / "gen", llm("lora", gen=0.50), llm("adapter", gen=0.52))
    assert "Within noise: adapter and lora differ in eval_generate_accuracy by 0.0200, less than the noise 0.0500" in md
    # accuracy by choice: the same 200 examples
    a, b = llm("lora", choice=0.50, eval_generate_accuracy=None), llm("adapter", choice=0.52)
    b["metrics"]["eval_generate_accuracy"] = None
    md = build(tmp_path / "choice", a, b)
    assert "differ in eval_choice_accuracy by 0.0200, less than the noise 0.0500" in md
    # far apart: nothing said
    assert "Within noise" not in build(tmp_path / "far", llm("lora", gen=0.30), llm("adapter", gen=0.60))


# ---------------------------------------------------------------------- older kinds unchanged
def test_records_of_the_older_kinds_report_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    report.build(["results/default"], tmp_path)
    for name in ("report.md", "records.csv", "latency.csv"):
        assert (tmp_path / name).read_text() == (REPO / "reports" / "default" / name).read_text(), name
    md = (tmp_path / "report.md").read_text()
    assert "before and after training" not in md and not list(tmp_path.glob("*pareto-time*"))
    # a classification record keeps its accuracy as quality, and gets no instruction tables
    cls = make_record("lora")
    cls["metrics"]["eval_accuracy"] = 0.8
    assert report.row(cls)["quality_metric"] == "eval_accuracy (higher is better)"
    assert "before and after training" not in build(tmp_path / "cls", cls, make_record("full"))
