"""Reading run records back: find and load them, check each against the schema (``schema``, so that
a file of the wrong shape is skipped with the reason, never a crash), decide whether
an existing record can stand in for a new run (sweep resume), and key them for matching.

Shared by the CLI (resume, sweep summary), ``peftbench.report`` and ``peftbench.compare``. It
imports neither torch nor transformers, so that reports and comparisons start fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from peftbench.records import REPO, git, schema

# The files whose content decides what a run measures; a change elsewhere (tests, docs,
# results) does not make an old record stale.
CODE_PATHS = ("peftbench", "methods", "conf", "pyproject.toml")
# the largest file read as a record: a record is kilobytes (its per-example predictions are a
# .jsonl file beside it), and parsing JSON takes about ten times the file's size in memory
MAX_RECORD_BYTES = 16 * 2**20
# what a file that is not a regular file is, for the reason it is skipped
KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


# The kind of a tuned comparison's selection file (``peftbench.tune.plan``), kept beside records:
# read as a companion, neither a record nor a file skipped for a problem.
SELECTION_KIND = "lr-selection"
COMPANION_KINDS = (SELECTION_KIND,)


class RecordError(ValueError):
    """A path that is missing, unreadable or not a peftbench record (one-line message)."""


@dataclass
class Loaded:
    """Records found under some paths, the files that were skipped with the reason, and the
    companion files kept beside records (``COMPANION_KINDS``: a tuned comparison's selections)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    companions: list[str] = field(default_factory=list)

    def add(self, f: Path) -> None:
        """The record in file ``f``, or the file among the companions, or among the skipped
        with the reason."""
        rec, why = parse(f)
        if rec is not None:
            self.records.append(rec)
        elif why.startswith(schema.NOT_A_RECORD) and companion(f):  # a regular file of JSON
            self.companions.append(str(f))
        else:
            self.skipped.append((str(f), why))

    def scan(self, folder: Path) -> None:
        """Every ``*.json`` file under ``folder`` (recursively, not into symlinked folders) but the
        temp files of atomic writes; a folder that cannot be listed is skipped with the reason."""

        def unlisted(e: OSError) -> None:
            self.skipped.append((str(e.filename), f"cannot list the folder ({e.strerror or e})"))

        found = [
            Path(root, name)
            for root, _, names in os.walk(folder, onerror=unlisted)
            for name in names
            if name.endswith(".json") and not name.startswith(".tmp-")
        ]
        for f in sorted(found):
            self.add(f)


def parse(p: Path) -> tuple[Optional[dict[str, Any]], str]:
    """The record in file ``p``, or None and why it is not one (one line)."""
    try:
        kind = stat.S_IFMT(p.stat().st_mode)
        if kind != stat.S_IFREG:  # reading a FIFO would block, a device might never end
            return None, f"not a regular file ({KINDS.get(kind, 'of an unknown kind')})"
        size = p.stat().st_size
        if size > MAX_RECORD_BYTES:  # parsing a huge JSON file takes about 10x its size in memory
            return None, (
                f"{size / 2**20:,.0f} MiB, larger than any record (at most {MAX_RECORD_BYTES >> 20} MiB; "
                "predictions live in .jsonl files beside it): not read"
            )
        obj = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        return None, f"cannot read ({e.strerror or e})"
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
    except RecursionError:
        return None, "not JSON (nested too deeply to parse)"
    except ValueError as e:  # bad JSON, or an integer of more than 4300 digits
        return None, f"not JSON ({str(e).splitlines()[0]})"
    why = schema.problem(obj)
    if why:
        return None, why
    obj["_path"] = str(p)
    return obj, ""


def companion(p: Path) -> bool:
    """Whether ``p`` (already found to be a regular file of JSON that is not a record: reading a
    FIFO or a device here would block) is a companion file (``COMPANION_KINDS``)."""
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("kind") in COMPANION_KINDS


def read(path: str | Path) -> dict[str, Any]:
    """One record file, checked against the schema; raises ``RecordError`` with a one-line reason."""
    rec, why = parse(Path(path))
    if rec is None:
        raise RecordError(f"{path}: {why}")
    return rec


def load(paths: Iterable[str | Path]) -> Loaded:
    """Every record in ``paths`` (folders searched recursively, or single files). A file that is
    not a record is skipped and listed; a path that does not exist raises ``RecordError``."""
    out = Loaded()
    for path in paths:
        p = Path(path)
        if p.is_dir():
            out.scan(p)
        elif os.path.lexists(p):  # a file, or a link that may lead nowhere: skipped with the reason
            out.add(p)
        else:
            raise RecordError(f"{p}: no such file or folder")
    return out


def stamp(rec: dict[str, Any]) -> str:
    """Sortable UTC start time of a run: the prefix of its run id (``YYYYmmddTHHMMSSffffff``)."""
    return str(rec.get("run_id", "")).split("-", 1)[0]


def newest(recs: Iterable[dict[str, Any]]) -> Optional[dict[str, Any]]:
    return max(recs, key=stamp, default=None)


def matching(folder: str | Path, chash: str) -> Loaded:
    """Records in ``folder`` (not its subfolders) whose config hash is ``chash``, and the files
    named for that config that were skipped."""
    p = Path(folder)
    out = Loaded()
    if not p.is_dir():
        return out
    # run ids end in the config hash, so the file name narrows the search before parsing
    for f in sorted(p.glob(f"*-{chash}.json")):
        out.add(f)
    out.records = [r for r in out.records if r.get("config_hash") == chash]
    return out


def by_hash(folder: str | Path, chash: str) -> list[dict[str, Any]]:
    """Records in ``folder`` (not its subfolders) whose config hash is ``chash``."""
    return matching(folder, chash).records


# ------------------------------------------------------------------------------- code version
def code_state() -> dict[str, Any]:
    """The code a run started now would execute: the commit, whether the measured code
    (``CODE_PATHS``) differs from it, and a SHA-256 over those differences (tracked changes
    and untracked files), so that two dirty trees can be told apart. Git missing (an installed
    wheel): all three are None and the package version stands for the code."""
    try:
        sha = git("rev-parse", "HEAD").decode().strip()
        # the git object ids of the measured code at HEAD: equal across commits that touch
        # only tests, docs or results
        listed = git("ls-tree", "HEAD", "--", *CODE_PATHS).decode()
        diff = git("diff", "HEAD", "--no-ext-diff", "--binary", "--", *CODE_PATHS)
        untracked = git("ls-files", "--others", "--exclude-standard", "-z", "--", *CODE_PATHS).split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "code_dirty": None, "code_diff_sha256": None, "code_tree": None}
    tree = hashlib.sha256("".join(sorted(listed.splitlines(keepends=True))).encode()).hexdigest()
    h = hashlib.sha256(diff)
    for name in sorted(n for n in untracked if n):
        h.update(b"\0" + name + b"\0")
        try:
            h.update((REPO / name.decode()).read_bytes())
        except OSError:
            pass
    dirty = bool(diff) or any(untracked)
    return {
        "git_sha": sha,
        "code_dirty": dirty,
        "code_diff_sha256": h.hexdigest() if dirty else None,
        "code_tree": tree,
    }


def same_code(rec: dict[str, Any], now: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``rec`` was measured with the code in ``now`` (from ``code_state``), and why not.

    Policy: the same measured code at the commit (the same commit, or another whose ``CODE_PATHS``
    hold the same git objects, ``provenance.code_tree``: a commit of tests, docs or results keeps
    records reusable), and either both trees clean or both dirty with the same differences
    (``provenance.code_diff_sha256``, added by the CLI). A record from a dirty tree without that
    fingerprint cannot be matched to any code, so it is never reused.
    """
    prov = rec.get("provenance") or {}
    if now["git_sha"] is None or prov.get("git_sha") is None:
        ours = (prov.get("packages") or {}).get("peftbench")
        return (False, "no git commit to compare") if ours is None else (True, "")
    same_tree = prov.get("code_tree") is not None and prov.get("code_tree") == now.get("code_tree")
    if prov["git_sha"] != now["git_sha"] and not same_tree:
        return False, (
            f"made at commit {prov['git_sha'][:10]}, the checkout is at {now['git_sha'][:10]}, "
            "whose measured code differs"
        )
    rec_dirty = prov.get("code_dirty", prov.get("git_dirty"))
    if not rec_dirty and not now["code_dirty"]:
        return True, ""
    if rec_dirty and prov.get("code_diff_sha256") is None:
        return False, "made from a modified checkout whose changes were not fingerprinted"
    if prov.get("code_diff_sha256") != now["code_diff_sha256"]:
        return False, "made with different uncommitted changes to the measured code"
    return True, ""


def reusable(results_dir: str | Path, chash: str, now: dict[str, Any]) -> tuple[Optional[dict[str, Any]], str]:
    """The newest ok record in ``results_dir`` for config ``chash`` made with the code in ``now``,
    or None and a reason (for the log) why nothing can be reused."""
    found = matching(results_dir, chash)
    skipped = "".join(f"; skipped {f}: {why}" for f, why in found.skipped)
    ok = [r for r in found.records if r["status"] == "ok" and r["kind"] == "measured"]
    if not ok:
        why = f"{len(found.records)} earlier record(s), none ok" if found.records else "no ok record yet"
        return None, why + skipped
    reasons = []
    for rec in sorted(ok, key=stamp, reverse=True):
        good, why = same_code(rec, now)
        if good:
            return rec, ""
        reasons.append(why)
    return None, f"{len(ok)} ok record(s) but {reasons[0]}" + skipped


# ------------------------------------------------------------------------------------ keys
def recorded_device(rec: dict[str, Any]) -> str:
    """The device a record was measured on (GPU or CPU model name), for grouping."""
    prov = rec.get("provenance") or {}
    return str(prov.get("device_name") or prov.get("device_type") or "unknown")


def recorded_device_type(rec: dict[str, Any]) -> str:
    prov = rec.get("provenance") or {}
    return str(prov.get("device_type") or "unknown")


def method_settings(rec: dict[str, Any]) -> dict[str, Any]:
    """The method's resolved settings as configured (``config.method``), scalars only."""
    cfg = (rec.get("config") or {}).get("method") or {}
    return {k: v for k, v in cfg.items() if not isinstance(v, (dict, list))}


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(
    a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ("results_dir", "force", "objective")
) -> list[str]:
    """Dotted config keys whose values differ between two records (``key: a -> b``)."""
    fa, fb = flat(a.get("config") or {}), flat(b.get("config") or {})
    out = []
    for k in sorted(set(fa) | set(fb)):
        if k.split(".")[0] in ignore or fa.get(k) == fb.get(k):
            continue
        out.append(f"{k}: {fa.get(k, '(absent)')} -> {fb.get(k, '(absent)')}")
    return out


def loose_key(rec: dict[str, Any]) -> str:
    """Method, model, task and the method's settings: what identifies a run when config hashes
    differ because the config gained or lost a key elsewhere."""
    return json.dumps(
        [rec.get("method"), rec.get("model"), rec.get("task"), method_settings(rec)], sort_keys=True, default=str
    )


# Config keys that do not make two runs different experiments: the seed (what a repeat
# changes), where the record is written, and whether it was forced.
NOT_THE_EXPERIMENT = ("seed", "results_dir", "force")


def run_seed(rec: dict[str, Any]) -> Any:
    """The run's ``config.seed`` (None when the record has no config or no seed)."""
    return (rec.get("config") or {}).get("seed")


def seed_free_key(rec: dict[str, Any]) -> str:
    """What identifies a run's experiment: its kind and resolved config without
    ``NOT_THE_EXPERIMENT``. Records with equal keys differ only in seed: repeats of one
    experiment. A record without a config is an experiment of its own (its config hash, else
    its run id)."""
    cfg = rec.get("config")
    if not cfg:
        return json.dumps(["no config", rec.get("config_hash") or rec.get("run_id")])
    rest = {k: v for k, v in cfg.items() if k not in NOT_THE_EXPERIMENT}
    return json.dumps([rec.get("kind"), rest], sort_keys=True, default=str)


def _seed_order(rec: dict[str, Any]) -> tuple[bool, float, str]:
    s = run_seed(rec)
    numeric = isinstance(s, (int, float)) and not isinstance(s, bool)
    return (not numeric, s if numeric else 0, str(s))


def seed_groups(
    recs: Iterable[dict[str, Any]], choose: Callable[[list[dict[str, Any]]], Any] = newest
) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by ``seed_free_key`` (first appearance first), one record per seed
    (``choose`` picks among several of one seed; default the newest), each group ordered by seed."""
    by_seed: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in recs:
        by_seed.setdefault(seed_free_key(r), {}).setdefault(repr(run_seed(r)), []).append(r)
    return {k: sorted((choose(rs) for rs in seeds.values()), key=_seed_order) for k, seeds in by_seed.items()}


def latency_points(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's latency grid as long rows: batch, length, merged (bool), median_ms, iqr_ms.

    A method that merges has its deployed (merged) figure in ``inference_latency_ms`` and the
    as-trained one in ``inference_latency_unmerged_ms``; any other method only the first, not
    merged. Times in milliseconds; a point not measured (null) is left out."""
    out = []
    for row in rec.get("latency_grid") or []:
        merges = row.get("inference_latency_unmerged_ms") is not None
        forms = [(merges, "inference_latency_ms", "inference_latency_iqr_ms")]
        if merges:
            forms.append((False, "inference_latency_unmerged_ms", "inference_latency_unmerged_iqr_ms"))
        out += [
            {
                "batch": row["batch"],
                "length": row["length"],
                "merged": merged,
                "median_ms": row.get(median),
                "iqr_ms": row.get(iqr),
            }
            for merged, median, iqr in forms
        ]
    return [p for p in out if p["median_ms"] is not None]


def launched_in_parallel(rec: dict[str, Any]) -> bool:
    """Whether the record's timings were taken while other jobs of its sweep shared the machine."""
    return bool(((rec.get("provenance") or {}).get("launcher") or {}).get("parallel"))
