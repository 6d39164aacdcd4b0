"""History of the regression gate's figures: one entry per gate run (or committed baseline), kept
in the repository as JSON lines, so that anyone can see when a figure moved.

    python -m peftbench.history append results/history/gate.jsonl RECORDS   # after a gate run
    python -m peftbench.history baselines results/history/gate.jsonl        # from git's history

An entry holds the commit the figures were measured at (the newest record's
``provenance.git_sha``: a sweep that resumed may hold older records), its date (that record's
timestamp), the machine (device name), where the entry came from
(``gate`` or ``baseline <commit>``), and ``figures``: for each run (``compare.run_name``, with the
seed where a run has several) every gated figure of its record, keyed by metric. Which figures
are gated, and how (exact, quality, timing), is ``peftbench.compare``'s rule (``kind``).

``baselines`` rebuilds the entries of the baselines this repository committed: every version of
``results/baseline/`` in ``git log``, oldest first (an entry per version, whose commit is the
code the version measured). ``changes`` lists where a figure changed between consecutive
entries of one machine: an exact or quality figure that differs at all, a timing that moved by
more than ``TIMING_STEP`` (a ratio). The report plots the history (``peftbench.report``,
``--history``).

Exit status: 0 written; 2 unusable input (a records folder with no record, a history line that
is not an entry), in one line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

from peftbench import compare
from peftbench.records import git as git_bytes
from peftbench.records import reader as records

EXIT_OK, EXIT_INPUT = 0, 2
BASELINE = "results/baseline"
KINDS = ("exact", "quality", "timing")
TIMING_STEP = 0.25  # a timing "changed" when it moved by more than this ratio (machines are noisy)


def kind(metric: str, on_cpu: bool) -> Optional[str]:
    """How the gate treats ``metric`` (``compare``'s rule): exact, quality or timing; None if
    it is not gated."""
    if compare.is_exact(metric, on_cpu):
        return "exact"
    if compare.quality_direction(metric):
        return "quality"
    if compare.is_timing(metric):
        return "timing"
    return None


def figures(recs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every gated figure of each ok run of ``recs`` (the newest record per config), by run name
    and metric."""
    out: dict[str, dict[str, float]] = {}
    for group in compare.groups(recs).values():
        for rec in group:
            if rec.get("status") != "ok":
                continue
            on_cpu = (rec.get("provenance") or {}).get("device_type") == "cpu"
            metrics = rec.get("metrics") or {}
            out[compare.seed_name(rec, len(group))] = {
                k: float(v)
                for k, v in sorted(metrics.items())
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and kind(k, on_cpu)
            }
    return out


def entry(recs: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """One history entry for the records of one gate run (or one baseline version)."""
    prov = sorted((r.get("provenance") or {} for r in recs), key=lambda p: str(p.get("timestamp") or ""))
    return {
        "commit": prov[-1].get("git_sha") if prov else None,  # the newest record's (records may be reused)
        "date": prov[-1].get("timestamp") if prov else None,
        "machine": next((p.get("device_name") for p in prov if p.get("device_name")), None),
        "device_type": next((p.get("device_type") for p in prov if p.get("device_type")), None),
        "source": source,
        "figures": figures(recs),
    }


def read(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a history file, oldest first; a line that is not an entry raises
    ``ValueError`` naming it."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err})") from None
        if not isinstance(e, dict) or not isinstance(e.get("figures"), dict):
            raise ValueError(f"{path}:{n}: not a history entry (an object with figures)")
        out.append(e)
    return out


def append(path: str | Path, e: dict[str, Any]) -> None:
    """Add entry ``e`` as the last line of the history file ``path`` (made with its folder)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(e, sort_keys=True) + "\n")


def git(*args: str) -> str:
    return git_bytes(*args, timeout=60).decode()


def baseline_entries() -> list[dict[str, Any]]:
    """An entry for every committed version of ``results/baseline/``, oldest first."""
    out = []
    for commit in git("log", "--reverse", "--format=%H", "--", BASELINE).split():
        names = git("ls-tree", "-r", "--name-only", commit, "--", BASELINE).split()
        recs = []
        for name in names:
            if name.endswith(".json"):
                try:
                    recs.append(json.loads(git("show", f"{commit}:{name}")))
                except ValueError:
                    continue
        if recs:
            out.append(entry(recs, f"baseline {commit[:10]}"))
    return out


def series(entries: list[dict[str, Any]]) -> dict[tuple[str, str], list[Optional[float]]]:
    """Each (run, metric)'s value in every entry (None where an entry lacks it)."""
    keys = sorted({(run, m) for e in entries for run, f in e["figures"].items() for m in f})
    return {(run, m): [e["figures"].get(run, {}).get(m) for e in entries] for run, m in keys}


def changes(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where a figure changed from one entry to the next of the same machine: run, metric, its
    kind, both commits and both values (exact and quality: any difference; timing: a ratio
    beyond 1 +- ``TIMING_STEP``)."""
    out = []
    for i in range(1, len(entries)):
        a, b = entries[i - 1], entries[i]
        if a.get("machine") != b.get("machine"):
            continue
        on_cpu = b.get("device_type") == "cpu"
        for run, figs in b["figures"].items():
            for metric, new in figs.items():
                old = a["figures"].get(run, {}).get(metric)
                k = kind(metric, on_cpu)
                if old is None or k is None or old == new:
                    continue
                if k == "timing" and old > 0 and abs(new / old - 1) <= TIMING_STEP:
                    continue
                out.append(
                    {
                        "run": run,
                        "metric": metric,
                        "kind": k,
                        "from_commit": a.get("commit"),
                        "to_commit": b.get("commit"),
                        "from": old,
                        "to": new,
                    }
                )
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftbench.history", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a_ = sub.add_parser("append", help="add the figures of a folder of records (a gate run)")
    a_.add_argument("history", help="the history file (JSON lines)")
    a_.add_argument("records", help="records folder or file")
    a_.add_argument("--source", default="gate", help="where the entry came from (default: gate)")
    b_ = sub.add_parser("baselines", help="write the entries of every committed baseline (replaces the file)")
    b_.add_argument("history", help="the history file (JSON lines)")
    a = p.parse_args(argv)
    if a.command == "append":
        try:
            loaded = records.load([a.records])
        except records.RecordError as err:
            print(f"peftbench.history: error: {err}", file=sys.stderr)
            return EXIT_INPUT
        if not loaded.records:
            print(f"peftbench.history: error: {a.records}: no records", file=sys.stderr)
            return EXIT_INPUT
        e = entry(loaded.records, a.source)
        append(a.history, e)
        print(f"peftbench.history: {a.history}: added {len(e['figures'])} runs at commit {str(e['commit'])[:10]}")
        return EXIT_OK
    entries = baseline_entries()
    Path(a.history).parent.mkdir(parents=True, exist_ok=True)
    Path(a.history).write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    print(f"peftbench.history: {a.history}: {len(entries)} baseline entries")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
