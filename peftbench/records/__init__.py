"""Run records: one JSON file per run (``writer``: create and save; ``reader``: find, load,
validate and reuse). What both sides share lives here: the schema version, the config hash
that names a run, and the git helper that fingerprints the code.

This package imports neither torch nor transformers at import time, so that ``report`` and
``compare`` start fast.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

# The peftbench checkout (the folder holding peftbench/, methods/ and conf/).
REPO = Path(__file__).resolve().parent.parent.parent
SCHEMA_VERSION = 1
# measure keys added after records existed, at the value that measures what records measured
# before them; ``reuse_zero_shot`` changes where figures come from, not what they are
MEASURE_DEFAULTS = {"profile": "full", "reuse_zero_shot": True, "curve_every": 0, "curve_examples": 64}


def config_hash(config: dict[str, Any]) -> str:
    """Short stable hash of a resolved config (everything that defines the run but where its
    record is written, whether it is forced and which figure it returns to a sweeper). A
    one-process run (``parallel.strategy: none``) hashes without its ``parallel`` settings: it is
    the same run as before they existed, so earlier records stay comparable and reusable; a
    distributed one without the node's place (``node_rank``, ``master``: every node of a run
    hashes alike) and without ``oversubscribe``, and without ``nnodes`` on one node. Likewise the ``measure`` keys of
    ``MEASURE_DEFAULTS`` at their defaults."""
    cfg = {k: v for k, v in config.items() if k not in ("results_dir", "force", "objective")}
    measure = dict(cfg.get("measure") or {})
    for key, default in MEASURE_DEFAULTS.items():  # keys added later hash as before they existed
        if key in measure and measure[key] == default:
            del measure[key]
    measure.pop("eval_batch", None)  # how many prompts share a forward: the same figures (tested)
    if "measure" in cfg:
        cfg["measure"] = measure
    par = dict(cfg.get("parallel") or {})
    if par.get("strategy", "none") == "none":
        cfg.pop("parallel", None)
    elif par:  # where a node runs is not what the run is; one node hashes as before nnodes existed
        for key in ("node_rank", "master", "oversubscribe"):
            par.pop(key, None)
        if par.get("nnodes", 1) == 1:
            par.pop("nnodes", None)
        cfg["parallel"] = par
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]


def git(*args: str, timeout: float = 20) -> bytes:
    """``git -C REPO <args>``'s standard output; raises OSError or SubprocessError."""
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=timeout, check=True).stdout
