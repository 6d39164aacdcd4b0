"""``python -m peftbench.tune``: every method at its own tuned learning rate, in one command.

    python -m peftbench.tune model=smollm2-135m task=sentiment tune.methods=[full,lora,adapter,prefix]

For each method of ``tune.methods``, one after another:

1. trials: the method at each rate of ``tune.grid`` (multiples of its default), seed
   ``tune.seeds[0]``, with ``tune.trial``'s overrides (the validation split, the quality-only
   profile), one ``python -m peftbench -m`` sweep into ``<results_dir>/trials``; with
   ``tune.search=optuna``, ``tune.trials`` rates chosen by Hydra's Optuna sweeper between the
   grid's ends instead;
2. selection: the rate of the best validation ``tune.objective`` among the trials' records,
   written to ``<results_dir>/selection/<method>.json``; a best rate at an edge of the grid is
   flagged ("widen the grid");
3. finals: the method at the chosen rate with every seed of ``tune.seeds`` and ``tune.final``'s
   overrides (all of the test split, every measurement), into ``<results_dir>/final``.

Then the tuned comparison is printed (``peftbench.report.tuned``): each method's rate, its test
quality over seeds and the paired comparison with the best. Every other argument is a run
override applied to every job (model, task, levers, ``hydra/launcher=``);
``tune.trial.<key>=`` and ``tune.final.<key>=`` override a run key in the trials or the finals
alone (``tune.trial.train.steps=20``: shorter trials). Every job is checked
before any runs; the sweeps resume (a job with an ok record of the same config and code is
reused), so an interrupted comparison is finished by running the same command again.

Exit status: 0 every job ok; 1 a job failed or left no record, or a method had no usable trial;
2 a config error (nothing was run); 130 a Ctrl-C (the running job wrote nothing, no other started).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from omegaconf import DictConfig

from peftbench import app, cli
from peftbench.errors import failure
from peftbench.report import tuned
from peftbench.tune import plan

PROG = "peftbench.tune"


def main(argv: Optional[list[str]] = None) -> int:
    """The command (``compare_methods``); a Ctrl-C outside a sweep ends it in one line too."""
    try:
        return compare_methods(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted (Ctrl-C); the same command runs what is left, reusing what was saved", file=sys.stderr
        )
        return app.EXIT_INTERRUPTED


def compare_methods(argv: list[str]) -> int:
    """Check every job, then for each method its trials, selection and finals; the exit status."""
    try:
        args = plan.split_args(argv)
        t = plan.compose_tune(args)
        defaults = {m: plan.default_lr(args.run, m) for m in t.methods}
        plan.check_splits(args.run)
    except Exception as e:  # one line, as every command
        print(f"{PROG}: error: {app.explain(e, argv)}", file=sys.stderr)
        return app.EXIT_CONFIG
    grids = {m: plan.rates(defaults[m], list(t.grid)) for m in t.methods}
    if t.search == "optuna":  # the rates are chosen as the search goes: check the range's ends
        grids = {m: list(plan.search_range(defaults[m], list(t.grid))) for m in t.methods}
    for m in t.methods:  # every sweep checked before anything runs
        for jobs in (
            [plan.trial_overrides(t, args.run, m, lr) for lr in grids[m]],
            [plan.final_overrides(t, args.run, m, defaults[m], s) for s in t.seeds],
        ):
            checked = app.check_jobs(cli.APP, plan.sweep(jobs))
            if isinstance(checked, int):
                return checked
    failed = False
    for m in t.methods:
        status, tried = trials(t, args.run, m, defaults[m], grids[m])
        if status in (app.EXIT_CONFIG, app.EXIT_INTERRUPTED):  # a Ctrl-C stops the whole comparison
            return status
        failed |= status != app.EXIT_OK
        sel = plan.select(t, m, defaults[m], tried)
        try:
            path = plan.write_selection(t.results_dir, sel)
        except OSError as e:
            print(f"{PROG}: cannot write the selection of {m} ({failure(e)})", file=sys.stderr)
            return app.EXIT_FAILED
        print(f"{PROG}: {tuned.selection_line(sel)}  ({path})", file=sys.stderr)
        if sel["selected_lr"] is None:
            failed = True
            continue
        finals = [plan.final_overrides(t, args.run, m, sel["selected_lr"], s) for s in t.seeds]
        status = app.main(cli.APP, plan.sweep(finals))
        if status == app.EXIT_INTERRUPTED:
            return status
        failed |= status != app.EXIT_OK
    print(tuned.text(tuned.load(t.results_dir)))
    return app.EXIT_FAILED if failed else app.EXIT_OK


def trials(
    t: DictConfig, run: list[str], method: str, default: float, lrs: list[float]
) -> tuple[int, list[tuple[float, Optional[dict[str, Any]]]]]:
    """Run one method's trials (the grid's rates, or an Optuna search between ``lrs``' ends);
    the sweep's exit status and each trial's rate with its record."""
    if t.search == "optuna":
        print(
            f"{PROG}: {method}: {plan.n_trials(t)} Optuna (TPE) trials, lr log-uniform in "
            f"[{plan.lr_text(lrs[0])}, {plan.lr_text(lrs[-1])}] (default {plan.lr_text(default)})",
            file=sys.stderr,
        )
        status, jobs = app.sweep(cli.APP, plan.optuna_sweep(t, run, method, default))
        return status, plan.tried_of(jobs)
    print(
        f"{PROG}: {method}: trials at lr {', '.join(map(plan.lr_text, lrs))} (default {plan.lr_text(default)})",
        file=sys.stderr,
    )
    grid = [plan.trial_overrides(t, run, method, lr) for lr in lrs]
    status = app.main(cli.APP, plan.sweep(grid))
    return status, [(lr, plan.record_of(o)) for lr, o in zip(lrs, grid)]
