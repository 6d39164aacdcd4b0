"""Writing run records: a new record, its provenance, and one JSON file per run, written
atomically (temp file, then rename).

A reader never sees a half-written record: the file appears under its final name only once
complete, with the mode the user's umask gives any new file (colleagues on a shared file system
can read it). ``schema_version`` changes whenever a field changes meaning.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import secrets
import subprocess
import time
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from peftbench.records import SCHEMA_VERSION, config_hash, git  # noqa: F401 (re-exported for writers)

# A temp file older than this (seconds) was left by a killed write: a record takes milliseconds to
# write, so a concurrent job's temp file is always younger. Age, not the writer's pid: the jobs
# of a sweep may run on other hosts of a shared file system, where a pid means nothing.
STALE_TMP_S = 3600
PACKAGES = (
    "peftbench",
    "torch",
    "transformers",
    "datasets",
    "evaluate",
    "hydra-core",
    "omegaconf",
    "safetensors",
    "pandas",
    "numpy",
    "peft",
)


def git_state() -> dict[str, Any]:
    """Commit of the peftbench checkout and whether it has uncommitted changes."""
    try:
        return {
            "git_sha": git("rev-parse", "HEAD", timeout=10).decode().strip(),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", timeout=10).strip()),
        }
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def provenance(device: torch.device) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        **git_state(),
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_id(method: str, model: str, task: str, chash: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return f"{stamp}-{method}-{model}-{task}-{chash}"


class WriteError(OSError):
    """A record that could not be written; ``str()`` is one line naming the path and the OS
    reason (also in ``filename``, ``errno`` and ``strerror``)."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def write(record: dict[str, Any], results_dir: str) -> Path:
    """Write ``record`` as ``<results_dir>/<run_id>.json`` atomically; returns the path.

    Removes stale temp files of killed writes from ``results_dir`` first. Raises ``WriteError``
    (disk full, read-only, no such folder), leaving no temp file behind.
    """
    out = Path(results_dir)
    path = out / f"{record['run_id']}.json"
    text = json.dumps(_finite(record), indent=1, default=_jsonable, allow_nan=False)
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        replace_atomically(path, text)
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e
    return path


def replace_atomically(path: Path, text: str) -> None:
    """``text`` into a new temp file beside ``path`` (mode from the umask), synced, then renamed."""
    tmp = path.with_name(f".tmp-{secrets.token_hex(8)}.json")
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: Path) -> None:
    """Delete the temp files in ``folder`` older than ``STALE_TMP_S`` (from killed writes)."""
    now = time.time()
    for tmp in folder.glob(".tmp-*"):
        with suppress(OSError):  # removed meanwhile by another job, or not ours to remove
            if now - tmp.lstat().st_mtime > STALE_TMP_S:
                tmp.unlink()


def _finite(x: Any) -> Any:
    """NaN and infinities become null, so that the file is strict JSON."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def new_record(cfg: DictConfig, kind: str, task: str | None, model: str | None = None) -> dict[str, Any]:
    """The record a job starts with (``status: running``), for a measured run (``kind:
    "measured"``) or an estimate (``kind: "estimate"``, no task); ``model``: the model's name in
    it (default the preset's, ``model.name``)."""
    resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    chash = config_hash(resolved)
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id(cfg.method.name, cfg.model.name, task or kind, chash),
        "kind": kind,
        "status": "running",
        "error": None,
        "method": cfg.method.name,
        "model": model or cfg.model.name,
        "task": task,
        "config_hash": chash,
        "config": resolved,
        "model_config": None,
        "method_config": None,
        "provenance": None,
        "metrics": {},
    }
