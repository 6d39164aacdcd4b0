"""Which jobs a tuned comparison runs, and the learning rate it selects from its trials' records.

A comparison has three folders under its ``results_dir``: ``trials`` (one record per method and
rate, on the validation split), ``selection`` (one JSON file per method: the rates tried, their
validation figures, the one chosen and whether it sits at an edge of the grid), ``final`` (one
record per method and seed at the chosen rate, on the test split). The trials and finals are
ordinary runs of ``python -m peftbench``, so a re-run reuses every record that exists (same
config, same code) and runs only what is missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, cast

from omegaconf import DictConfig

from peftbench import app
from peftbench import config as config_mod
from peftbench.compare import quality_direction
from peftbench.errors import ConfigError
from peftbench.records import reader, writer

TRIALS, SELECTION, FINAL = "trials", "selection", "final"
# An Optuna search's best rate this close to an end of its range, as a share of the range on a
# log scale, is flagged at the edge (a grid's, only at its lowest or highest rate).
EDGE_SHARE = 0.1
# Run overrides a search sets itself, per job: refused on the command line.
SET_BY_SEARCH = ("method", "train.lr", "seed", "results_dir")
SELECTION_KIND = reader.SELECTION_KIND


@dataclass(frozen=True)
class Args:
    """A command line split: the search's settings (``tune.`` dropped), the run overrides of
    every job, and those of the trials only (``tune.trial.<key>=``) and of the finals only
    (``tune.final.<key>=``)."""

    tune: list[str]
    run: list[str]
    trial: list[str]
    final: list[str]


def split_args(argv: list[str]) -> Args:
    """``tune.<key>=`` arguments configure the search, ``tune.trial.<run key>=`` and
    ``tune.final.<run key>=`` override a run key in the trials or the finals alone; the others are
    run overrides for every job (flags such as ``-m`` are the search's own, so refused)."""
    tune: list[str] = []
    run: list[str] = []
    stage: dict[str, list[str]] = {"trial": [], "final": []}
    for a in argv:
        head = next((k for k in stage if a.startswith(f"tune.{k}.")), None)
        if head is not None:
            stage[head].append(a[len(f"tune.{head}.") :])
            continue
        if a.startswith("-"):
            raise ConfigError(
                f"{a}: flags are not taken (the search runs its own sweeps); allowed: key=value overrides"
            )
        if a.startswith("tune."):
            tune.append(a[len("tune.") :])
            continue
        key = a.split("=", 1)[0].lstrip("+~")
        if key in SET_BY_SEARCH and key != "results_dir":
            raise ConfigError(
                f"{key}={a.split('=', 1)[-1]}: set by the search; use tune.methods (method), "
                "tune.grid (train.lr) or tune.seeds (seed)"
            )
        if key == "results_dir":
            tune.append(a)
            continue
        run.append(a)
    return Args(tune, run, stage["trial"], stage["final"])


def merged(defaults: list[str], given: list[str]) -> list[str]:
    """``defaults`` with each key that ``given`` sets replaced by its value there, then the rest of
    ``given``, in order."""
    keys = {g.split("=", 1)[0] for g in given}
    return [d for d in defaults if d.split("=", 1)[0] not in keys] + list(given)


def compose_tune(args: Args) -> DictConfig:
    """The search's settings (``conf/tune.yaml``, ``config.TuneConfig``) with the command line's
    trial and final overrides merged into ``trial`` and ``final``, checked."""
    t = app.compose(*args.tune, config_name="tune")
    t.trial = merged(list(t.trial), args.trial)
    t.final = merged(list(t.final), args.final)
    config_mod.check_tune(t)
    return t


def default_lr(run: list[str], method: str) -> float:
    """The learning rate ``method`` runs at by default with these run overrides (``method.lr``)."""
    lr = config_mod.learning_rate(app.compose(*run, f"method={method}"))
    if lr is None or not lr > 0:
        raise ConfigError(f"method={method}: has no default learning rate (method.lr); allowed: a method with one")
    return float(lr)


def check_splits(run: list[str]) -> None:
    """The task reads its splits from data (``task.path``): a generated task has no validation
    and test data apart, so a rate chosen on it would be reported on the same data."""
    task = app.compose(*run).task
    if task.get("path") is None:
        raise ConfigError(
            f"task={task.name}: generates its data, so its validation and test splits are the same "
            "examples; allowed: a task on data files with validation and test splits (task.path)"
        )


def rates(default: float, grid: list[float]) -> list[float]:
    """The learning rates tried: ``default`` times each multiple of ``grid``, to 3 significant
    digits, ascending."""
    return sorted(float(f"{default * g:.3g}") for g in grid)


def lr_text(lr: float) -> str:
    return f"{lr:.3g}"


def trial_overrides(t: DictConfig, run: list[str], method: str, lr: float) -> list[str]:
    """The overrides of one trial: the run's, the method, the rate, the first seed, the trial's."""
    return [
        *run,
        f"method={method}",
        f"train.lr={lr_text(lr)}",
        f"seed={t.seeds[0]}",
        *t.trial,
        f"results_dir={Path(t.results_dir) / TRIALS}",
    ]


def final_overrides(t: DictConfig, run: list[str], method: str, lr: float, seed: int) -> list[str]:
    """The overrides of one final run at the chosen rate."""
    return [
        *run,
        f"method={method}",
        f"train.lr={lr_text(lr)}",
        f"seed={seed}",
        *t.final,
        f"results_dir={Path(t.results_dir) / FINAL}",
    ]


def search_range(default: float, grid: list[float]) -> tuple[float, float]:
    """The lowest and highest rate a search may try: ``default`` times the grid's ends."""
    return default * min(grid), default * max(grid)


def n_trials(t: DictConfig) -> int:
    """How many trials a method gets: ``tune.trials``, else as many as the grid has rates."""
    return int(t.trials) if t.get("trials") is not None else len(t.grid)


def optuna_sweep(t: DictConfig, run: list[str], method: str, default: float) -> list[str]:
    """The ``-m`` command line of one method's Optuna trials: Hydra's Optuna sweeper with a TPE
    sampler seeded by the first seed (random for the first half of the trials, then guided by
    them), the rate log-uniform over ``search_range``, one trial at a time, each job returning
    ``tune.objective`` to the sweeper. Deterministic given the trials' figures, so a re-run
    asks for the same rates and reuses their records."""
    lo, hi = search_range(default, list(t.grid))
    n = n_trials(t)
    goal = "minimize" if direction(t.objective) == "lower" else "maximize"
    return [
        "-m",
        *run,
        f"method={method}",
        f"train.lr=tag(log,interval({lo!r},{hi!r}))",
        f"seed={t.seeds[0]}",
        *t.trial,
        f"results_dir={Path(t.results_dir) / TRIALS}",
        f"objective={t.objective}",
        "hydra/sweeper=optuna",
        f"hydra.sweeper.n_trials={n}",
        "hydra.sweeper.n_jobs=1",
        f"hydra.sweeper.direction={goal}",
        f"hydra.sweeper.study_name={method}",
        f"hydra.sweeper.sampler.seed={t.seeds[0]}",
        f"hydra.sweeper.sampler.n_startup_trials={max(1, n // 2)}",
    ]


def tried_of(jobs: list[app.Job]) -> list[tuple[float, Optional[dict[str, Any]]]]:
    """The rate and newest record (None if it left none) of each job of a sweep, by rate."""
    out = []
    for j in jobs:
        lr = app.given_value("train.lr", list(j.overrides))
        assert lr is not None, j.overrides
        out.append((float(lr), reader.newest(reader.by_hash(j.results_dir, j.config_hash))))
    return sorted(out, key=lambda x: x[0])


def sweep(jobs: list[list[str]]) -> list[str]:
    """One ``-m`` command line running every job of ``jobs`` (they differ in one key at most,
    whose values are joined with commas)."""
    first = jobs[0]
    varying = [i for i in range(len(first)) if len({j[i] for j in jobs}) > 1]
    if len(varying) > 1 or any(len(j) != len(first) for j in jobs):
        raise ValueError("jobs that differ in more than one override")
    if not varying:
        return ["-m", *first]
    i = varying[0]
    key = first[i].split("=", 1)[0]
    return ["-m", *first[:i], f"{key}={','.join(j[i].split('=', 1)[1] for j in jobs)}", *first[i + 1 :]]


def config_hash(overrides: list[str]) -> str:
    """The config hash of the run ``overrides`` describe (how its record is found again)."""
    return app.plan_job(app.compose(*overrides), overrides).config_hash


def record_of(overrides: list[str]) -> Optional[dict[str, Any]]:
    """The newest record (ok or failed) of the run ``overrides`` describe, or None."""
    cfg = app.compose(*overrides)
    chash = app.plan_job(cfg, overrides).config_hash
    return reader.newest(reader.by_hash(cfg.results_dir, chash))


def direction(objective: str) -> str:
    """ "lower" or "higher": which value of ``objective`` is better."""
    d = quality_direction(objective)
    assert d is not None, objective
    return d


def select(
    t: DictConfig, method: str, default: float, tried: list[tuple[float, Optional[dict[str, Any]]]]
) -> dict[str, Any]:
    """The selection record of ``method`` from its trials (rate, record or None): the rate of the
    best finite validation ``objective``; ``at_edge`` says when that is the lowest or highest
    rate of the grid, or for an Optuna search within ``EDGE_SHARE`` of an end of its range (the
    optimum may lie outside it: widen the grid)."""
    lower = direction(t.objective) == "lower"
    rows = []
    for lr, rec in tried:
        value = (rec or {}).get("metrics", {}).get(t.objective) if rec and rec.get("status") == "ok" else None
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        rows.append(
            {
                "lr": lr,
                "objective": value if ok else None,
                "status": "missing" if rec is None else rec.get("status"),
                "error": None if rec is None else rec.get("error"),
                "run_id": None if rec is None else rec.get("run_id"),
                "eval_split": None if rec is None else rec.get("config", {}).get("task", {}).get("eval_split"),
            }
        )
    scored = [r for r in rows if r["objective"] is not None]
    best = (min if lower else max)(scored, key=lambda r: float(cast(float, r["objective"]))) if scored else None
    lrs = [lr for lr, _ in tried]
    lo, hi = search_range(default, list(t.grid))
    edge = None
    search = t.get("search", "grid")
    if best is not None and search == "grid" and len(lrs) > 1:
        edge = "lowest" if best["lr"] == min(lrs) else "highest" if best["lr"] == max(lrs) else None
    elif best is not None and search != "grid":
        place = math.log(float(cast(float, best["lr"])) / lo) / math.log(hi / lo)
        edge = "lowest" if place <= EDGE_SHARE else "highest" if place >= 1 - EDGE_SHARE else None
    return {
        "kind": SELECTION_KIND,
        "method": method,
        "objective": t.objective,
        "direction": direction(t.objective),
        "split": "validation",
        "default_lr": default,
        "grid": list(t.grid),
        "search": search,
        "range": [lo, hi],
        "trials": rows,
        "selected_lr": None if best is None else best["lr"],
        "selected_run_id": None if best is None else best["run_id"],
        "selected_objective": None if best is None else best["objective"],
        "at_edge": edge,
        "seeds": list(t.seeds),
        "code": reader.code_state(),
    }


def selection_path(results_dir: str, method: str) -> Path:
    return Path(results_dir) / SELECTION / f"{method}.json"


def write_selection(results_dir: str, sel: dict[str, Any]) -> Path:
    """The selection record of one method, written atomically."""
    path = selection_path(results_dir, sel["method"])
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.replace_atomically(path, json.dumps(sel, indent=2, sort_keys=True) + "\n")
    return path


def read_selections(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every selection record under ``<results_dir>/selection``, by method name."""
    folder = Path(results_dir) / SELECTION
    found = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [s for s in found if s.get("kind") == SELECTION_KIND]
