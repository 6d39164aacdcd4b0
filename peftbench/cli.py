"""``python -m peftbench``: fine-tune and measure, one record per job (``peftbench.run``).

The app layer (``peftbench.app``) composes and checks every job first (expanding ``-m`` sweeps),
runs them through Hydra's launcher, and reads the outcome back from the records. This module
wires what is particular to this command: its check (``launch.check_job``: the values, then a
dry run of the method on the model's structure on the meta device, then where the ranks run),
its job (``launch.execute``: the run in this process, or its ranks started), and resume: a job
whose config already has an ok record in its ``results_dir``, measured with the same code, is
not run again (``force=true`` re-runs it).

Exit status: 0 every job ok (run or reused); 1 a job failed or left no record; 2 a config error
(nothing was run).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from peftbench import app, launch, run
from peftbench.summary import print_summary

APP = app.App(
    prog="peftbench",
    config_name="config",
    check=launch.check_job,
    new_record=run.new_record,
    execute=launch.execute,
    print_record=print_summary,
    resume=True,
)


def main(argv: Optional[list[str]] = None) -> int:
    return app.main(APP, sys.argv[1:] if argv is None else argv)


def checked_config(*overrides: str) -> DictConfig:
    """The config ``python -m peftbench <overrides>`` would run, checked as the command checks it
    (for benchmarks and scripts that call ``run_and_write`` or ``peftbench.run`` themselves)."""
    cfg = app.compose(*overrides)
    APP.check(cfg)
    return cfg


def run_and_write(
    cfg: DictConfig, extra_provenance: Optional[dict[str, Any]] = None
) -> tuple[dict[str, Any], Optional[Path]]:
    """Execute one run of a composed config as the command does and write its record, ok or
    failed; returns the record and its path (None for a node whose record another node writes)."""
    return app.run_job(APP, cfg, extra_provenance)
