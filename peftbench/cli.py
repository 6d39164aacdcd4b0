"""The ``python -m peftbench`` entry point: check every job's config, then hand over to Hydra.

Hydra's own messages for a bad override span several lines; peftbench composes each job's
config first (expanding ``-m`` sweeps, including ``hydra.sweeper.params`` from a sweep
config) and turns any problem into one line: ``peftbench: error: <key>=<value>: <allowed>``.

Sweeps resume: a job whose config already has an ok record in its ``results_dir``, measured
with the same code (``peftbench.records.same_code``), is not run again (``force=true`` re-runs
it). After the launcher returns, the sweep's summary is read back from the records its jobs
wrote, so that it also covers jobs that ran in other processes (joblib, submitit).

Exit status: 0 every job ok (run or reused); 1 a job failed or left no record; 2 a config error
(nothing was run).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

from methods import ConfigError
from peftbench import config as config_mod
from peftbench.records import reader as records

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_CONFIG = 2
# Launchers that run several jobs of a sweep at once on one machine (timings share it).
PARALLEL_LAUNCHERS = ("JoblibLauncher", "LocalLauncher")
SWEEP_SIZE_ENV = "PEFTBENCH_SWEEP_JOBS"

config_mod.register_configs()


@dataclass(frozen=True)
class Job:
    """One job of a command: where its record goes and the hash that finds it again."""

    overrides: tuple[str, ...]
    results_dir: str  # absolute
    config_hash: str
    force: bool
    label: str


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines()[:1])


def explain(e: BaseException, overrides: list[str]) -> str:
    """One line for a composition or parse error: the override, and what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, OverrideParseException):
        return f"{e.override}: cannot parse this override ({_one_line(e.message)})"
    if isinstance(e, MissingConfigException):
        group = Path(e.missing_cfg_file or "").parent.as_posix()
        value = Path(e.missing_cfg_file or "").name
        allowed = ", ".join(sorted(o for o in (e.options or []) if not o.endswith("_schema")))
        return f"{group}={value}: no such option; allowed: {allowed}" if group else _one_line(str(e))
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or ""
        given = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), None)
        msg = _one_line(getattr(cause, "msg", None) or str(cause))
        if key:
            return f"{key}={given if given is not None else '?'}: {msg}"
        return msg
    return _one_line(str(e))


def _is_hydra_override(o: Any) -> bool:
    """``hydra/launcher=joblib``, ``hydra.launcher.n_jobs=2``: they configure Hydra, not a job."""
    key = o.get_key_element().lstrip("+~")
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def job_overrides(overrides: list[str], multirun: bool, config_name: str = "config") -> list[list[str]]:
    """The override list of every job a command would launch (one for a single run)."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    if not multirun:
        return [overrides]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    primary = compose(config_name, overrides=fixed, return_hydra_config=True)
    params = primary.hydra.sweeper.get("params") or {}
    by_key: dict[str, list[str]] = {}
    # the sweep config's params first, so that the command line wins for a key in both
    for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()]) + parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            by_key[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            by_key[key] = [o.input_line]
    return [list(combo) for combo in itertools.product(*by_key.values())]


def check_jobs(argv: list[str], check: Callable[[Any, list[str]], Any], config_name: str = "config",
               prog: str = "peftbench") -> int | list[Any]:
    """Compose every job of a command line and pass it to ``check(cfg, overrides)``; the list of
    what ``check`` returned if all are valid, else print one line and return 2."""
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    GlobalHydra.instance().clear()
    planned: list[Any] = []
    current = overrides
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name=prog):
            for job in job_overrides(overrides, multirun, config_name):
                current = job
                planned.append(check(compose(config_name, overrides=job), job))
    except Exception as e:  # every composition problem becomes one line
        print(f"{prog}: error: {explain(e, current)}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        GlobalHydra.instance().clear()
    return planned


def plan_job(cfg: Any, overrides: list[str]) -> Job:
    from peftbench.records import config_hash

    chash = config_hash(config_mod.to_container(cfg))
    label = f"{cfg.method.name}/{cfg.model.name}/{cfg.task.name}"
    return Job(tuple(overrides), str(Path(cfg.results_dir).resolve()), chash, bool(cfg.force), label)


def check_all(argv: list[str]) -> int | list[Job]:
    """Compose and check every job; the jobs if all are valid, else print one line and return 2."""

    def check(cfg: Any, job: list[str]) -> Job:
        dry_run(cfg)
        return plan_job(cfg, job)

    return check_jobs(argv, check)


def dry_run(cfg: Any) -> None:
    """Check the values, then apply the method to the model's structure on the meta device, so
    that a setting the model cannot take (a LoRA target it lacks) fails before any real work."""
    import methods
    from peftbench import models, tasks

    config_mod.check(cfg)
    tasks.check(cfg.task)
    num_labels = 2 if cfg.task.kind == "classification" else 0
    meta = models.build_meta(cfg.model, cfg.task.kind, cfg.task.vocab_size, num_labels)
    method = methods.build(cfg.method)
    method.apply(meta)
    check_context(cfg, method, meta.config)


def check_context(cfg: Any, method: Any, model_config: Any) -> None:
    """Inputs plus the positions a method takes itself (prefix tuning's virtual tokens) must fit
    in the model's context; otherwise the run would fail half-way."""
    from peftbench import models

    context = models.context_length(model_config)
    taken = getattr(method, "context_tokens", 0)
    if not context:
        return
    m = cfg.measure
    needs = {
        "task.max_length": cfg.task.max_length,
        "measure.latency_length": m.latency_length,
        "measure.latency_grid_lengths": max(m.latency_grid_lengths),
    }
    if cfg.task.kind == "causal-lm" and m.decode_tokens:
        needs["measure.latency_length"] = max(m.latency_length, m.latency_length + m.decode_tokens + 1)
    key, longest = max(needs.items(), key=lambda kv: kv[1])
    if taken + longest > context:
        extra = f" plus the {taken} positions that method={cfg.method.name} takes" if taken else ""
        raise ConfigError(f"{key}={longest}: {longest} tokens{extra} exceed the model's context of {context}; "
                          f"allowed: at most {context - taken}")


# ----------------------------------------------------------------------------- the job
def launcher_info() -> dict[str, Any]:
    """How this job was launched: the launcher's class, and whether other jobs of the same sweep
    may run on this machine at the same time (then its timings are shared-machine timings)."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return {"name": "single", "parallel": False}
    name = str(hc.launcher.get("_target_", "")).rsplit(".", 1)[-1] or "unknown"
    sweep_jobs = int(os.environ.get(SWEEP_SIZE_ENV, "0") or 0)
    parallel = name in PARALLEL_LAUNCHERS and sweep_jobs != 1
    if name == "JoblibLauncher":
        parallel = parallel and hc.launcher.get("n_jobs", -1) != 1
    return {"name": name, "parallel": parallel, "sweep_jobs": sweep_jobs or None}


def reuse(cfg: Any, chash: str, now: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The record to reuse instead of running this job, or None (and say why when it matters)."""
    if cfg.force:
        return None
    try:
        rec, why = records.reusable(cfg.results_dir, chash, now)
    except OSError as e:  # an unreadable results folder: run rather than fail
        print(f"peftbench: cannot look for earlier records ({e}); running", file=sys.stderr)
        return None
    if rec is None and why != "no ok record yet":
        print(f"peftbench: config {chash}: {why}; running it again")
    return rec


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def hydra_entry(cfg: Any) -> None:
    from peftbench.records import writer as record
    from peftbench.run import run
    from peftbench.summary import print_summary

    chash = record.config_hash(config_mod.to_container(cfg))
    now = records.code_state()
    old = reuse(cfg, chash, now)
    if old is not None:
        print(f"peftbench: reusing {old['_path']} (ok record of config {chash}, same code; force=true re-runs)")
        print_summary(old, Path(old["_path"]))
        return
    # what only the launching side knows: the code's fingerprint (for resume) and the launcher
    rec, path = run(cfg, {**now, "launcher": launcher_info()})
    print_summary(rec, path)


# ------------------------------------------------------------------------- sweep summary
def outcome(job: Job, since: str, now: dict[str, Any]) -> tuple[str, Optional[dict[str, Any]]]:
    """What became of ``job``: ok, reused, failed or missing, with its record."""
    found = records.by_hash(job.results_dir, job.config_hash)
    fresh = records.newest(r for r in found if records.stamp(r) >= since)
    if fresh is not None:
        return ("ok" if fresh.get("status") == "ok" else "failed"), fresh
    if not job.force:
        old, _ = records.reusable(job.results_dir, job.config_hash, now)
        if old is not None:
            return "reused", old
    return "missing", None


def summarize(jobs: list[Job], since: str) -> int:
    """Print one line per job that did not end ok, and a count; 1 if any failed or is missing."""
    now = records.code_state()
    seen: set[tuple[str, str]] = set()
    counts = {"ok": 0, "reused": 0, "failed": 0, "missing": 0}
    lines = []
    for job in jobs:
        if (job.results_dir, job.config_hash) in seen:
            continue
        seen.add((job.results_dir, job.config_hash))
        state, rec = outcome(job, since, now)
        counts[state] += 1
        if state == "failed":
            lines.append(f"  failed   {job.label} [{job.config_hash}]: {rec.get('error')}  ({rec['_path']})")
        elif state == "missing":
            lines.append(f"  missing  {job.label} [{job.config_hash}]: no record written (the job process died: "
                         f"killed, out of memory, or a launcher error); overrides: {' '.join(job.overrides)}")
    total = sum(counts.values())
    print(f"peftbench: sweep of {total} job(s): {counts['ok']} ran ok, {counts['reused']} reused, "
          f"{counts['failed']} failed, {counts['missing']} without a record", file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    return 1 if counts["failed"] or counts["missing"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    informational = any(a.startswith(("--help", "-h", "--cfg", "-c", "--info", "--hydra-help", "--shell-completion"))
                        for a in argv)
    jobs: list[Job] = []
    if not informational:
        checked = check_all(argv)
        if isinstance(checked, int):
            return checked
        jobs = checked
    multirun = any(a in ("-m", "--multirun") for a in argv)
    since = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    os.environ[SWEEP_SIZE_ENV] = str(len(jobs))
    sys.argv = [sys.argv[0], *argv]
    hydra_entry()
    if informational:
        return 0
    if multirun:
        return summarize(jobs, since)
    state, rec = outcome(jobs[0], since, records.code_state())
    return 0 if state in ("ok", "reused") else 1
