"""Turn a folder of run records into a table (CSV) and a Markdown page with plots.

    python -m peftbench.report --results results/runs --out reports/latest

Writes ``records.csv`` (one row per record, every scalar metric), ``latency.csv`` (the latency
grids, long form), ``report.md`` with PNG plots, and ``report.html`` (``peftbench.report.html``:
the same report as one self-contained page, opened offline, with a sortable, filterable records
table and a Pareto view over any two figures). ``--history FILE`` adds the gate's figures
against the commits (``peftbench.report.trend``). Runs are grouped by (device, model, task):
numbers of different devices or models never share a chart, and ratios against full
fine-tuning are taken within a group. Failed runs are listed, not plotted; estimates
(``kind: estimate``) get their own table. A file that is not a record is reported and skipped.
For several records of one config on one device, the newest ok one is shown. Records that
differ only in seed are one row of the Markdown tables (``aggregate.pool_seeds``): the mean of every
figure, quality as mean ± sample standard deviation with n, and a sentence under the quality
table for two rows whose quality differs by less than the noise (``aggregate.within_noise``);
``records.csv`` keeps one row per record.

The ``quality`` column is the first of ``aggregate.QUALITY_ORDER`` a record has (accuracy by generation,
by choice, classification accuracy, eval loss). A group with instruction metrics (accuracy by
generation or choice) also gets "Quality before and after training", "Peak training memory,
breakdown (MiB)" and quality against training time (s per run) beside quality against memory.

Exit status: 0 written; 1 a write failed (the path and the OS reason, in one line); 2 unusable
input (a results path missing, or an ``--out`` that cannot be written, checked before any work).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from peftbench import history
from peftbench.records import reader as records
from peftbench.report import aggregate, html, render, trend, tuned
from peftbench.report.render import WriteError, writing


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


def build(sources: list[str], out: str | Path, history_file: Optional[str] = None) -> Path:
    """Load, tabulate, plot and render; returns the path of ``report.md``. ``history_file``: a
    history of the gate's figures (``peftbench.history``) to plot against the commits."""
    tuned_roots = [Path(s) for s in sources if (Path(s) / tuned.SELECTION).is_dir()]
    # a tuned comparison's folder: its general tables from the finals (test split) alone
    loaded = records.load([str(Path(s) / tuned.FINAL) if Path(s) in tuned_roots else s for s in sources])
    for skipped, why in loaded.skipped:
        print(f"peftbench.report: skipped {skipped}: {why}", file=sys.stderr)
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    df = aggregate.frame(loaded.records)
    with writing(out / "records.csv") as path:
        df.to_csv(path, index=False)
    with writing(out / "latency.csv") as path:
        aggregate.latency_frame(loaded.records).to_csv(path, index=False)
    text = render.page(df, loaded.records, loaded.skipped, out, [str(s) for s in sources])
    if tuned_roots:  # the tuned comparison leads, under the title
        title, _, rest = text.partition("\n")
        sections = [line for root in tuned_roots for line in tuned.markdown(tuned.load(root), out)]
        text = "\n".join([title, "", *sections, rest])
    if history_file is not None:
        text += "\n" + "\n".join(trend.section(history.read(history_file), out, history_file))
    with writing(out / "report.md") as page:
        page.write_text(text + "\n")
    with writing(out / "report.html") as path:
        path.write_text(html.page(df, loaded.records, text, out))
    return page


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftbench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", nargs="+", default=["results/runs"], help="record folders or files")
    p.add_argument("--out", default="reports/latest", help="folder for report.md, CSVs and plots")
    p.add_argument("--history", help="a history of the gate's figures (python -m peftbench.history) to plot")
    a = p.parse_args(argv)
    why = unwritable(Path(a.out))
    if why:
        print(f"peftbench.report: error: --out={a.out}: {why}", file=sys.stderr)
        return 2
    if a.history is not None:  # read before any work: a bad file writes nothing
        try:
            history.read(a.history)
        except (OSError, ValueError) as e:
            print(
                f"peftbench.report: error: --history={a.history}: {getattr(e, 'strerror', None) or e}", file=sys.stderr
            )
            return 2
    try:
        page = build(a.results, a.out, a.history)
    except records.RecordError as e:
        print(f"peftbench.report: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"peftbench.report: error: {e}", file=sys.stderr)
        return 1
    print(f"peftbench.report: wrote {page}")
    return 0
