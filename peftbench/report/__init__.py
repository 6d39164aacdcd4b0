"""The report: a folder of run records as ``records.csv``, ``latency.csv`` and ``report.md``
with PNG plots (``python -m peftbench.report``; what it writes: ``peftbench.report.command``).

- ``aggregate``: records to pandas frames and plain data (one row per record, labels, ratios
  against full fine-tuning, seeds pooled, standard errors, rank studies, lever rows).
- ``render``: those frames as Markdown tables and sentences, and matplotlib plots.
- ``command``: ``build`` (load, write the CSVs, render the page) and ``main`` (the command line).
"""

from peftbench.report.aggregate import frame, pareto, row, standard_error, total_standard_error, train_seconds
from peftbench.report.command import build, main
from peftbench.report.render import WriteError

__all__ = [
    "WriteError",
    "build",
    "frame",
    "main",
    "pareto",
    "row",
    "standard_error",
    "total_standard_error",
    "train_seconds",
]
