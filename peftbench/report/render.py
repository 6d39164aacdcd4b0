"""From the report's numbers (``peftbench.report.aggregate``) to ``report.md`` and its PNG plots.

``page`` is the whole Markdown page: per (device, model, task) group of ok measured runs, the
main table (``TABLE``), the lever and distributed-run tables, the seeds table, the pairs within
noise, the rank studies, the instruction tables (``BEFORE_AFTER``, ``COST``) and the plots;
then the failed runs, the estimates and the skipped files. A plot is written as it is made,
and a file that cannot be written raises ``WriteError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from peftbench.compare import quality_direction  # noqa: E402
from peftbench.report.aggregate import (  # noqa: E402
    MiB,
    RankStudy,
    comparable_quality,
    estimates,
    failed_runs,
    has_instruction_metrics,
    latency_points,
    lever_rows,
    measured_groups,
    n_seeds,
    ordered,
    parallel_runs,
    pareto,
    pool_seeds,
    quality_columns,
    quality_spread,
    rank_studies,
    row_seeds,
    spreads,
    total_standard_error,
    train_seconds,
    within_noise,
)

BREAKDOWN = ("weights", "gradients", "optimizer", "activations")
# (column, header, scale, format) of the per-group Markdown table
TABLE = (
    ("label", "run", None, "{}"),
    ("trainable_params", "trainable params", None, "{:,.0f}"),
    ("trainable_percent", "trainable %", None, "{:.3f}"),
    ("trainable_vs_full", "vs full", None, "{:.4f}x"),
    ("peak_bytes", "peak train MiB", MiB, "{:,.1f}"),
    ("memory_vs_full", "vs full", None, "{:.2f}x"),
    ("train_tokens_per_s", "train tok/s", None, "{:,.0f}"),
    ("throughput_vs_full", "vs full", None, "{:.2f}x"),
    ("train_step_ms_median", "step ms (IQR)", None, "{:,.1f}"),
    ("inference_latency_ms", "latency ms", None, "{:,.2f}"),
    ("latency_vs_full", "vs full", None, "{:.2f}x"),
    ("inference_latency_unmerged_ms", "unmerged ms", None, "{:,.2f}"),
    ("decode_ms_per_token", "decode ms/token", None, "{:,.2f}"),
    ("checkpoint_bytes", "checkpoint MiB", MiB, "{:,.3f}"),
    ("quality", "quality", None, "{:.4f}"),
)
# (column, header, scale, format) of the estimates table
ESTIMATE_TABLE = (
    ("label", "method", None, "{}"),
    ("model", "model", None, "{}"),
    ("trainable_params", "trainable params", None, "{:,.0f}"),
    ("peak_memory_bytes", "estimated peak GiB", 2**30, "{:,.2f}"),
    ("memory_weights_bytes", "weights GiB", 2**30, "{:,.2f}"),
    ("memory_optimizer_bytes", "optimizer GiB", 2**30, "{:,.2f}"),
    ("checkpoint_bytes", "checkpoint MiB", MiB, "{:,.2f}"),
    ("train_flops_per_step", "train FLOP/step", None, "{:.3g}"),
)
# (metric, header, before -> after, what it is) of "Quality before and after training"
BEFORE_AFTER = (
    (
        "eval_generate_accuracy",
        "accuracy, generation",
        True,
        "share (0-1) of the first `task.num_generate` eval examples whose greedy answer (after "
        "`task.answer_rule`) equals the reference; zero-shot (as the run starts) → tuned",
    ),
    (
        "eval_choice_accuracy",
        "accuracy, choice",
        True,
        "share (0-1) of the same examples where the reference is the choice of highest "
        "log-likelihood; zero-shot → tuned",
    ),
    ("eval_loss", "eval loss", True, "mean cross-entropy per response token on the eval split (nats); before → after"),
    ("eval_perplexity", "perplexity", False, "exp(eval loss) after training (per response token)"),
    (
        "forgetting_kl",
        "forgetting KL",
        False,
        "mean per-token KL(base ‖ model) on general prompts the task never trains, after training "
        "(nats/token; 0: the base model's predictions)",
    ),
    (
        "forgetting_ce_delta",
        "CE delta",
        False,
        "those tokens' mean cross-entropy under the model minus under the base model, after training (nats/token)",
    ),
    (
        "skill_accuracy",
        "addition skill",
        True,
        "share (0-1) of `measure.skill_examples` one-digit addition questions answered right; before → after",
    ),
)
# (column, header, scale, format, what it is) of "Peak training memory, breakdown (MiB)"
COST = (
    ("label", "run", None, "{}", None),
    ("peak_bytes", "peak", MiB, "{:,.1f}", "live tensors at the peak of the first `measure.memory_steps` steps (MiB)"),
    ("memory_weights_bytes", "weights", MiB, "{:,.1f}", "parameters and buffers at that peak (MiB)"),
    ("memory_gradients_bytes", "gradients", MiB, "{:,.1f}", "`.grad` storages at that peak (MiB)"),
    ("memory_optimizer_bytes", "optimizer", MiB, "{:,.1f}", "AdamW state at that peak (MiB)"),
    ("memory_activations_bytes", "activations", MiB, "{:,.1f}", "the rest at that peak (MiB); the four sum to it"),
    ("train_tokens_per_s", "train tok/s", None, "{:,.0f}", "real (non-padding) tokens per second, median step"),
    ("train_seconds", "train s", None, "{:,.1f}", "seconds per training run: median step ms x `train.steps` / 1000"),
    ("inference_latency_ms", "latency ms", None, "{:,.2f}", "median forward ms, default point, merged (deployed)"),
    ("inference_latency_unmerged_ms", "unmerged ms", None, "{:,.2f}", "the same as trained (methods that merge)"),
    ("decode_ms_per_token", "decode ms/token", None, "{:,.2f}", "median ms per generated token, KV cache, deployed"),
    ("checkpoint_bytes", "checkpoint MiB", MiB, "{:,.3f}", "safetensors size of the trained parameters (MiB)"),
)
# (column, format, divisor) of the cost columns of a rank study
RANK_COST = (
    ("trainable_params", "{:,.0f}", 1),
    ("peak_bytes", "{:,.1f}", MiB),
    ("train_flops_per_step", "{:,.2f}", 1e9),
    ("train_tokens_per_s", "{:,.0f}", 1),
)
# the x axis of the quality-against-time plot: (column, divisor, label)
TIME_AXIS = ("train_seconds", 1.0, "training time per run, s (median step ms x train.steps / 1000)")
LEVER_HEAD = [
    "### What each lever buys (ratios against the same method in fp32)",
    "",
    "Peak training memory and its breakdown (MiB), and training throughput; `x fp32` divides by "
    "the run of the same method and settings with no lever pulled and the same effective batch.",
    "",
    "| method | lever | peak MiB | x fp32 | weights | gradients | optimizer | activations | tokens/s | x fp32 |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
PARALLEL_HEAD = [
    "### Distributed runs: one rank's memory and the bytes moved per step",
    "",
    "Memory in MiB of the rank with the highest peak; collectives in MiB per optimizer step (message "
    "sizes, measured; equal to the closed form); `sent/rank`: what one rank sends under ring "
    "algorithms; `in collectives`: median ms per step during which a collective was in flight on the "
    "rank longest in them (it overlaps compute, and includes waiting for a late rank), with its share "
    "of the step. `ranks`: nodes x ranks per node when there are several nodes. Step times of ranks "
    "that share fewer cores than there are ranks are not comparable.",
    "",
    "| method | parallel | ranks | peak | weights | gradients | optimizer | activations | all-reduce "
    "| all-gather | reduce-scatter | sent/rank | in collectives | final loss |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


class WriteError(Exception):
    """A report file that could not be written (one line: the path and the OS reason)."""


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """``path``, to write; an OSError while writing it becomes a ``WriteError`` naming it."""
    try:
        yield path
    except OSError as e:
        raise WriteError(f"{path}: {e.strerror or e}") from None


def slugify(*parts: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")[:80]


# ----------------------------------------------------------------------------------- page
def page(
    df: pd.DataFrame, recs: list[dict[str, Any]], skipped: list[tuple[str, str]], out: Path, sources: list[str]
) -> str:
    """The Markdown of ``report.md`` for the rows ``df`` of the records ``recs`` (read from
    ``sources``; ``skipped``: (file, why) of those that were not records); plots go to ``out``."""
    by_id = {r["run_id"]: r for r in recs}
    lines = [
        "# peftbench report",
        "",
        f"Records from {', '.join(f'`{s}`' for s in sources)}: {len(df)} loaded, {len(skipped)} file(s) skipped.",
        "",
        "Every figure is from the newest ok record of each config on each device. Ratios "
        "(`vs full`) divide by the full fine-tuning run of the same device, model and task. "
        "Times are medians; IQR in brackets or as error bars.",
        "",
    ]
    if df.empty:
        return "\n".join(lines + ["No records."])
    for (device, model, task), g in measured_groups(df):
        sets = list(dict.fromkeys(g["eval_set"].fillna("no quality figures")))
        if g["eval_set"].dropna().nunique() <= 1:  # runs without eval figures join the one set
            lines += group_section(g, by_id, out, f"{model} / {task} on {device}", slugify(model, task, device))
            continue
        for es in sets:  # figures from different splits or example sets are never side by side
            part = g[g["eval_set"].fillna("no quality figures") == es]
            lines += group_section(
                part, by_id, out, f"{model} / {task} on {device}, {es}", slugify(model, task, device, es)
            )
    lines += failed_section(failed_runs(df)) + estimates_section(estimates(df))
    if skipped:
        lines += ["## Skipped files", ""] + [f"- `{p}`: {why}" for p, why in skipped] + [""]
    return "\n".join(lines)


def group_section(g: pd.DataFrame, by_id: dict[str, dict[str, Any]], out: Path, heading: str, slug: str) -> list[str]:
    """One (device, model, task) group of ok measured runs: its tables, then its plots (written
    to ``out``, their file names starting with ``slug``)."""
    lines = [f"## {heading}", ""]
    if g["parallel_launcher"].any():
        lines += [
            "> Some of these timings were taken under a parallel launcher (jobs sharing the "
            "machine): compare them with care.",
            "",
        ]
    levers = lever_table(g, by_id) + parallel_table(g, by_id)  # every run, before seeds are pooled
    times = time_table(g)
    g = pool_seeds(ordered(g), by_id, before_after=[k for k, *_ in BEFORE_AFTER])
    lines += [md_table(g), ""] + levers + quality_notes(g)
    instruction = has_instruction_metrics(g)
    if instruction:
        g = g.assign(train_seconds=train_seconds(g))
        lines += instruction_tables(g, by_id)
    lines += times
    for title, name in group_plots(g, by_id, out, slug, instruction):
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return lines


# the phases of a run (``run.execute``) in the order they happen; a record may lack some
PHASES = (
    "load", "zero_shot", "train", "curve", "eval", "forgetting", "latency", "decode", "checkpoint", "writing", "other",
)  # fmt: skip


def time_table(g: pd.DataFrame) -> list[str]:
    """ "Where the time went": each run's wall seconds and, per phase, its seconds and share of
    them (runs whose records time their phases; a phase a run did not have is "-")."""
    timed = g[g["wall_s"].notna()] if "wall_s" in g else g.iloc[0:0]
    if timed.empty:
        return []
    present = [p for p in PHASES if f"phase_{p}_s" in timed and timed[f"phase_{p}_s"].notna().any()]
    lines = [
        "### Where the time went",
        "",
        "Wall seconds of each run and of each phase (share of the run's wall time); the phases "
        "sum to the wall time (`phase_s` in the record; `zero_shot`: the figures before training).",
        "",
        "| run | wall s | " + " | ".join(present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for _, r in timed.iterrows():
        cells = []
        for p in present:
            v = r[f"phase_{p}_s"]
            cells.append("-" if pd.isna(v) else f"{v:,.1f} ({100 * v / r['wall_s']:.0f}%)")
        lines.append(f"| {r['label']} | {r['wall_s']:,.1f} | " + " | ".join(cells) + " |")
    return lines + [""]


def quality_notes(g: pd.DataFrame) -> list[str]:
    """What goes under a group's main table: which metric its quality column is, the seeds
    table (when seeds were pooled), the rows within noise of each other and the rank studies."""
    lines = []
    if "quality_metric" in g and g["quality_metric"].notna().any():
        lines += [f"quality: {', '.join(sorted(g['quality_metric'].dropna().unique()))}", ""]
    if "spread" in g:
        lines += [
            "Runs that differ only in seed are one row: the mean of each figure over the seeds, "
            "quality as mean ± sample standard deviation (n seeds).",
            "",
            seeds_table(g),
            "",
        ]
    noise = [
        f"Within noise: {p.a} and {p.b} differ in {p.metric} by {p.diff:.4f}, "
        f"less than the noise {p.noise:.4f} (their standard errors combined), "
        "so this comparison cannot tell them apart."
        for p in within_noise(g)
    ]
    if noise:
        lines += noise + [""]
    for study in rank_studies(g):
        lines += rank_study_table(study)
    return lines


def failed_section(failed: pd.DataFrame) -> list[str]:
    if failed.empty:
        return []
    lines = ["## Failed runs (not plotted)", "", "| run | model | task | device | error |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['run_id']} | {r['model']} | {r['task']} | {r['device']} | {str(r['error']).replace('|', '/')} |"
        for _, r in failed.iterrows()
    ]
    return lines + [""]


def estimates_section(est: pd.DataFrame) -> list[str]:
    if est.empty:
        return []
    return ["## Estimates (computed, not measured)", "", md_table(est, ESTIMATE_TABLE), ""]


# --------------------------------------------------------------------------------- tables
def md_table(df: pd.DataFrame, cols: tuple = TABLE) -> str:
    """The rows of ``df`` as a Markdown table of the columns ``cols`` (column, header, scale,
    format, ...) that some row has; quality with its spread over seeds."""
    present = [c for c in cols if c[0] in df and df[c[0]].notna().any()]
    lines = ["| " + " | ".join(c[1] for c in present) + " |", "|" + "---|" * len(present)]
    for _, r in df.iterrows():
        cells = []
        for col, _, scale, fmt, *_ in present:
            v = r[col]
            if v is None or (isinstance(v, float) and pd.isna(v)):
                cells.append("-")
                continue
            text = fmt.format(v / scale if scale else v)
            if col == "train_step_ms_median" and pd.notna(r.get("train_step_ms_iqr")):
                text += f" ({r['train_step_ms_iqr']:,.1f})"
            spread = quality_spread(r) if col == "quality" else None
            if spread is not None and spread.n >= 2:
                text += f" ± {spread.std:.4f} (n={spread.n})"
            cells.append(text.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(r: pd.Series, key: str, n: int) -> Optional[str]:
    """Row ``r``'s ``key`` as mean ± sample std over seeds (with its n where it differs from the
    row's ``n``), a single run's value, or None."""
    sp = spreads(r).get(key)
    if sp is not None and sp.n >= 2:
        return f"{sp.mean:.4f} ± {sp.std:.4f}" + (f" (n={sp.n})" if sp.n != n else "")
    v = r.get(key)
    return None if v is None or pd.isna(v) else f"{v:.4f}"


def seeds_table(g: pd.DataFrame) -> str:
    """Every quality metric of the rows as mean ± sample std over seeds (a single run: its
    value), with the number of seeds and which."""
    metrics = quality_columns(g)
    lines = ["| run | n | seeds | " + " | ".join(metrics) + " |", "|" + "---|" * (3 + len(metrics))]
    for _, r in g.iterrows():
        n = n_seeds(r)
        cells = [str(r["label"]), str(n), str(r.get("seeds", "-"))]
        cells += [figure(r, k, n) or "-" for k in metrics]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def instruction_tables(g: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: "Quality before and after training" (``BEFORE_AFTER``) and "Peak
    training memory, breakdown (MiB)" (``COST``), each with one line per column under it."""
    cols = [c for c in BEFORE_AFTER if any(k in g and g[k].notna().any() for k in (c[0], f"{c[0]}_initial"))]
    head = [f"{h}{' (before → after)' if both else ''}" for _, h, both, _ in cols]
    lines = ["### Quality before and after training", ""]
    lines += ["| run | n | seeds | " + " | ".join(head) + " |", "|" + "---|" * (3 + len(cols))]
    for _, r in g.iterrows():
        n = n_seeds(r)
        cells = [str(r["label"]), str(n), str(row_seeds(r, by_id))]
        for key, _, both, _ in cols:
            after = figure(r, key, n) or "-"
            cells.append(f"{figure(r, f'{key}_initial', n) or '-'} → {after}" if both else after)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if "spread" in g:
        lines += ["", "Seeds pooled: mean ± sample standard deviation over the n seeds."]
    lines += [""] + [f"- **{h}**: {what}" for _, h, _, what in cols]
    present = [c for c in COST if c[0] in g and g[c[0]].notna().any()]
    lines += ["", "### Peak training memory, breakdown (MiB)", "", md_table(g, tuple(present)), ""]
    return lines + [f"- **{c[1]}**: {c[4]}" for c in present if c[4]] + [""]


def rank_study_table(study: RankStudy) -> list[str]:
    """Quality (mean ± sample std over seeds, and the total standard error) and cost (trainable
    parameters, peak training memory, training GFLOP per step, training tokens/s) against rank,
    and one sentence naming the smallest rank within noise of the best. Rows whose standard
    error is unknown are listed but not judged."""
    lines = [
        f"### Rank study: {study.method}",
        "",
        f"| rank | n | {study.metric} | total SE "
        "| trainable params | peak train MiB | train GFLOP/step | train tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [rank_row(r, study.se[i]) for i, r in study.rows.iterrows()]
    lines.append("")
    if study.best is None:
        return lines + ["No rank's quality has a known standard error, so none is judged.", ""]
    best, pick = study.best, study.close[0]  # the best itself is always within noise of itself
    return lines + [
        f"Best {study.metric}: rank {study.rank(best)} ({study.quality(best):.4f}). Smallest rank within noise "
        f"of the best: **rank {study.rank(pick)}** ({study.quality(pick):.4f}; the difference "
        f"{study.gap[pick]:.4f} is less than the noise {study.noise[pick]:.4f}, the two total standard errors "
        f"combined). Within noise of the best: rank {', '.join(str(study.rank(i)) for i in study.close)}.",
        "",
    ]


def rank_row(r: pd.Series, se: Optional[float]) -> str:
    """One rank of a rank study: rank, seeds, quality, its total standard error ``se``, costs."""
    spread = quality_spread(r)
    q = f"{spread.mean:.4f} ± {spread.std:.4f}" if spread is not None and spread.n >= 2 else f"{r['quality']:.4f}"
    cells = [str(int(r["method.rank"])), str(n_seeds(r)), q, "-" if se is None else f"{se:.4f}"]
    for col, fmt, scale in RANK_COST:
        cells.append("-" if pd.isna(r.get(col)) else fmt.format(r[col] / scale))
    return "| " + " | ".join(cells) + " |"


def mib(v: Any) -> str:
    """Bytes as MiB with two decimals; empty for a missing figure."""
    return "" if v is None or pd.isna(v) else f"{v / MiB:,.2f}"


def ratio(a: Any, b: Any) -> str:
    """a / b with two decimals; empty when either is missing or b is 0."""
    ok = a is not None and b is not None and pd.notna(a) and pd.notna(b) and b
    return f"{a / b:.2f}" if ok else ""


def lever_table(g: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Each lever's peak memory, its breakdown and training tokens/s as ratios against the same
    method and settings with no lever pulled (``aggregate.lever_rows``). Empty when the group
    holds no lever runs."""
    rows = lever_rows(g, by_id)
    if rows is None:
        return []
    lines = list(LEVER_HEAD)
    for name, r, ref in rows:
        cells = [str(r["label"]).split(" ")[0], name, mib(r.get("peak_memory_bytes"))]
        cells.append(ratio(r.get("peak_memory_bytes"), ref.get("peak_memory_bytes")))
        cells += [mib(r.get(f"memory_{c}_bytes")) for c in BREAKDOWN]
        tok = r.get("train_tokens_per_s")
        cells += ["" if tok is None or pd.isna(tok) else f"{tok:,.0f}", ratio(tok, ref.get("train_tokens_per_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def parallel_table(g: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Distributed runs (records with a ``parallel`` block): one rank's peak memory and its
    breakdown (the rank with the highest peak), the collectives' bytes per optimizer step as
    measured, what one rank sends under ring algorithms, the time in collectives per step (the
    rank longest in them; its share of the step) and the final training loss (equal across
    world sizes when the runs match). Empty when the group holds none."""
    runs = parallel_runs(g, by_id)
    if not runs:
        return []
    return PARALLEL_HEAD + [parallel_row(r, par, by_id[r["run_id"]]["metrics"]) for r, par in runs] + [""]


def parallel_row(r: pd.Series, par: dict[str, Any], m: dict[str, Any]) -> str:
    """One distributed run: row ``r``, its ``parallel`` block ``par`` and its metrics ``m``."""
    nodes = par.get("nnodes", 1)
    ranks = f"{nodes}x{par['world_size'] // nodes}" if nodes > 1 else str(par["world_size"])
    cells = [str(r["method"]), par["strategy"], ranks, mib(m.get("peak_memory_bytes"))]
    cells += [mib(m.get(f"memory_{c}_bytes")) for c in BREAKDOWN]
    cells += [mib(m.get(f"comm_{k}_bytes_per_step")) for k in ("all_reduce", "all_gather", "reduce_scatter")]
    cells.append(mib(m.get("comm_ring_bytes_sent_per_rank_per_step")))
    busy, share = m.get("comm_ms_per_step_median"), m.get("comm_share_of_step_median")
    cells.append("" if busy is None else f"{busy:,.1f} ms ({share:.0%})")
    loss = m.get("train_loss_final")
    cells.append("" if loss is None else f"{loss:.4f}")
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------------- plots
def group_plots(
    g: pd.DataFrame, by_id: dict[str, dict[str, Any]], out: Path, slug: str, instruction: bool
) -> list[tuple[str, str]]:
    """Every plot of one group, written to ``out``; (title, file) pairs. Quality against
    training time only for a group with instruction metrics."""
    plots = (
        plot_group(g, out, slug)
        + plot_latency(g, by_id, out, slug)
        + plot_ranks(g, out, slug)
        + plot_pareto(g, out, slug)
    )
    if instruction:
        plots += plot_pareto(g, out, slug, TIME_AXIS, "pareto-time", "Quality against training time")
    return plots


def _bar(ax: Any, labels_: list[str], values: list[float], **kw: Any) -> None:
    ax.bar(range(len(values)), values, **kw)
    ax.set_xticks(range(len(values)), labels_, rotation=30, ha="right", fontsize=8)


def _save(fig: Any, out: Path, name: str, made: list[tuple[str, str]], title: str) -> None:
    fig.tight_layout()
    with writing(out / name) as path:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append((title, name))


def plot_group(g: pd.DataFrame, out: Path, slug: str) -> list[tuple[str, str]]:
    """Trainable parameters, peak training memory by category and training throughput of one
    (device, model, task) group of ok measured runs; (title, file) pairs."""
    made: list[tuple[str, str]] = []
    g = ordered(g)
    if "trainable_params" in g and g["trainable_params"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _bar(ax, g["label"].tolist(), g["trainable_params"].tolist(), color="tab:blue")
        ax.set_yscale("log")
        ax.set_ylabel("trainable parameters (log)")
        _save(fig, out, f"{slug}-params.png", made, "Trainable parameters")
    if g["peak_bytes"].notna().any():
        plot_memory(g, out, slug, made)
    if "train_tokens_per_s" in g and g["train_tokens_per_s"].notna().any():
        plot_throughput(g, out, slug, made)
    return made


def plot_memory(g: pd.DataFrame, out: Path, slug: str, made: list[tuple[str, str]]) -> None:
    """Stacked bars of the memory breakdown (MiB), with the peak marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    cols = [f"memory_{c}_bytes" for c in BREAKDOWN if f"memory_{c}_bytes" in g]
    if cols:
        bottom = pd.Series(0.0, index=g.index)
        for c in cols:
            v = g[c].fillna(0) / MiB
            ax.bar(range(len(g)), v, bottom=bottom, label=c[7:-6])
            bottom += v
        ax.legend(fontsize=8)
    ax.scatter(range(len(g)), g["peak_bytes"] / MiB, marker="_", s=400, color="k", label="peak", zorder=3)
    ax.set_xticks(range(len(g)), g["label"].tolist(), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MiB at the training peak")
    _save(fig, out, f"{slug}-memory.png", made, "Peak training memory by category")


def plot_throughput(g: pd.DataFrame, out: Path, slug: str, made: list[tuple[str, str]]) -> None:
    """Training tokens/s (median) with the interquartile range as error bars."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    v = g["train_tokens_per_s"]
    err = None
    if "train_tokens_per_s_q25" in g:
        err = [
            (v - g["train_tokens_per_s_q25"]).fillna(0).clip(lower=0),
            (g["train_tokens_per_s_q75"] - v).fillna(0).clip(lower=0),
        ]
    _bar(ax, g["label"].tolist(), v.tolist(), yerr=err, capsize=4, color="tab:green")
    ax.set_ylabel("training tokens/s (median, IQR)")
    _save(fig, out, f"{slug}-throughput.png", made, "Training throughput")


def plot_latency(g: pd.DataFrame, by_id: dict[str, dict[str, Any]], out: Path, slug: str) -> list[tuple[str, str]]:
    """Latency against batch size and against length (deployed form solid, unmerged dashed),
    and merged against unmerged at the default point."""
    made: list[tuple[str, str]] = []
    pts = latency_points(g, by_id)
    if not pts.empty and (pts["batch"].nunique() > 1 or pts["length"].nunique() > 1):
        plot_latency_grid(pts, out, slug, made)
    mg = g[g["inference_latency_unmerged_ms"].notna()] if "inference_latency_unmerged_ms" in g else g.iloc[:0]
    if not mg.empty:
        plot_merged(mg, out, slug, made)
    return made


def plot_latency_grid(pts: pd.DataFrame, out: Path, slug: str, made: list[tuple[str, str]]) -> None:
    """Forward latency (ms) against batch size at the longest length, and against length at the
    largest batch; one line per run and form."""
    merging = set(pts.loc[pts["merged"], "label"])  # runs with a merged and an unmerged form
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, x, fixed in ((axes[0], "batch", "length"), (axes[1], "length", "batch")):
        at = pts[fixed].max()
        for (label, merged), s in pts[pts[fixed] == at].groupby(["label", "merged"]):
            unmerged = label in merging and not merged
            s = s.sort_values(x)
            ax.errorbar(
                s[x],
                s["median_ms"],
                yerr=s["iqr_ms"].fillna(0) / 2,
                capsize=3,
                marker="o",
                linestyle="--" if unmerged else "-",
                label=label + (" (unmerged)" if unmerged else ""),
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{x} ({fixed} = {at})")
        ax.set_ylabel("forward latency ms (median)")
    axes[1].legend(fontsize=7)
    _save(fig, out, f"{slug}-latency.png", made, "Inference latency against batch size and length")


def plot_merged(mg: pd.DataFrame, out: Path, slug: str, made: list[tuple[str, str]]) -> None:
    """Forward latency (ms) merged against unmerged, for the runs of methods that merge."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    pos = range(len(mg))

    def half_iqr(c: str) -> Any:
        return mg[c].fillna(0) / 2 if c in mg else None

    ax.bar(
        [i - 0.2 for i in pos],
        mg["inference_latency_ms"],
        0.4,
        yerr=half_iqr("inference_latency_iqr_ms"),
        label="merged",
    )
    ax.bar(
        [i + 0.2 for i in pos],
        mg["inference_latency_unmerged_ms"],
        0.4,
        yerr=half_iqr("inference_latency_unmerged_iqr_ms"),
        label="unmerged",
    )
    ax.set_xticks(list(pos), mg["label"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("forward latency ms (median, IQR)")
    ax.legend(fontsize=8)
    _save(fig, out, f"{slug}-merged.png", made, "Merged against unmerged")


def plot_ranks(g: pd.DataFrame, out: Path, slug: str) -> list[tuple[str, str]]:
    """Parameters, memory, quality (error bars: ``total_standard_error``) and throughput against
    rank, per method with several ranks."""
    made: list[tuple[str, str]] = []
    if "method.rank" not in g:
        return made
    for method, s in g[g["method.rank"].notna()].groupby("method"):
        if s["method.rank"].nunique() < 2:
            continue
        s = s.sort_values("method.rank")
        quality_name = (
            s["quality_metric"].dropna().iloc[0]
            if s.get("quality_metric") is not None and s["quality_metric"].notna().any()
            else "quality"
        )
        panels = [
            ("trainable_params", "trainable parameters"),
            ("peak_bytes", "peak MiB"),
            ("quality", quality_name),
            ("train_tokens_per_s", "training tokens/s"),
        ]
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
        for ax, (col, name) in zip(axes, panels):
            if col == "quality" and s[col].notna().any():  # with its total standard error (seeds and eval set)
                err = [total_standard_error(r) or 0.0 for _, r in s.iterrows()]
                ax.errorbar(s["method.rank"], s[col], yerr=err, marker="o", capsize=3)
            elif col in s and s[col].notna().any():
                ax.plot(s["method.rank"], s[col] / (MiB if col == "peak_bytes" else 1), marker="o")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank")
            ax.set_title(name, fontsize=9)
        _save(fig, out, f"{slug}-{method}-ranks.png", made, f"{method}: rank sweep")
    return made


def seed_std(r: pd.Series) -> float:
    """The standard deviation of a pooled row's quality over its seeds; 0 for one run."""
    spread = quality_spread(r)
    return spread.std if spread is not None and spread.n >= 2 else 0.0


def plot_pareto(
    g: pd.DataFrame,
    out: Path,
    slug: str,
    cost: tuple[str, float, str] = ("peak_bytes", MiB, "peak training MiB"),
    name: str = "pareto",
    title: str = "Quality against memory",
) -> list[tuple[str, str]]:
    """Quality against a cost (column, divisor, axis label; default peak training MiB), with
    the Pareto front in the quality's direction and, for a row that pools seeds, an error bar of
    the quality's standard deviation over them. Only the rows whose quality is the group's first
    metric in ``QUALITY_ORDER`` are compared."""
    made: list[tuple[str, str]] = []
    col, scale, xlabel = cost
    if "quality" not in g or col not in g:
        return made
    key, s = comparable_quality(g, col)
    if len(s) < 2:
        return made
    higher = quality_direction(cast(str, key)) == "higher"  # s holds rows of that metric: it is known
    pts = list(zip(s[col] / scale, s["quality"]))
    front = sorted(pareto(pts, higher))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:gray")
    std = [seed_std(r) for _, r in s.iterrows()]
    if any(e > 0 for e in std):
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=std,
            fmt="none",
            ecolor="tab:gray",
            capsize=3,
            label="± std over seeds",
        )
    fp = sorted(pts[i] for i in front)
    ax.plot([p[0] for p in fp], [p[1] for p in fp], color="tab:red", marker="o", label="Pareto front")
    for (x, y), label in zip(pts, s["label"]):
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(s["quality_metric"].iloc[0])
    ax.legend(fontsize=8)
    _save(fig, out, f"{slug}-{name}.png", made, title)
    return made
