"""Turn a folder of run records into a table (CSV) and a Markdown page with plots.

    python -m peftbench.report --results results/runs --out reports/latest

Writes ``records.csv`` (one row per record, every scalar metric), ``latency.csv`` (the latency
grids, long form), ``report.md`` and PNG plots. Runs are grouped by (device, model, task):
numbers of different devices or models never share a chart, and ratios against full
fine-tuning are taken within a group. Failed runs are listed, not plotted; estimates
(``kind: estimate``) get their own table. A file that is not a record is reported and skipped.
For several records of one config on one device, the newest ok one is shown. Records that
differ only in seed are one row of the Markdown tables (``pool_seeds``): the mean of every
figure, quality as mean ± sample standard deviation with n, and a sentence under the quality
table for two rows whose quality differs by less than the noise (``within_noise``);
``records.csv`` keeps one row per record.

The ``quality`` column is the first of ``QUALITY_ORDER`` a record has (accuracy by generation,
by choice, classification accuracy, eval loss). A group with instruction metrics (accuracy by
generation or choice) also gets "Quality before and after training", "Peak training memory,
breakdown (MiB)" and quality against training time (s per run) beside quality against memory.

Exit status: 0 written; 1 a write failed (the path and the OS reason, in one line); 2 unusable
input (a results path missing, or an ``--out`` that cannot be written, checked before any work).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from peftbench.compare import Spread, binomial_se, combined_se, quality_direction  # noqa: E402
from peftbench.records import reader as records  # noqa: E402

MiB = 2**20
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
# the ``quality`` column: the first of these metrics that a record has
QUALITY_ORDER = ("eval_generate_accuracy", "eval_choice_accuracy", "eval_accuracy", "eval_loss")
# the number of eval examples behind an accuracy (its binomial standard error); accuracy by
# choice is scored on the same first ``task.num_generate`` examples as accuracy by generation
EXAMPLES = {"eval_generate_accuracy": "eval_generate_examples", "eval_choice_accuracy": "eval_generate_examples"}
# a group whose records have one of these gets the two instruction tables and the time plot
INSTRUCTION = ("eval_generate_accuracy", "eval_choice_accuracy")
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
RATIOS = {
    "trainable_vs_full": "trainable_params",
    "memory_vs_full": "peak_bytes",
    "throughput_vs_full": "train_tokens_per_s",
    "latency_vs_full": "inference_latency_ms",
    "checkpoint_vs_full": "checkpoint_bytes",
}


class WriteError(Exception):
    """A report file that could not be written (one line: the path and the OS reason)."""


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """``path``, to write; an OSError while writing it becomes a ``WriteError`` naming it."""
    try:
        yield path
    except OSError as e:
        raise WriteError(f"{path}: {e.strerror or e}") from None


def unwritable(out: Path) -> Optional[str]:
    """Why the report cannot be written to folder ``out``, or None."""
    if out.exists() and not out.is_dir():
        return "exists and is not a folder"
    nearest = next(p for p in (out, *out.parents) if p.exists())
    if not nearest.is_dir():
        return f"cannot be created: {nearest} is not a folder"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"cannot be written: no permission to write in {nearest}"
    return None


# ---------------------------------------------------------------------------------- table
def row(rec: dict[str, Any]) -> dict[str, Any]:
    """One record as a flat row: identity, provenance, method settings, scalar metrics."""
    m = rec.get("metrics") or {}
    prov = rec.get("provenance") or {}
    out: dict[str, Any] = {
        "run_id": rec.get("run_id"),
        "kind": rec.get("kind", "measured"),
        "status": rec.get("status"),
        "error": rec.get("error"),
        "method": rec.get("method"),
        "model": rec.get("model"),
        "task": rec.get("task"),
        "device": records.recorded_device(rec),
        "device_type": records.recorded_device_type(rec),
        "config_hash": rec.get("config_hash"),
        "git_sha": (prov.get("git_sha") or "")[:10] or None,
        "timestamp": prov.get("timestamp"),
        "parallel_launcher": records.launched_in_parallel(rec),
        "train_steps": ((rec.get("config") or {}).get("train") or {}).get("steps"),
        "path": rec.get("_path"),
    }
    out.update({f"method.{k}": v for k, v in records.method_settings(rec).items() if k != "name"})
    out.update({k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None})
    out["peak_bytes"] = m.get("peak_memory_bytes")
    steps = rec.get("train_step_ms")
    if m.get("train_tokens_per_s") and m.get("train_tokens_per_s_iqr") is not None:
        half = m["train_tokens_per_s_iqr"] / 2
        out["train_tokens_per_s_q25"], out["train_tokens_per_s_q75"] = (
            m["train_tokens_per_s"] - half,
            m["train_tokens_per_s"] + half,
        )
    elif isinstance(steps, list) and len(steps) >= 2 and m.get("train_tokens_per_s"):
        # throughput quartiles from the per-step times (tokens per step taken as constant)
        q = pd.Series(steps, dtype=float).quantile([0.25, 0.75])
        scale = m["train_tokens_per_s"] * (m.get("train_step_ms_median") or q.mean())
        out["train_tokens_per_s_q25"], out["train_tokens_per_s_q75"] = scale / q[0.75], scale / q[0.25]
    key = next((k for k in QUALITY_ORDER if m.get(k) is not None), None)
    if key:
        out["quality"], out["quality_metric"] = m[key], f"{key} ({quality_direction(key)} is better)"
    return out


def frame(recs: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame([row(r) for r in recs])
    if df.empty:
        return df
    df["label"] = labels(df, recs)
    return add_ratios(df)


def labels(df: pd.DataFrame, recs: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> pd.Series:
    """The method, plus the config keys that tell its runs apart within their (device, model,
    task) group (``lora rank=4``, ``adapter variant=pfeiffer``, ``full train.lr=0.001``);
    ``recs[i]`` is the record of row ``i``, and keys starting with ``ignore`` are left out."""
    out = df["method"].astype(str).copy()
    configs = [records.flat(r.get("config") or {}) for r in recs]
    ignore = ("results_dir", "force", "method.name", *ignore)
    for _, g in df.groupby(["device", "model", "task", "method"], dropna=False):
        cfgs = {i: configs[i] for i in g.index}
        keys = sorted({k for c in cfgs.values() for k in c if not k.startswith(ignore)})
        varying = [k for k in keys if len({repr(c.get(k)) for c in cfgs.values()}) > 1]
        if "rank" in varying and "method.rank" in varying:
            varying.remove("rank")  # the interpolated top-level key behind method.rank
        for i, c in cfgs.items():
            extra = " ".join(f"{k.removeprefix('method.')}={c.get(k)}" for k in varying)
            out[i] = f"{out[i]} {extra}".strip()
    return out


def add_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Ratios against the full fine-tuning run of the same device, model and task."""
    df = df.copy()
    for col in RATIOS:
        df[col] = float("nan")
    ok = (df["status"] == "ok") & (df["kind"] == "measured")
    for _, g in df[ok].groupby(["device", "model", "task"], dropna=False):
        full = g[g["method"] == "full"]
        if full.empty:
            continue
        ref = full.sort_values("run_id").iloc[-1]
        for col, base in RATIOS.items():
            if base in g and pd.notna(ref.get(base)) and ref.get(base):
                df.loc[g.index, col] = g[base] / ref[base]
    return df


def newest_per_config(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("run_id").drop_duplicates(["config_hash", "device"], keep="last")


# ------------------------------------------------------------------------ seeds and noise
def pool_seeds(g: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The rows of one (device, model, task) group with the runs that differ only in seed
    (``records.seed_free_key``) pooled into one row each (``pooled``); labels, ratios and the
    order are then taken again, without the seed. A group where no two runs differ only in
    seed is returned as it is."""
    keys = g["run_id"].map(lambda i: records.seed_free_key(by_id[i]))
    if keys.nunique() == len(g):
        return g
    parts = [pooled(s, by_id) for _, s in g.groupby(keys, sort=False)]
    out = pd.concat(parts, ignore_index=True)
    out["label"] = labels(out, [by_id[i] for i in out["run_id"]], ignore=("seed",))
    return ordered(add_ratios(out))


def pooled(s: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row for the runs in ``s`` (one per seed, the newest if a seed has several): the
    newest run's identity (its run id names the row; the latency plots show its grid), the
    mean of every numeric column, ``seeds`` (the seeds, in order), ``n_seeds``, and ``spread``:
    {metric: ``Spread``} over the runs that have it, for every quality metric and every figure
    of ``BEFORE_AFTER`` (with its ``_initial``)."""
    s = s.assign(_seed=s["run_id"].map(lambda i: repr(records.run_seed(by_id[i]))))
    s = s.sort_values("run_id").drop_duplicates("_seed", keep="last").drop(columns="_seed")
    out = s.iloc[[-1]].copy()
    if len(s) == 1:
        return out.assign(seeds=str(records.run_seed(by_id[out["run_id"].iloc[0]])), n_seeds=1)
    for col in s.columns:
        if pd.api.types.is_numeric_dtype(s[col]) and not pd.api.types.is_bool_dtype(s[col]):
            out[col] = s[col].mean()
    out["parallel_launcher"] = bool(s["parallel_launcher"].any())
    runs = records.seed_groups(by_id[i] for i in s["run_id"])
    seeds = [records.run_seed(r) for rs in runs.values() for r in rs]
    out["seeds"] = ", ".join(str(x) for x in seeds)
    out["n_seeds"] = len(s)
    spread_keys = {k for k, *_ in BEFORE_AFTER} | {f"{k}_initial" for k, *_ in BEFORE_AFTER}
    names = {k for i in s["run_id"] for k in by_id[i].get("metrics") or {}}
    metrics = sorted(k for k in names if quality_direction(k) or k in spread_keys)
    spread = {k: Spread.of(s[k].dropna().tolist()) for k in metrics if k in s and s[k].notna().any()}
    out["spread"] = pd.Series([spread], index=out.index, dtype=object)
    return out


def quality_key(r: pd.Series) -> Optional[str]:
    """The metric behind the row's ``quality`` column (one of ``QUALITY_ORDER``)."""
    q = r.get("quality_metric")
    return q.split()[0] if isinstance(q, str) else None


def quality_spread(r: pd.Series) -> Optional[Spread]:
    """The spread of the row's quality over seeds, for a pooled row."""
    spread = r.get("spread")
    return spread.get(quality_key(r)) if isinstance(spread, dict) else None


def standard_error(r: pd.Series) -> Optional[float]:
    """The standard error of the row's quality: std / sqrt(n) over n >= 2 seeds; for a single
    accuracy with a known number of eval examples N (``EXAMPLES``: ``eval_generate_examples``
    for accuracy by generation or choice, else ``eval_examples``), the binomial
    sqrt(p (1 - p) / N); else None (unknown)."""
    spread = quality_spread(r)
    if spread is not None and spread.n >= 2:
        return spread.se
    key = quality_key(r)
    if key and key.endswith("_accuracy") and pd.notna(r.get("quality")):
        return binomial_se(float(r["quality"]), r.get(EXAMPLES.get(key, "eval_examples")))
    return None


def within_noise(g: pd.DataFrame) -> list[str]:
    """One sentence for each two rows whose quality (same metric) differs by less than the
    noise: both rows' standard errors combined, sqrt(se1^2 + se2^2). Rows whose standard
    error is unknown are not judged."""
    rows = [(r, standard_error(r)) for _, r in g.iterrows()]
    rows = [(r, se) for r, se in rows if se is not None and math.isfinite(se) and pd.notna(r.get("quality"))]
    out = []
    for i, (a, se_a) in enumerate(rows):
        for b, se_b in rows[i + 1 :]:
            if quality_key(a) != quality_key(b):
                continue
            diff, noise = abs(float(a["quality"]) - float(b["quality"])), combined_se(se_a, se_b)
            if diff < noise:
                out.append(
                    f"Within noise: {a['label']} and {b['label']} differ in {quality_key(a)} by {diff:.4f}, "
                    f"less than the noise {noise:.4f} (their standard errors combined), "
                    "so this comparison cannot tell them apart."
                )
    return out


def total_standard_error(r: pd.Series) -> Optional[float]:
    """The standard error of the row's quality counting both sources of noise, for judging one
    setting against another: the seeds' std / sqrt(n) (training randomness; 0 for a single run)
    and, for an accuracy, the finite eval set's binomial sqrt(p (1 - p) / N) (every seed is
    scored on the same N examples, so it does not shrink with n), combined as
    sqrt(se_seeds^2 + se_eval^2). None when neither is known."""
    spread = quality_spread(r)
    seeds = spread.se if spread is not None and spread.n >= 2 else None
    key = quality_key(r)
    evals = None
    if key and key.endswith("_accuracy") and pd.notna(r.get("quality")):
        evals = binomial_se(float(r["quality"]), r.get(EXAMPLES.get(key, "eval_examples")))
    parts = [x for x in (seeds, evals) if x is not None and math.isfinite(x)]
    return math.hypot(*parts) if parts else None


def rank_study(g: pd.DataFrame) -> list[str]:
    """For every method run at several ranks, one row per rank (seeds pooled) and nothing else
    varying: a table of quality (mean ± sample std over seeds, and the total standard error of
    ``total_standard_error``) and cost (trainable parameters, peak training memory, training
    GFLOP per step, training tokens/s) against rank, and one sentence naming the smallest rank
    within noise of the best: the smallest r whose quality differs from the best rank's by less
    than the two standard errors combined (sqrt(se_r^2 + se_best^2)). Rows whose standard
    error is unknown are listed but not judged."""
    if "method.rank" not in g or "quality" not in g:
        return []
    out: list[str] = []
    for method, s in g[g["method.rank"].notna() & g["quality"].notna()].groupby("method", sort=False):
        if s["method.rank"].nunique() < 2 or s["method.rank"].duplicated().any():
            continue
        s = s.sort_values("method.rank")
        key = quality_key(s.iloc[0])
        higher = quality_direction(key) != "lower"
        lines = [
            f"### Rank study: {method}",
            "",
            f"| rank | n | {key} | total SE | trainable params | peak train MiB | train GFLOP/step | train tok/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        ses = {i: total_standard_error(r) for i, r in s.iterrows()}
        for i, r in s.iterrows():
            spread = quality_spread(r)
            n = int(r["n_seeds"]) if pd.notna(r.get("n_seeds")) else 1
            q = (
                f"{spread.mean:.4f} ± {spread.std:.4f}"
                if spread is not None and spread.n >= 2
                else f"{r['quality']:.4f}"
            )
            cells = [str(int(r["method.rank"])), str(n), q, "-" if ses[i] is None else f"{ses[i]:.4f}"]
            for col, fmt, scale in RANK_COST:
                cells.append("-" if pd.isna(r.get(col)) else fmt.format(r[col] / scale))
            lines.append("| " + " | ".join(cells) + " |")
        judged = s[[ses[i] is not None for i in s.index]]
        lines.append("")
        if judged.empty:
            out += lines + ["No rank's quality has a known standard error, so none is judged.", ""]
            continue
        best = judged["quality"].idxmax() if higher else judged["quality"].idxmin()
        gap = {i: abs(float(judged.loc[i, "quality"]) - float(judged.loc[best, "quality"])) for i in judged.index}
        noise = {i: combined_se(ses[i], ses[best]) for i in judged.index}
        close = sorted((i for i in judged.index if gap[i] < noise[i]), key=lambda i: judged.loc[i, "method.rank"])
        pick = close[0]  # the best itself is always within noise of itself
        rank = {i: int(judged.loc[i, "method.rank"]) for i in judged.index}
        lines += [
            f"Best {key}: rank {rank[best]} ({float(judged.loc[best, 'quality']):.4f}). Smallest rank within noise "
            f"of the best: **rank {rank[pick]}** ({float(judged.loc[pick, 'quality']):.4f}; the difference "
            f"{gap[pick]:.4f} is less than the noise {noise[pick]:.4f}, the two total standard errors combined). "
            f"Within noise of the best: rank {', '.join(str(rank[i]) for i in close)}.",
            "",
        ]
        out += lines
    return out


def seeds_table(g: pd.DataFrame) -> str:
    """Every quality metric of the rows as mean ± sample std over seeds (a single run: its
    value), with the number of seeds and which. Figures taken before training (``_initial``)
    are not quality."""
    metrics = sorted(c for c in g.columns if quality_direction(c) and not c.endswith("_initial") and g[c].notna().any())
    lines = ["| run | n | seeds | " + " | ".join(metrics) + " |", "|" + "---|" * (3 + len(metrics))]
    for _, r in g.iterrows():
        spread = r.get("spread") if isinstance(r.get("spread"), dict) else {}
        n = int(r["n_seeds"]) if pd.notna(r.get("n_seeds")) else 1
        cells = [str(r["label"]), str(n), str(r.get("seeds", "-"))]
        for k in metrics:
            sp = spread.get(k)
            if sp is not None and sp.n >= 2:
                cells.append(f"{sp.mean:.4f} ± {sp.std:.4f}" + (f" (n={sp.n})" if sp.n != n else ""))
            else:
                cells.append("-" if pd.isna(r.get(k)) else f"{r[k]:.4f}")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plots
def _bar(ax: Any, labels_: list[str], values: list[float], **kw: Any) -> None:
    ax.bar(range(len(values)), values, **kw)
    ax.set_xticks(range(len(values)), labels_, rotation=30, ha="right", fontsize=8)


def _save(fig: Any, out: Path, name: str, made: list[tuple[str, str]], title: str) -> None:
    fig.tight_layout()
    with writing(out / name) as path:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append((title, name))


def ordered(g: pd.DataFrame) -> pd.DataFrame:
    """Full first, then by method, rank (numerically) and label."""
    keys = g.assign(_full=g["method"] != "full", _rank=g["method.rank"] if "method.rank" in g else 0)
    return g.loc[keys.sort_values(["_full", "method", "_rank", "label"]).index]


def plot_group(g: pd.DataFrame, out: Path, slug: str) -> list[tuple[str, str]]:
    """Every plot for one (device, model, task) group of ok measured runs; (title, file) pairs."""
    made: list[tuple[str, str]] = []
    g = ordered(g)
    lab = g["label"].tolist()
    if "trainable_params" in g and g["trainable_params"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _bar(ax, lab, g["trainable_params"].tolist(), color="tab:blue")
        ax.set_yscale("log")
        ax.set_ylabel("trainable parameters (log)")
        _save(fig, out, f"{slug}-params.png", made, "Trainable parameters")
    if g["peak_bytes"].notna().any():
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
        ax.set_xticks(range(len(g)), lab, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("MiB at the training peak")
        _save(fig, out, f"{slug}-memory.png", made, "Peak training memory by category")
    if "train_tokens_per_s" in g and g["train_tokens_per_s"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        v = g["train_tokens_per_s"]
        err = None
        if "train_tokens_per_s_q25" in g:
            err = [
                (v - g["train_tokens_per_s_q25"]).fillna(0).clip(lower=0),
                (g["train_tokens_per_s_q75"] - v).fillna(0).clip(lower=0),
            ]
        _bar(ax, lab, v.tolist(), yerr=err, capsize=4, color="tab:green")
        ax.set_ylabel("training tokens/s (median, IQR)")
        _save(fig, out, f"{slug}-throughput.png", made, "Training throughput")
    return made


def plot_latency(g: pd.DataFrame, recs: dict[str, dict], out: Path, slug: str) -> list[tuple[str, str]]:
    """Latency against batch size and against length (deployed form solid, unmerged dashed),
    and merged against unmerged at the default point."""
    made: list[tuple[str, str]] = []
    pts = pd.DataFrame(
        [{**p, "label": r["label"]} for _, r in g.iterrows() for p in records.latency_points(recs[r["run_id"]])]
    )
    if not pts.empty and (pts["batch"].nunique() > 1 or pts["length"].nunique() > 1):
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
    mg = g[g["inference_latency_unmerged_ms"].notna()] if "inference_latency_unmerged_ms" in g else g.iloc[:0]
    if not mg.empty:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = range(len(mg))
        iqr = lambda c: mg[c].fillna(0) / 2 if c in mg else None  # noqa: E731
        ax.bar(
            [i - 0.2 for i in x], mg["inference_latency_ms"], 0.4, yerr=iqr("inference_latency_iqr_ms"), label="merged"
        )
        ax.bar(
            [i + 0.2 for i in x],
            mg["inference_latency_unmerged_ms"],
            0.4,
            yerr=iqr("inference_latency_unmerged_iqr_ms"),
            label="unmerged",
        )
        ax.set_xticks(list(x), mg["label"], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("forward latency ms (median, IQR)")
        ax.legend(fontsize=8)
        _save(fig, out, f"{slug}-merged.png", made, "Merged against unmerged")
    return made


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
        panels = [
            ("trainable_params", "trainable parameters"),
            ("peak_bytes", "peak MiB"),
            (
                "quality",
                s["quality_metric"].dropna().iloc[0]
                if s.get("quality_metric") is not None and s["quality_metric"].notna().any()
                else "quality",
            ),
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


def pareto(points: list[tuple[float, float]], higher_better: bool) -> list[int]:
    """Indices of the points (memory, quality) that no other point beats on both."""
    front = []
    for i, (m, q) in enumerate(points):
        beaten = any((m2 <= m and (q2 >= q if higher_better else q2 <= q)) and (m2, q2) != (m, q) for m2, q2 in points)
        if not beaten:
            front.append(i)
    return front


def plot_pareto(
    g: pd.DataFrame,
    out: Path,
    slug: str,
    cost: tuple[str, float, str] = ("peak_bytes", MiB, "peak training MiB"),
    name: str = "pareto",
    title: str = "Quality against memory",
) -> list[tuple[str, str]]:
    """Quality against a cost (column, divisor, axis label; default peak training MiB), with
    the Pareto front in the quality's direction. Only the rows whose quality is the group's
    first metric in ``QUALITY_ORDER`` are compared."""
    made: list[tuple[str, str]] = []
    col, scale, xlabel = cost
    if "quality" not in g or col not in g:
        return made
    keys = pd.Series([quality_key(r) for _, r in g.iterrows()], index=g.index, dtype=object)
    key = next((k for k in QUALITY_ORDER if (keys == k).any()), None)
    s = g[(keys == key) & g[col].notna() & g["quality"].notna()]
    if len(s) < 2:
        return made
    higher = quality_direction(key) == "higher"
    pts = list(zip(s[col] / scale, s["quality"]))
    front = sorted(pareto(pts, higher))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:gray")
    fp = sorted(pts[i] for i in front)
    ax.plot([p[0] for p in fp], [p[1] for p in fp], color="tab:red", marker="o", label="Pareto front")
    for (x, y), label in zip(pts, s["label"]):
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(s["quality_metric"].iloc[0])
    ax.legend(fontsize=8)
    _save(fig, out, f"{slug}-{name}.png", made, title)
    return made


def train_seconds(g: pd.DataFrame) -> pd.Series:
    """Seconds per training run: median step ms x ``config.train.steps`` / 1000 (NaN without
    steps or a step time). Warm-up and memory-tracked steps are counted at the median too."""
    if "train_step_ms_median" not in g or "train_steps" not in g:
        return pd.Series(float("nan"), index=g.index)
    steps = pd.to_numeric(g["train_steps"], errors="coerce")
    return g["train_step_ms_median"] * steps.where(steps > 0) / 1000


# ------------------------------------------------------------------------------- markdown
def md_table(df: pd.DataFrame, cols: tuple = TABLE) -> str:
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
    spread = r.get("spread") if isinstance(r.get("spread"), dict) else {}
    sp = spread.get(key)
    if sp is not None and sp.n >= 2:
        return f"{sp.mean:.4f} ± {sp.std:.4f}" + (f" (n={sp.n})" if sp.n != n else "")
    v = r.get(key)
    return None if v is None or pd.isna(v) else f"{v:.4f}"


def instruction_tables(g: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: "Quality before and after training" (``BEFORE_AFTER``) and "Peak
    training memory, breakdown (MiB)" (``COST``), each with one line per column under it."""
    cols = [c for c in BEFORE_AFTER if any(k in g and g[k].notna().any() for k in (c[0], f"{c[0]}_initial"))]
    head = [f"{h}{' (before → after)' if both else ''}" for _, h, both, _ in cols]
    lines = ["### Quality before and after training", ""]
    lines += ["| run | n | seeds | " + " | ".join(head) + " |", "|" + "---|" * (3 + len(cols))]
    for _, r in g.iterrows():
        n = int(r["n_seeds"]) if pd.notna(r.get("n_seeds")) else 1
        seeds = r.get("seeds") if isinstance(r.get("seeds"), str) else records.run_seed(by_id[r["run_id"]])
        cells = [str(r["label"]), str(n), str(seeds)]
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


# ------------------------------------------------------------------------------- levers
# Config keys of the cost levers; a run's lever is named by those that differ from the default.
LEVER_KEYS = (
    "train.precision",
    "train.gradient_checkpointing",
    "train.grad_accum",
    "train.batch_size",
    "model.quantize",
)


def lever_name(cfg: dict[str, Any]) -> str:
    """``fp32`` for the reference setting, else the levers pulled (``bf16-mixed + checkpointing``)."""
    parts = []
    if cfg.get("train.precision", "fp32") != "fp32":
        parts.append(str(cfg["train.precision"]))
    if cfg.get("train.gradient_checkpointing"):
        parts.append("checkpointing")
    if (cfg.get("train.grad_accum") or 1) > 1:
        parts.append(f"accumulation {cfg['train.grad_accum']} x {cfg.get('train.batch_size')}")
    if cfg.get("model.quantize"):
        parts.append(f"{cfg['model.quantize']} base")
    return " + ".join(parts) or "fp32"


def lever_table(g: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Each lever's peak memory, its breakdown and training tokens/s as ratios against the same
    method and settings with no lever pulled (fp32, no checkpointing, no accumulation, dense
    base, the same effective batch). Empty when the group holds no lever runs."""
    rows = []
    for _, r in g.iterrows():
        cfg = records.flat(by_id[r["run_id"]].get("config") or {})
        effective = (cfg.get("train.batch_size") or 0) * (cfg.get("train.grad_accum") or 1)
        rest = {k: v for k, v in cfg.items() if k not in LEVER_KEYS and k not in ("results_dir", "force")}
        rows.append((repr(sorted(rest.items())), effective, lever_name(cfg), r))
    refs = {(k, e): r for k, e, name, r in rows if name == "fp32"}
    if all(name == "fp32" for _, _, name, _ in rows):
        return []
    lines = [
        "### What each lever buys (ratios against the same method in fp32)",
        "",
        "Peak training memory and its breakdown (MiB), and training throughput; `x fp32` divides by "
        "the run of the same method and settings with no lever pulled and the same effective batch.",
        "",
        "| method | lever | peak MiB | x fp32 | weights | gradients | optimizer | activations | tokens/s | x fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mib(v: Any) -> str:
        return "" if v is None or pd.isna(v) else f"{v / MiB:,.2f}"

    def ratio(a: Any, b: Any) -> str:
        ok = a is not None and b is not None and pd.notna(a) and pd.notna(b) and b
        return f"{a / b:.2f}" if ok else ""

    for key, effective, name, r in sorted(rows, key=lambda t: (str(t[3]["method"]), t[2] != "fp32", t[2])):
        ref = refs.get((key, effective))
        if ref is None and name != "fp32":
            continue
        cells = [str(r["label"]).split(" ")[0], name, mib(r.get("peak_memory_bytes"))]
        cells.append(ratio(r.get("peak_memory_bytes"), ref.get("peak_memory_bytes")))
        cells += [mib(r.get(f"memory_{c}_bytes")) for c in ("weights", "gradients", "optimizer", "activations")]
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
    rows = [(r, by_id[r["run_id"]]["parallel"]) for _, r in g.iterrows() if by_id[r["run_id"]].get("parallel")]
    if not rows:
        return []
    lines = [
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

    def mib(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v / MiB:,.2f}"

    for r, par in sorted(rows, key=lambda t: (str(t[0]["method"]), t[1]["strategy"], t[1]["world_size"])):
        m = by_id[r["run_id"]]["metrics"]
        nodes = par.get("nnodes", 1)
        ranks = f"{nodes}x{par['world_size'] // nodes}" if nodes > 1 else str(par["world_size"])
        cells = [str(r["method"]), par["strategy"], ranks, mib(m.get("peak_memory_bytes"))]
        cells += [mib(m.get(f"memory_{c}_bytes")) for c in ("weights", "gradients", "optimizer", "activations")]
        cells += [mib(m.get(f"comm_{k}_bytes_per_step")) for k in ("all_reduce", "all_gather", "reduce_scatter")]
        cells.append(mib(m.get("comm_ring_bytes_sent_per_rank_per_step")))
        busy, share = m.get("comm_ms_per_step_median"), m.get("comm_share_of_step_median")
        cells.append("" if busy is None else f"{busy:,.1f} ms ({share:.0%})")
        loss = m.get("train_loss_final")
        cells.append("" if loss is None else f"{loss:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def slugify(*parts: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")[:80]


def render(
    df: pd.DataFrame, recs: list[dict[str, Any]], skipped: list[tuple[str, str]], out: Path, sources: list[str]
) -> str:
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
    measured = df[(df["kind"] == "measured") & (df["status"] == "ok")]
    measured = newest_per_config(measured)
    for (device, model, task), g in measured.groupby(["device", "model", "task"], dropna=False):
        slug = slugify(model, task, device)
        lines += [f"## {model} / {task} on {device}", ""]
        if g["parallel_launcher"].any():
            lines += [
                "> Some of these timings were taken under a parallel launcher (jobs sharing the "
                "machine): compare them with care.",
                "",
            ]
        levers = lever_table(g, by_id) + parallel_table(g, by_id)
        g = pool_seeds(ordered(g), by_id)
        lines += [md_table(g), ""] + levers
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
        noise = within_noise(g)
        if noise:
            lines += noise + [""]
        lines += rank_study(g)
        instruction = any(k in g and g[k].notna().any() for k in INSTRUCTION)
        if instruction:
            g = g.assign(train_seconds=train_seconds(g))
            lines += instruction_tables(g, by_id)
        plots = (
            plot_group(g, out, slug)
            + plot_latency(g, by_id, out, slug)
            + plot_ranks(g, out, slug)
            + plot_pareto(g, out, slug)
        )
        if instruction:
            plots += plot_pareto(g, out, slug, TIME_AXIS, "pareto-time", "Quality against training time")
        for title, name in plots:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    failed = df[df["status"] != "ok"]
    if not failed.empty:
        lines += [
            "## Failed runs (not plotted)",
            "",
            "| run | model | task | device | error |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['run_id']} | {r['model']} | {r['task']} | {r['device']} | {str(r['error']).replace('|', '/')} |"
            for _, r in failed.iterrows()
        ]
        lines.append("")
    est = df[(df["kind"] == "estimate") & (df["status"] == "ok")]
    if not est.empty:
        cols = ("label", "model") + tuple(
            c
            for c in (
                ("trainable_params", "trainable params", None, "{:,.0f}"),
                ("peak_memory_bytes", "estimated peak GiB", 2**30, "{:,.2f}"),
                ("memory_weights_bytes", "weights GiB", 2**30, "{:,.2f}"),
                ("memory_optimizer_bytes", "optimizer GiB", 2**30, "{:,.2f}"),
                ("checkpoint_bytes", "checkpoint MiB", MiB, "{:,.2f}"),
                ("train_flops_per_step", "train FLOP/step", None, "{:.3g}"),
            )
        )
        cols = tuple(
            ("model", "model", None, "{}") if c == "model" else ("label", "method", None, "{}") if c == "label" else c
            for c in cols
        )
        lines += ["## Estimates (computed, not measured)", "", md_table(newest_per_config(est), cols), ""]
    if skipped:
        lines += ["## Skipped files", ""] + [f"- `{p}`: {why}" for p, why in skipped] + [""]
    return "\n".join(lines)


def build(sources: list[str], out: str | Path) -> Path:
    """Load, tabulate, plot and render; returns the path of ``report.md``."""
    loaded = records.load(sources)
    for path, why in loaded.skipped:
        print(f"peftbench.report: skipped {path}: {why}", file=sys.stderr)
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    df = frame(loaded.records)
    with writing(out / "records.csv") as path:
        df.to_csv(path, index=False)
    grid = [
        {
            "run_id": r["run_id"],
            "method": r["method"],
            "model": r["model"],
            "task": r["task"],
            "device": records.recorded_device(r),
            **p,
        }
        for r in loaded.records
        for p in records.latency_points(r)
    ]
    with writing(out / "latency.csv") as path:
        pd.DataFrame(grid).to_csv(path, index=False)
    text = render(df, loaded.records, loaded.skipped, out, [str(s) for s in sources])
    with writing(out / "report.md") as page:
        page.write_text(text + "\n")
    return page


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftbench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", nargs="+", default=["results/runs"], help="record folders or files")
    p.add_argument("--out", default="reports/latest", help="folder for report.md, CSVs and plots")
    a = p.parse_args(argv)
    why = unwritable(Path(a.out))
    if why:
        print(f"peftbench.report: error: --out={a.out}: {why}", file=sys.stderr)
        return 2
    try:
        page = build(a.results, a.out)
    except records.RecordError as e:
        print(f"peftbench.report: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"peftbench.report: error: {e}", file=sys.stderr)
        return 1
    print(f"peftbench.report: wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
