"""The report's "History of the gated figures" (``--history FILE``, written by
``python -m peftbench.history``): each gated figure against the commits its entries measured,
exact figures and timings apart, and the commits where a figure changed named.

Plots (PNG): for exact figures and for quality, each figure that changed at least once, as its
ratio to its first value, one line per run and metric; for timings, each run's median training
step as its ratio to its first value. The table below them lists every change of every gated
figure (``history.changes``), timings included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from peftbench import history  # noqa: E402
from peftbench.report.render import writing  # noqa: E402

TITLES = {"exact": "Exact figures", "quality": "Quality", "timing": "Timings"}


def commit_label(e: dict[str, Any]) -> str:
    """A short x-axis label for entry ``e``: its commit and date."""
    return f"{str(e.get('commit') or '?')[:7]}\n{str(e.get('date') or '')[:10]}"


def ratios(values: list[Optional[float]]) -> list[Optional[float]]:
    """Each value over the first present non-zero one (None where missing)."""
    first = next((v for v in values if v), None)
    return [None if v is None or first is None else v / first for v in values]


def plot(entries: list[dict[str, Any]], which: str, lines: list[tuple[str, str]], out: Path, name: str) -> str:
    """One plot of ``lines`` ((run, metric) pairs) of kind ``which`` against the entries; its file name."""
    data = history.series(entries)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    xs = list(range(len(entries)))
    for run, metric in lines:
        ys = ratios(data[(run, metric)])
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{run} {metric}")
    ax.set_xticks(xs, [commit_label(e) for e in entries], fontsize=7)
    ax.set_ylabel("value / its first value")
    ax.set_title(f"{TITLES[which]} against the commits", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(lines) // 24)
    fig.tight_layout()
    with writing(out / name) as path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def section(entries: list[dict[str, Any]], out: Path, source: str) -> list[str]:
    """The Markdown of the history section, its plots written to ``out``."""
    lines = [
        "## History of the gated figures",
        "",
        f"From `{source}`: {len(entries)} entries (gate runs and committed baselines), oldest first. "
        "Exact figures and quality plot only where they changed; timings always. A timing counts as "
        f"changed beyond a ratio of 1 ± {history.TIMING_STEP:g} (shared machines are noisy).",
        "",
    ]
    if not entries:
        return lines + ["No entries.", ""]
    found = history.changes(entries)
    for which in history.KINDS:
        if which == "timing":
            chosen = sorted(k for k in history.series(entries) if k[1] == "train_step_ms_median")
        else:
            chosen = sorted({(c["run"], c["metric"]) for c in found if c["kind"] == which})
        if not chosen or len(entries) < 2:
            continue
        name = plot(entries, which, chosen, out, f"history-{which}.png")
        lines += [f"### {TITLES[which]} against the commits", "", f"![{TITLES[which]}]({name})", ""]
    if found:
        lines += ["### Where a figure changed", "", "| commit | run | figure | kind | before | after |"]
        lines += ["|---|---|---|---|---|---|"]
        for c in found:
            lines.append(
                f"| {str(c['from_commit'])[:7]} → {str(c['to_commit'])[:7]} | {c['run']} | {c['metric']} | "
                f"{c['kind']} | {c['from']:.6g} | {c['to']:.6g} |"
            )
        lines.append("")
    else:
        lines += ["No figure changed.", ""]
    return lines
