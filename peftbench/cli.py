"""The ``python -m peftbench`` entry point: check every job's config, then hand over to Hydra.

Hydra's own messages for a bad override span several lines; peftbench composes each job's
config first (expanding ``-m`` sweeps, including ``hydra.sweeper.params`` from a sweep
config) and turns any problem into one line: ``peftbench: error: <key>=<value>: <allowed>``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

from methods import ConfigError
from peftbench import config as config_mod

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_CONFIG = 2

config_mod.register_configs()


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


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job a command would launch (one for a single run)."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    if not multirun:
        return [overrides]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    primary = compose("config", overrides=fixed, return_hydra_config=True)
    params = primary.hydra.sweeper.get("params") or {}
    by_key: dict[str, list[str]] = {}
    for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()]) + parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            by_key[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            by_key[key] = [o.input_line]
    return [list(combo) for combo in itertools.product(*by_key.values())]


def check_all(argv: list[str]) -> int:
    """Compose and check every job; 0 if all are valid, else print one line and return 2."""
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name="peftbench"):
            jobs = job_overrides(overrides, multirun)
            for job in jobs:
                current = job
                dry_run(compose("config", overrides=job))
    except Exception as e:  # every composition problem becomes one line
        print(f"peftbench: error: {explain(e, locals().get('current', overrides))}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        GlobalHydra.instance().clear()
    return 0


def dry_run(cfg: Any) -> None:
    """Check the values, then apply the method to the model's structure on the meta device, so
    that a setting the model cannot take (a LoRA target it lacks) fails before any real work."""
    import methods
    from peftbench import models

    config_mod.check(cfg)
    num_labels = 2 if cfg.task.kind == "classification" else 0
    meta = models.build_meta(cfg.model, cfg.task.kind, cfg.task.vocab_size, num_labels)
    methods.build(cfg.method).apply(meta)


FAILED: list[str] = []


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def hydra_entry(cfg: Any) -> None:
    from peftbench.run import run
    from peftbench.summary import print_summary

    rec, path = run(cfg)
    print_summary(rec, path)
    if rec["status"] != "ok":
        FAILED.append(rec["run_id"])
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    informational = any(a.startswith(("--help", "-h", "--cfg", "-c", "--info", "--hydra-help", "--shell-completion"))
                        for a in argv)
    if not informational:
        code = check_all(argv)
        if code:
            return code
    sys.argv = [sys.argv[0], *argv]
    hydra_entry()
    if FAILED:
        print(f"peftbench: {len(FAILED)} run(s) failed (records written with status 'failed')", file=sys.stderr)
        return 1
    return 0
