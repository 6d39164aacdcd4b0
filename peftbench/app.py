"""The app layer under every command (``python -m peftbench``, ``python -m peftbench.estimate``).

A command is an ``App``: a Hydra config name plus three hooks (check a composed config, make a
new record, fill it in). Everything else is here, once:

1. compose every job of the command line (``-m`` sweeps expanded, sweep configs included) and
   check it, before anything runs; a problem is one line ``<prog>: error: <key>=<value>:
   <allowed>`` and exit status 2 (``check_jobs``);
2. hand the jobs to Hydra's launcher (basic, joblib, submitit). Each job creates its record,
   runs, and writes the record atomically, ok or failed (``run_job``); a job whose config has
   an ok record made with the same code is reused instead (``App.resume``);
3. read what every job left on disk, print the summary, and return the exit status from those
   records: 0 all ok, 1 a job failed or left no record (``outcome``, ``summarize``).

Jobs may run in other processes, so nothing is passed back in memory: the records on disk
are the only channel. A launcher that fails (a killed joblib worker, a submitit job that died)
does not take the sweep down: the jobs it never started run here, one after another, and the
ones it lost are named in the summary.
"""

from __future__ import annotations

import _thread
import datetime as dt
import importlib.metadata
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
import transformers
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.errors import MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException
from packaging.requirements import Requirement

from peftbench import config as config_mod
from peftbench.compare import quality_direction
from peftbench.errors import ConfigError, RecordElsewhere, failure, one_line  # noqa: F401 (re-exported)
from peftbench.records import config_hash, reader, writer

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXIT_INTERRUPTED = 130  # a user's Ctrl-C (128 + SIGINT, as shells report it)
# Flags that ask Hydra for information (help, the composed config) and run no job.
INFORMATIONAL = ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help", "--shell-completion")
# Launchers that run several jobs of a sweep at once on one machine (timings share it).
PARALLEL_LAUNCHERS = ("JoblibLauncher", "LocalLauncher")
SWEEP_SIZE_ENV = "PEFTBENCH_SWEEP_JOBS"
# Hydra sweepers that list their jobs before launching them: the command checks every job first.
# Any other (the Optuna sweeper) chooses each job from the results of the earlier ones: the
# command checks the ends of each range it searches, and learns the jobs that ran from the
# ledger each job leaves in its results folder (``ledger_file``).
LISTING_SWEEPERS = ("BasicSweeper",)
STAMP = "%Y%m%dT%H%M%S%f"  # sortable UTC time, as a run id begins
# The class name of the Hydra launcher the command hands its jobs to ("single" without -m), for
# the checks that depend on where jobs will run (a run across nodes finding its node).
LAUNCHER_ENV = "PEFTBENCH_LAUNCHER"


def share_file(results_dir: str, chash: str) -> Path:
    """Where a node without the record says how its share of the job of config ``chash``
    ended (one JSON object: status, note, stamp; not a record, so no reader lists it)."""
    return Path(results_dir) / f".share-{chash}-{os.uname().nodename}-{os.getpid()}.json.share"


@dataclass(frozen=True)
class App:
    """One command.

    check(cfg): raise ``ConfigError`` for a config that cannot run (including a dry run on
    meta). new_record(cfg): the record a job starts with. execute(cfg, rec): do the work, filling
    ``rec`` (raise on failure). print_record(rec, path): what a job prints when it ends.
    report(recs): what the command prints after all jobs, from the records read back.
    resume: reuse an ok record of the same config and code instead of running. renamed: keys
    the command no longer takes, each with the key that replaced it (refused in one line).
    """

    prog: str
    config_name: str
    check: Callable[[Any], None]
    new_record: Callable[[Any], dict[str, Any]]
    execute: Callable[[Any, dict[str, Any]], None]
    print_record: Callable[[dict[str, Any], Path], None]
    report: Callable[[list[dict[str, Any]]], None] = lambda recs: None
    resume: bool = False
    renamed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One job of a command: where its record goes and the hash that finds it again."""

    overrides: tuple[str, ...]
    results_dir: str  # absolute
    config_hash: str
    force: bool
    label: str


# ------------------------------------------------------------------------------- compose
def compose(*overrides: str, config_name: str = "config") -> Any:
    """The config ``python -m peftbench <overrides>`` (or the estimator, by ``config_name``) would
    run, composed as Hydra composes it; no job runs. Used by the CLI, the tests and benchmarks."""
    config_mod.register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return hydra_compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def given_value(key: str, overrides: list[str]) -> Optional[str]:
    """The value the command line gave ``key``: the last one, as Hydra uses the last."""
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+~") == key]
    return values[-1] if values else None


def explain(e: BaseException, overrides: list[str]) -> str:
    """One line for a composition or parse error: the override, and what is allowed."""
    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, OverrideParseException):
        return f"{e.override}: cannot parse this override ({one_line(e.message)})"
    if isinstance(e, MissingConfigException):
        group = Path(e.missing_cfg_file or "").parent.as_posix()
        value = Path(e.missing_cfg_file or "").name
        allowed = ", ".join(sorted(o for o in (e.options or []) if not o.endswith("_schema")))
        return f"{group}={value}: no such option; allowed: {allowed}" if group else one_line(e)
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if not isinstance(cause, OmegaConfBaseException):
        return one_line(e)
    key = getattr(cause, "full_key", None) or ""
    msg = one_line(str(getattr(cause, "msg", None) or cause).splitlines()[0])
    given = given_value(key, overrides) if key else None
    if given is None and isinstance(cause, InterpolationResolutionError):
        given = next((o.split("=", 1)[1] for o in reversed(overrides) if "${" in o), None)
        key = key or next((o.split("=", 1)[0].lstrip("+~") for o in reversed(overrides) if "${" in o), "")
        msg = f"{msg}; allowed: an interpolation of an existing key, e.g. ${{rank}}"
    if key:
        return f"{key}={given if given is not None else '(from the config files)'}: {msg}"
    return msg


def job_overrides(overrides: list[str], multirun: bool, config_name: str) -> list[list[str]]:
    """The override list of every job a command would launch (one for a single run)."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    if not multirun:
        return [overrides]
    fixed = [str(o.input_line) for o in parsed if not o.is_sweep_override()]
    primary = hydra_compose(config_name, overrides=fixed, return_hydra_config=True)
    params = primary.hydra.sweeper.get("params") or {}
    by_key: dict[str, list[str]] = {}
    # the sweep config's params first, so that the command line wins for a key in both
    for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()]) + parsed:
        key = o.get_key_element()
        by_key[key] = [f"{key}={v}" for v in sweep_values(o)] if o.is_sweep_override() else [str(o.input_line)]
    return [list(combo) for combo in itertools.product(*by_key.values())]


def sweep_values(o: Any) -> list[str]:
    """The values of one sweep override; ``glob(*)`` over a config group is its options, sorted
    (``method=glob(*)``: every ``conf/method/*.yaml``, so a new method joins every such sweep);
    an interval (``tag(log, interval(1e-5, 1e-2))``, searched by a sweeper such as Optuna's)
    its two ends, the values a check can know before the search chooses."""
    if o.is_interval_sweep():
        return [str(o.value().start), str(o.value().end)]
    if isinstance(o.value(), Glob):
        group = Path(CONF_DIR) / o.key_or_group
        return o.value().filter(sorted(p.stem for p in group.glob("*.yaml")))
    return list(o.sweep_string_iterator())


def expand_globs(argv: list[str]) -> list[str]:
    """``argv`` with each ``group=glob(...)`` over a config group written out as its options
    (``sweep_values``): Hydra's own glob also lists the group's schemas in the ConfigStore
    (``model_schema``), a job that cannot compose."""
    parser = OverridesParser.create()
    out = []
    for a in argv:
        if a.startswith("-") or "glob(" not in a:
            out.append(a)
            continue
        (o,) = parser.parse_overrides([a])
        if isinstance(o.value(), Glob) and (Path(CONF_DIR) / o.key_or_group).is_dir():
            out.append(f"{a.split('=', 1)[0]}={','.join(sweep_values(o))}")
        else:
            out.append(a)
    return out


def hydra_part(overrides: list[str], config_name: str) -> DictConfig:
    """The ``hydra`` config a command line composes (its sweep overrides left out)."""
    fixed = [
        str(o.input_line) for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()
    ]
    return hydra_compose(config_name, overrides=fixed, return_hydra_config=True).hydra


def class_name(node: Any) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1] or "unknown"


def check_search(hc: DictConfig, cfg: DictConfig) -> None:
    """A sweeper that searches is steered by the figure each job returns (``objective``): it
    must be set, and the sweeper must seek the better end of it."""
    sweeper = class_name(hc.sweeper)
    objective = cfg.get("objective")
    if objective is None:
        raise ConfigError(
            f"objective=null: the {sweeper} chooses each job from the figures of the earlier ones; "
            f"allowed: the metric each job returns, one of {', '.join(config_mod.TUNE_OBJECTIVES)}"
        )
    want = "minimize" if quality_direction(objective) == "lower" else "maximize"
    given = getattr(hc.sweeper.get("direction"), "name", hc.sweeper.get("direction"))
    if given is not None and str(given) != want:
        raise ConfigError(
            f"hydra.sweeper.direction={given}: objective={objective} is better when "
            f"{quality_direction(objective)}; allowed: {want}"
        )


def check_added_keys(overrides: list[str], config_name: str) -> None:
    """``+key=value`` and ``++key=value`` may add config groups (``+sweep=methods``) and set keys
    the schema has; a key the schema does not know is rejected however it is added."""
    added = [
        o
        for o in OverridesParser.create().parse_overrides(overrides)
        if str(o.input_line).startswith("+")
        and not o.key_or_group.startswith("hydra")
        and not (Path(CONF_DIR) / o.key_or_group).is_dir()
    ]
    if not added:
        return
    plain = [o for o in overrides if o not in {a.input_line for a in added}]
    base = hydra_compose(config_name, overrides=plain)
    for o in added:
        if OmegaConf.select(base, o.key_or_group, default="\0missing") == "\0missing":
            value = str(o.input_line).split("=", 1)[1] if "=" in str(o.input_line) else ""
            raise ConfigError(
                f"{o.key_or_group}={value}: no such key in the config; allowed: the keys that "
                f"`python -m {'peftbench' if config_name == 'config' else 'peftbench.estimate'} "
                "--cfg job` lists"
            )


def check_results_dir(path: str) -> None:
    """A results folder that is a file, or that cannot be written, is a bad value: found now,
    not after the run. Creates nothing (a probe file is made and removed in the nearest folder
    that exists)."""
    p = Path(path).expanduser().resolve()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        where = "" if existing == p else f" ({existing} is a file)"
        raise ConfigError(f"results_dir={path}: not a folder{where}; allowed: a folder that can be written")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".peftbench-probe-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"results_dir={path}: cannot write in {existing} ({e.strerror or e}); allowed: a folder that can be written"
        ) from None


def plan_job(cfg: DictConfig, overrides: list[str]) -> Job:
    chash = config_hash(config_mod.to_container(cfg))
    task = cfg.get("task")
    label = f"{cfg.method.name}/{cfg.model.name}" + (f"/{task.name}" if task is not None else "")
    return Job(
        tuple(overrides), str(Path(cfg.results_dir).expanduser().resolve()), chash, bool(cfg.get("force", False)), label
    )


def check_renamed(overrides: list[str], renamed: dict[str, str]) -> None:
    """An override of a key the command no longer takes: one line naming the key that replaced it."""
    for o in overrides:
        key, _, value = o.partition("=")
        new = renamed.get(key.lstrip("+~"))
        if new is not None:
            raise ConfigError(f"{key.lstrip('+~')}={value}: renamed; allowed: {new}={value}")


def check_jobs(app: App, argv: list[str]) -> int | list[Job]:
    """Compose and check every job of a command line; the jobs if all are valid, else print one
    line and return 2."""
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    config_mod.register_configs()
    GlobalHydra.instance().clear()
    jobs: list[Job] = []
    current = overrides
    try:
        check_renamed(overrides, app.renamed)
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name=app.prog):
            outside = config_mod.external_launcher()
            if multirun and outside is not None and outside.world > 1:
                raise ConfigError(
                    f"-m: {outside.name} started {outside.world} processes, and each would run the whole sweep; "
                    f"allowed: the sweep without {outside.name}, each job starting its own ranks "
                    f"(parallel=ddp parallel.nproc={outside.local})"
                )
            hc = hydra_part(overrides, app.config_name) if multirun else None  # composed once for both uses
            os.environ[LAUNCHER_ENV] = class_name(hc.launcher) if hc is not None else "single"
            for job in job_overrides(overrides, multirun, app.config_name):
                current = job
                check_added_keys(job, app.config_name)
                cfg = hydra_compose(app.config_name, overrides=job)
                check_results_dir(cfg.results_dir)
                app.check(cfg)
                if hc is not None and class_name(hc.sweeper) not in LISTING_SWEEPERS:
                    check_search(hc, cfg)
                jobs.append(plan_job(cfg, job))
    except Exception as e:  # every composition problem becomes one line
        print(f"{app.prog}: error: {explain(e, current)}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        GlobalHydra.instance().clear()
    return jobs


# --------------------------------------------------------------------------------- the job
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


def run_job(
    app: App, cfg: DictConfig, extra_provenance: Optional[dict[str, Any]] = None
) -> tuple[dict[str, Any], Optional[Path]]:
    """Create the record, run, and write it atomically, ok or failed; returns it and its path.

    Never raises for a failure inside the run: the record says ``status: failed`` with the
    reason, so one bad job never takes a sweep down. extra_provenance: what only the launching
    side knows (the launcher, the code fingerprint). A record that cannot be written raises
    ``OSError``. A process whose record another writes (``RecordElsewhere``) gets its status
    and note back, and no path.
    """
    rec = app.new_record(cfg)
    t0 = time.perf_counter()
    try:
        app.execute(cfg, rec)
        rec["status"] = "ok"
    except RecordElsewhere as e:  # another process writes this run's record
        return {"status": "ok" if e.ok else "failed", "note": str(e)}, None
    except Exception as e:  # recorded, not raised: a sweep goes on
        if getattr(e, "sigval", None) == signal.SIGINT:  # the rank launcher's word for a Ctrl-C
            raise KeyboardInterrupt from e
        rec["status"], rec["error"] = "failed", failure(e)
        if not isinstance(e, ConfigError):
            rec["traceback"] = traceback.format_exc()
    if rec.get("provenance") is None:
        rec["provenance"] = writer.provenance(torch.device("cpu"))
    rec["provenance"].update(extra_provenance or {})
    rec["wall_s"] = time.perf_counter() - t0
    phases = rec.get("phase_s")
    if isinstance(phases, dict):  # the command timed its phases: the rest (checks, launch) is "other"
        phases["other"] = phases.get("other", 0.0) + max(0.0, rec["wall_s"] - sum(phases.values()))
    return rec, writer.write(rec, cfg.results_dir)


def reuse(cfg: DictConfig, chash: str, now: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The record to reuse instead of running this job, or None (and say why when it matters)."""
    if cfg.force:
        return None
    try:
        rec, why = reader.reusable(cfg.results_dir, chash, now)
    except OSError as e:  # an unreadable results folder: run rather than fail
        print(f"peftbench: cannot look for earlier records ({e}); running", file=sys.stderr)
        return None
    if rec is None and why != "no ok record yet":
        print(f"peftbench: config {chash}: {why}; running it again")
    return rec


def marker(results_dir: str, chash: str) -> Path:
    """The file that says a job of config ``chash`` started in this process and has not ended."""
    return Path(results_dir) / f".running-{chash}-{os.getpid()}"


def ledger_file(results_dir: str, sweep_id: str, chash: str) -> Path:
    """Where a job of the searching sweep ``sweep_id`` leaves its overrides (a JSON list), so
    that the command learns which jobs the sweeper chose; removed once the sweep is summarised."""
    return Path(results_dir) / f".job-{sweep_id}-{chash}.json"


def objective_value(rec: Optional[dict[str, Any]], objective: Optional[str]) -> Optional[float]:
    """The figure a job returns to Hydra's sweeper: the record's ``objective`` metric when the
    run ended ok with a finite value of it, else None (a searching sweeper counts the trial as
    failed and goes on)."""
    if objective is None or rec is None or rec.get("status") != "ok":
        return None
    value = (rec.get("metrics") or {}).get(objective)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class Task:
    """Hydra's task function of one command: ``job(app, cfg)``, returning the run's
    ``objective`` figure to the sweeper (``objective_value``). An object, not a closure, so the
    launchers that run jobs in other processes (joblib, submitit) carry the command with it.
    sweep_id: set for a sweep whose sweeper chooses its jobs; each job then leaves its
    overrides in ``ledger_file``."""

    app: App
    sweep_id: str = ""

    def __call__(self, cfg: DictConfig) -> Optional[float]:
        if self.sweep_id:
            chash = config_hash(config_mod.to_container(cfg))
            ledger = ledger_file(cfg.results_dir, self.sweep_id, chash)
            ledger.parent.mkdir(parents=True, exist_ok=True)
            ledger.write_text(json.dumps(list(HydraConfig.get().overrides.task)))
        return objective_value(job(self.app, cfg), cfg.get("objective"))


def job(app: App, cfg: DictConfig) -> Optional[dict[str, Any]]:
    """One job of ``app``'s command, in whatever process the launcher chose; its record (None
    when it was not written here)."""
    chash = config_hash(config_mod.to_container(cfg))
    now = reader.code_state()
    old = reuse(cfg, chash, now) if app.resume else None
    if old is not None:
        print(f"{app.prog}: reusing {old['_path']} (ok record of config {chash}, same code; force=true re-runs)")
        app.print_record(old, Path(old["_path"]))
        return old
    running = marker(cfg.results_dir, chash)
    try:
        running.parent.mkdir(parents=True, exist_ok=True)
        running.touch()
        # what only the launching side knows: the code's fingerprint (for resume) and the launcher
        rec, path = run_job(app, cfg, {**now, "launcher": launcher_info()})
        if path is None:  # this node's share of a run whose record another node writes
            print(f"{app.prog}: {rec['note']}", file=sys.stderr if rec["status"] != "ok" else sys.stdout)
            share = share_file(cfg.results_dir, chash)
            tmp = share.with_name(f".tmp{share.name}")
            tmp.write_text(json.dumps({**rec, "stamp": dt.datetime.now(dt.timezone.utc).strftime(STAMP)}))
            tmp.replace(share)
            return None
    except OSError as e:  # the record could not be written (disk full, folder gone)
        where = e.filename or cfg.results_dir
        print(f"{app.prog}: error: cannot write the record {where}: {e.strerror or e}", file=sys.stderr)
        return None
    finally:
        running.unlink(missing_ok=True)
    app.print_record(rec, path)
    return rec


# ------------------------------------------------------------------------------ outcome
def outcome(job_: Job, since: str, now: dict[str, Any]) -> tuple[str, Optional[dict[str, Any]]]:
    """What became of a job: ok, reused, failed or missing, with its record; elsewhere (this
    node did its share of a run whose record another node writes), with its share file."""
    found = reader.by_hash(job_.results_dir, job_.config_hash)
    fresh = reader.newest(r for r in found if reader.stamp(r) >= since)
    if fresh is not None:
        return ("ok" if fresh.get("status") == "ok" else "failed"), fresh
    for path in sorted(Path(job_.results_dir).glob(f".share-{job_.config_hash}-*.share")):
        try:
            share = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if share.get("stamp", "") >= since:  # this node's share; the record is another node's
            share.update({"_path": str(path), "error": share.get("note")})
            return ("elsewhere" if share.get("status") == "ok" else "failed"), share
    if not job_.force:
        old, _ = reader.reusable(job_.results_dir, job_.config_hash, now)
        if old is not None:
            return "reused", old
    return "missing", None


def started(job_: Job) -> bool:
    """Whether a process began this job and never ended it (its marker is still there)."""
    return any(Path(job_.results_dir).glob(f".running-{job_.config_hash}-*"))


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc").is_dir()


def wait_for_running(jobs: list[Job], poll_s: float = 1.0) -> None:
    """Wait until no job of ``jobs`` is still running in a live process (after a launcher failed,
    jobs it started elsewhere, such as submitit's other processes, may still be at work)."""
    while any(
        alive(int(m.name.rsplit("-", 1)[1]))
        for j in jobs
        for m in Path(j.results_dir).glob(f".running-{j.config_hash}-*")
    ):
        time.sleep(poll_s)


def clear_markers(jobs: list[Job]) -> None:
    for j in jobs:
        for m in Path(j.results_dir).glob(f".running-{j.config_hash}-*"):
            m.unlink(missing_ok=True)


def summarize(app: App, jobs: list[Job], since: str) -> int:
    """Print one line per job that did not end ok, and a count; 1 if any failed or is missing."""
    now = reader.code_state()
    unique = list({(j.results_dir, j.config_hash): j for j in jobs}.values())
    counts = {"ok": 0, "reused": 0, "failed": 0, "missing": 0, "elsewhere": 0}
    lines, recs = [], []
    for j in unique:
        state, rec = outcome(j, since, now)
        counts[state] += 1
        if rec is not None and "run_id" in rec:  # a record, not another node's share file
            recs.append(rec)
        if state == "failed":
            assert rec is not None  # a failed job has its record (or share file)
            lines.append(f"  failed   {j.label} [{j.config_hash}]: {rec.get('error')}  ({rec['_path']})")
        elif state == "missing":
            lines.append(
                f"  missing  {j.label} [{j.config_hash}]: no record written (the job process died: "
                f"killed, out of memory, or a launcher error); overrides: {' '.join(j.overrides)}"
            )
    app.report(recs)
    print(
        f"{app.prog}: sweep of {len(unique)} job(s): {counts['ok']} ran ok, {counts['reused']} reused, "
        f"{counts['failed']} failed, {counts['missing']} without a record"
        + (f", {counts['elsewhere']} run here with the record on another node" if counts["elsewhere"] else ""),
        file=sys.stderr,
    )
    for line in lines:
        print(line, file=sys.stderr)
    return EXIT_FAILED if counts["failed"] or counts["missing"] else EXIT_OK


# --------------------------------------------------------------------------------- main
def hydra_main(app: App, argv: list[str], sweep_id: str = "") -> None:
    """Hand ``argv`` to Hydra with ``app``'s job (``Task``) as the task function. A launcher's exception is
    raised here (``HYDRA_FULL_ERROR``) instead of being printed by Hydra as a traceback."""
    sys.argv = [sys.argv[0], *argv]
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(config_path=CONF_DIR, config_name=app.config_name, version_base=None)(Task(app, sweep_id))()
    finally:
        if full_error is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


def launch(app: App, argv: list[str], jobs: list[Job], since: str, sweep_id: str = "") -> None:
    """Run the jobs through Hydra's launcher. If the launcher fails part-way (a joblib worker
    killed, a submitit job that died), say so in one line, then run the jobs it never started
    here, one after another; the ones it lost stay without a record. sweep_id: a searching
    sweep's (``Task``); its jobs are not known in advance, so none is run again here."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    try:
        hydra_main(app, argv, sweep_id)
        return
    except Exception as e:
        if not multirun:
            raise
        print(
            f"{app.prog}: the launcher failed ({failure(e)[:300]}); waiting for the jobs still running, "
            "then the ones it never started run here",
            file=sys.stderr,
        )
    wait_for_running(jobs)
    if sweep_id:
        return
    now = reader.code_state()
    for j in jobs:
        if outcome(j, since, now)[0] == "missing" and not started(j):
            hydra_main(
                app, [a for a in argv if a.startswith("-") and a not in ("-m", "--multirun")] + list(j.overrides)
            )


def searching(argv: list[str], config_name: str) -> bool:
    """Whether a command line's sweeper chooses its jobs as it goes (not in ``LISTING_SWEEPERS``)."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return False
    config_mod.register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            overrides = [a for a in argv if not a.startswith("-")]
            return class_name(hydra_part(overrides, config_name).sweeper) not in LISTING_SWEEPERS
    finally:
        GlobalHydra.instance().clear()


def ledger_jobs(app: App, checked: list[Job], sweep_id: str) -> list[Job]:
    """The jobs a searching sweep ran, from the ledger files they left (in the results folders
    of the checked jobs), oldest first; the files are removed."""
    found: list[Job] = []
    for folder in sorted({j.results_dir for j in checked}):
        for path in sorted(Path(folder).glob(f".job-{sweep_id}-*.json"), key=lambda p: p.stat().st_mtime):
            try:
                overrides = [str(o) for o in json.loads(path.read_text())]
            except (OSError, ValueError):
                continue
            found.append(plan_job(compose(*overrides, config_name=app.config_name), overrides))
            path.unlink(missing_ok=True)
    return found


class CtrlC:
    """A user's Ctrl-C in this process, raised until the command has caught it. Python raises
    ``KeyboardInterrupt`` wherever the main thread is; inside a finalizer or a weakref callback
    (the memory tracker's, tqdm's) it prints the exception and drops it, and the run would go
    on. So the first SIGINT raises and, until ``caught``, the interrupt is raised again every
    ``retry_s`` seconds; once caught, later SIGINTs are ignored until ``restore``."""

    def __init__(self, retry_s: float = 2.0) -> None:
        self.retry_s = retry_s
        self.done = False
        self.pending = False
        self.previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.on_sigint)

    def on_sigint(self, signum: int, frame: Any) -> None:
        if self.done:
            return
        if not self.pending:
            self.pending = True
            threading.Thread(target=self.retry, daemon=True).start()
        raise KeyboardInterrupt

    def retry(self) -> None:
        while not self.done:
            time.sleep(self.retry_s)
            if not self.done:
                _thread.interrupt_main()

    def caught(self) -> None:
        self.done = True

    def restore(self) -> None:
        self.done = True
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def sweep(app: App, argv: list[str]) -> tuple[int, list[Job]]:
    """Check every job, run them, and return the exit status read back from the records with
    the jobs that ran (for a searching sweeper, those it chose; ``ledger_jobs``). Exit status
    2 and no job for a config error. A Ctrl-C is raised until caught (``CtrlC``)."""
    ctrl_c = CtrlC()
    ctrl_c.install()
    try:
        return _sweep(app, argv, ctrl_c)  # a Ctrl-C while checking propagates: the caller says so
    finally:
        ctrl_c.restore()


def _sweep(app: App, argv: list[str], ctrl_c: CtrlC) -> tuple[int, list[Job]]:
    jobs = check_jobs(app, argv)
    if isinstance(jobs, int):
        return jobs, []
    since = dt.datetime.now(dt.timezone.utc).strftime(STAMP)
    sweep_id = f"{since}-{os.getpid()}" if searching(argv, app.config_name) else ""
    os.environ[SWEEP_SIZE_ENV] = "" if sweep_id else str(len(jobs))
    checked = jobs
    try:
        try:
            launch(app, expand_globs(argv), jobs, since, sweep_id)
        except KeyboardInterrupt:
            ctrl_c.caught()
            print(interrupted(app, jobs, since), file=sys.stderr)
            return EXIT_INTERRUPTED, jobs
        if sweep_id:
            jobs = ledger_jobs(app, checked, sweep_id)
        if any(a in ("-m", "--multirun") for a in argv):
            return summarize(app, jobs, since), jobs
        state, _ = outcome(jobs[0], since, reader.code_state())
        return (EXIT_OK if state in ("ok", "reused", "elsewhere") else EXIT_FAILED), jobs
    finally:
        clear_markers(jobs)
        if sweep_id:
            for folder in {j.results_dir for j in checked}:
                for path in Path(folder).glob(f".job-{sweep_id}-*.json"):
                    path.unlink(missing_ok=True)


def interrupted(app: App, jobs: list[Job], since: str) -> str:
    """The one line a user's Ctrl-C ends a command with: what was saved before it (the rule for a
    plain run, a sweep and a distributed job alike: the job that was running writes nothing, no
    later job starts, and the same command finishes the rest, reusing what was saved)."""
    now = reader.code_state()
    states = [outcome(j, since, now)[0] for j in {(j.results_dir, j.config_hash): j for j in jobs}.values()]
    saved = sum(s in ("ok", "failed", "elsewhere") for s in states)
    reused = sum(s == "reused" for s in states)
    return (
        f"{app.prog}: interrupted (Ctrl-C): {saved} of {len(states)} job(s) wrote a record before it"
        + (f" ({reused} reused)" if reused else "")
        + "; the job that was running wrote nothing; the same command runs what is left, reusing what was saved"
    )


def untested_transformers() -> Optional[str]:
    """A warning line when the installed transformers is outside the range peftbench declares
    (its requirement in ``pyproject.toml``, the range CI tests), else None (also when peftbench
    runs uninstalled, from a source tree)."""
    try:
        wanted = next(
            r
            for r in map(Requirement, importlib.metadata.requires("peftbench") or [])
            if r.name == "transformers" and r.marker is None
        )
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        return None
    have = transformers.__version__
    if wanted.specifier.contains(have, prereleases=True):
        return None
    return (
        f"peftbench: warning: transformers {have} is outside the tested range {wanted.specifier}; "
        "runs may fail or measure differently (pip install 'transformers" + str(wanted.specifier) + "')"
    )


def main(app: App, argv: Optional[list[str]] = None) -> int:
    """Check every job, run them, and return the exit status read back from the records."""
    argv = sys.argv[1:] if argv is None else argv
    warning = untested_transformers()
    if warning is not None:
        print(warning, file=sys.stderr)
    if any(a.startswith(INFORMATIONAL) for a in argv):
        hydra_main(app, argv)
        return EXIT_OK
    try:
        return sweep(app, argv)[0]
    except KeyboardInterrupt:  # while checking, before any job ran
        print(f"{app.prog}: interrupted (Ctrl-C) before any job ran; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
