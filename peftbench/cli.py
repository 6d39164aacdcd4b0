"""``python -m peftbench``: fine-tune and measure, one record per job (``peftbench.run``).

The app layer (``peftbench.app``) composes and checks every job first (expanding ``-m`` sweeps),
runs them through Hydra's launcher, and reads the outcome back from the records. This module
says what is particular to this command: the check of a config (values, then a dry run of the
method on the model's structure on the meta device), and resume: a job whose config already has
an ok record in its ``results_dir``, measured with the same code, is not run again
(``force=true`` re-runs it).

Exit status: 0 every job ok (run or reused); 1 a job failed or left no record; 2 a config error
(nothing was run).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from peftbench import app, run
from peftbench import config as config_mod
from peftbench.summary import print_summary

CONF_DIR = app.CONF_DIR
EXIT_CONFIG = app.EXIT_CONFIG


def dry_run(cfg: Any) -> None:
    """Check the values, then apply the method to the model's structure on the meta device, so
    that a setting the model cannot take (a LoRA target it lacks, an input longer than the
    context) fails before any real work. The meta build is the real build's config builder."""
    import methods
    from peftbench import models, tasks

    config_mod.check(cfg)
    tasks.check(cfg.task)
    n = tasks.num_train_examples(cfg.task)
    config_mod.require(
        n is None or cfg.train.steps == 0 or cfg.train.batch_size <= n,
        "train.batch_size",
        cfg.train.batch_size,
        f"larger than the {n} training examples; allowed: at most {n}",
    )
    meta = models.build_meta(cfg.model, cfg.task.kind, models.tokens_in_use(cfg.model, cfg.task.vocab_size))
    method = methods.build(cfg.method)
    method.apply(meta)
    config_mod.check_context(cfg, method, meta.config)


APP = app.App(
    prog="peftbench",
    config_name="config",
    check=dry_run,
    new_record=run.new_record,
    execute=run.execute,
    print_record=print_summary,
    resume=True,
)


def check_all(argv: list[str]) -> int | list[app.Job]:
    """Compose and check every job; the jobs if all are valid, else print one line and return 2."""
    return app.check_jobs(APP, argv)


def summarize(jobs: list[app.Job], since: str) -> int:
    return app.summarize(APP, jobs, since)


def main(argv: Optional[list[str]] = None) -> int:
    return app.main(APP, sys.argv[1:] if argv is None else argv)


def checked_config(*overrides: str) -> Any:
    """The config ``python -m peftbench <overrides>`` would run, checked as the CLI checks it
    (for benchmarks and scripts that call ``peftbench.run.run`` themselves)."""
    cfg = app.compose(*overrides)
    dry_run(cfg)
    return cfg
