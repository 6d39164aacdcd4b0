"""Regression gate: compare the records of a run against a baseline.

    python -m peftbench.compare BASELINE CURRENT [--timing fail|warn|off] [--time-tolerance 0.10]

BASELINE and CURRENT are each a folder of records (searched recursively) or one record file.
Runs that differ only in seed form a group. Groups are matched by their config without the
seed; a baseline group left unmatched is then matched by method, model, task and method
settings (config hashes change when the config gains a key), and the config keys that differ
are printed. Within matched groups, runs are paired by seed (then the rest in seed order).

- exact: parameter counts, FLOPs, checkpoint bytes and the base weights' checksum must be equal;
  so must every tensor-byte figure (peak and breakdown) when both runs are on CPU, where the
  tracker's figure is reproducible to the byte.
- quality (``quality_direction``: eval loss, final train loss, ``*_accuracy``,
  ``*_perplexity``, ``forgetting_*``) may not get worse by more than ``--quality-tolerance``
  (relative where lower is better, absolute for accuracy). Runs that differ only in seed are
  one group (``records.seed_groups``); where both sides have n >= 2 values of a metric, its
  group means are compared and the margin is the larger of that tolerance and 2 standard
  errors of the difference (``peftbench.stats.Spread``); each seed's other figures are
  compared as usual.
- timing (only between runs on the same device name): a median that is slower by more than
  ``--time-tolerance`` is a slowdown if it is also significant: a one-sided Mann-Whitney U test
  (p < ``--alpha``) where both records store per-step samples (``train_step_ms``), else a gap
  wider than either run's IQR. ``--timing warn`` reports slowdowns without failing, except
  those beyond ``--gross-slowdown``; timings taken under a parallel launcher only warn.

Exit status: 0 no regression; 1 a regression (or a baseline run missing or failed in CURRENT);
2 unusable input (an option out of range, a path missing or unreadable, a file that is not a
record, no records), in one line on standard error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Optional, cast

import methods
from peftbench.records import reader as records
from peftbench.stats import Spread, combined_se, is_finite_number, mann_whitney_p

EXIT_OK, EXIT_REGRESSION, EXIT_INPUT = 0, 1, 2
EXACT_KEYS = ("trainable_params", "total_params", "checkpoint_bytes", "checkpoint_params", "checkpoint_tensors")
QUALITY = {"eval_loss": "lower", "train_loss_final": "lower", "eval_accuracy": "higher"}
# quality beyond QUALITY, by name: (suffix or prefix, direction)
QUALITY_SUFFIXES = (("_accuracy", "higher"), ("_perplexity", "lower"))
QUALITY_PREFIXES = (("forgetting_", "lower"),)
# numeric options: what is allowed, and the test (infinities and NaN are never allowed)
LIMITS = {
    "time_tolerance": ("a finite number >= 0", lambda x: x >= 0),
    "gross_slowdown": ("a finite number >= 1", lambda x: x >= 1),
    "alpha": ("a number in (0, 1]", lambda x: 0 < x <= 1),
    "quality_tolerance": ("a finite number >= 0", lambda x: x >= 0),
}


@dataclasses.dataclass
class Row:
    """One compared figure: run, metric, both values, the change and the verdict."""

    run: str
    metric: str
    baseline: Any
    current: Any
    change: str
    verdict: str  # same | note | changed | better | warn | FAIL
    note: str = ""


def is_exact(key: str, both_cpu: bool) -> bool:
    if key in EXACT_KEYS:
        return True
    if "flops" in key and "peak_flops" not in key and "mfu" not in key and not key.endswith(("_per_s", "_per_s_iqr")):
        return True
    return both_cpu and key.endswith("_bytes") and not key.startswith("cuda_")


def quality_direction(key: str) -> Optional[str]:
    """``"higher"`` or ``"lower"`` (which is better) if metric ``key`` measures task quality,
    else None. The one definition of a quality metric, for the gate and the report: the keys
    in ``QUALITY``, names ending ``_accuracy`` (higher) or ``_perplexity`` (lower), and names
    starting ``forgetting_`` (lower). Not every ``eval_*`` name: ``eval_peak_memory_bytes`` is
    a cost, and ``*_initial`` figures (``forgetting_kl_initial``) are measured before training."""
    if key.endswith("_initial"):
        return None
    if key in QUALITY:
        return QUALITY[key]
    for suffix, direction in QUALITY_SUFFIXES:
        if key.endswith(suffix):
            return direction
    for prefix, direction in QUALITY_PREFIXES:
        if key.startswith(prefix):
            return direction
    return None


def is_timing(key: str) -> bool:
    return "iqr" not in key and key.endswith(("_ms", "_ms_median", "_ms_per_token"))


def iqr_of(metrics: dict[str, Any], key: str) -> Optional[float]:
    for k in (key.replace("_ms", "_iqr_ms", 1), key.replace("_median", "_iqr"), f"{key}_iqr"):
        if k != key and isinstance(metrics.get(k), (int, float)):
            return metrics[k]
    return None


def pick(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest ok record of several for one run (the newest of all if none is ok)."""
    ok = [r for r in recs if r.get("status") == "ok"]
    return cast(dict[str, Any], records.newest(ok or recs))  # recs is never empty: newest is a record


def index(recs: list[dict[str, Any]], key: Any) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(key(r), []).append(r)
    return {k: pick(v) for k, v in groups.items()}


Group = list[dict[str, Any]]  # the runs of one experiment, one per seed, ordered by seed


def groups(recs: list[dict[str, Any]]) -> dict[str, Group]:
    """The runs (newest ok record of each config hash), grouped by everything but the seed."""
    return records.seed_groups(index(recs, lambda r: r.get("config_hash")).values(), choose=pick)


def match(base: list[dict], cur: list[dict]) -> tuple[list[tuple[Group, Group, str]], list[Group], list[Group]]:
    """Pairs of groups (baseline, current, how), the unmatched baseline groups and the
    unmatched current groups. Groups are matched by their config without the seed, else by
    method, model, task and method settings (the config gained or lost a key)."""
    b_groups, c_groups = groups(base), groups(cur)
    pairs = [(b_groups[k], c_groups[k], "config") for k in b_groups if k in c_groups]
    loose: dict[str, list[Group]] = {}
    for k, g in c_groups.items():
        if k not in b_groups:
            loose.setdefault(records.loose_key(g[0]), []).append(g)
    missing = []
    for k, b in b_groups.items():
        if k in c_groups:
            continue
        candidates = loose.get(records.loose_key(b[0])) or []
        if not candidates:
            missing.append(b)
            continue
        # of several, the one whose config differs from the baseline's in the fewest keys
        c = min(candidates, key=lambda g: len(records.config_diff(b[0], g[0], records.NOT_THE_EXPERIMENT)))
        candidates.remove(c)
        pairs.append((b, c, "method/model/task/method settings"))
    return pairs, missing, [g for gs in loose.values() for g in gs]


def pair_seeds(b: Group, c: Group) -> tuple[list[tuple[dict, dict]], Group, Group]:
    """The runs of two matched groups paired: the same seed first, then the rest in seed order;
    the baseline runs left without a partner and the current runs left over."""
    c_by_seed = {repr(records.run_seed(r)): r for r in c}
    pairs, rest_b = [], []
    for r in b:
        partner = c_by_seed.pop(repr(records.run_seed(r)), None)
        if partner is None:
            rest_b.append(r)
        else:
            pairs.append((r, partner))
    rest_c = [r for r in c if repr(records.run_seed(r)) in c_by_seed]
    pairs += list(zip(rest_b, rest_c))
    return pairs, rest_b[len(rest_c) :], rest_c[len(rest_b) :]


def run_name(rec: dict[str, Any]) -> str:
    """``method settings/model/task``: the method's own name for it (``label_keys`` of its class,
    e.g. ``rank``), then every other method setting that differs from the method's defaults."""
    extra = " ".join(f"{k}={short(v)}" for k, v in method_label(rec))
    return f"{rec.get('method')}{' ' + extra if extra else ''}/{rec.get('model')}/{rec.get('task')}"


def method_label(rec: dict[str, Any]) -> list[tuple[str, Any]]:
    """The method settings that name a run: those the method's class lists in ``label_keys``,
    then, in key order, those whose value differs from its config class's default (none for a
    method this code does not know)."""
    cfg = (rec.get("config") or {}).get("method") or {}
    name = rec.get("method")
    cls = methods.REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        return []
    defaults = {f.name: f for f in dataclasses.fields(cls.config_class)}
    head = [k for k in getattr(cls, "label_keys", ()) if k in cfg]

    def default(k: str) -> Any:
        f = defaults[k]
        return cast(Callable[[], Any], f.default_factory)() if f.default is dataclasses.MISSING else f.default

    rest = sorted(k for k in cfg if k not in head and k != "name" and k in defaults and cfg[k] != default(k))
    return [(k, cfg[k]) for k in head + rest]


def short(value: Any) -> str:
    """A setting as the command line writes it: ``[lora,{name:prefix,num_virtual_tokens:10}]``."""
    if isinstance(value, list):
        return "[" + ",".join(short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{short(v)}" for k, v in value.items()) + "}"
    return str(value)


def seed_name(rec: dict[str, Any], group_size: int) -> str:
    """``run_name``, with the seed for a run of a group of several."""
    return f"{run_name(rec)} seed={records.run_seed(rec)}" if group_size > 1 else run_name(rec)


def status_row(name: str, b: dict[str, Any], c: dict[str, Any]) -> Row:
    """The one row for a pair where a run did not end ok: a current run that failed fails (only
    warns when the baseline run failed too); a baseline failure that now runs is better."""
    if c.get("status") != "ok":
        verdict = "FAIL" if b.get("status") == "ok" else "warn"
        return Row(name, "status", b.get("status"), c.get("status"), "", verdict, str(c.get("error") or ""))
    return Row(name, "status", b.get("status"), c.get("status"), "", "better")


def weights_rows(name: str, b: dict[str, Any], c: dict[str, Any]) -> list[Row]:
    """The base weights' checksums (first 12 hex digits) where both runs recorded one: a change fails."""
    if not (b.get("base_weights_sha256") and c.get("base_weights_sha256")):
        return []
    b_sha, c_sha = b["base_weights_sha256"], c["base_weights_sha256"]
    same = b_sha == c_sha
    note = "" if same else "the base model's weights differ"
    return [Row(name, "base_weights_sha256", b_sha[:12], c_sha[:12], "", "same" if same else "FAIL", note)]


class Comparer:
    """Holds the thresholds; ``groups`` turns two matched groups into rows, ``pair`` one
    matched pair of runs."""

    def __init__(self, a: argparse.Namespace):
        self.a = a

    def groups(self, bg: Group, cg: Group, runs: list[tuple[dict, dict]], how: str) -> list[Row]:
        """Rows for two matched groups: each paired run's figures (named by seed when a side
        has several), with the quality metrics that both sides have n >= 2 values of compared
        as groups (``spread_quality``) instead of run by run."""
        name, size = run_name(bg[0]), max(len(bg), len(cg))
        pooled = self.pooled_keys(bg, cg)
        rows = [self.spread_quality(name, key, bg, cg) for key in pooled]
        for b, c in runs:
            run = seed_name(b, size)
            if b.get("config_hash") != c.get("config_hash"):
                diff = "; ".join(records.config_diff(b, c)[:6]) or "no config change"
                via = how if how != "config" else "config but the seed"
                rows.append(Row(run, "matched by", via, "", "", "changed", diff))
            rows += self.pair(b, c, run, skip=pooled)
        return rows

    @staticmethod
    def values(g: Group, key: str) -> list[float]:
        return [r["metrics"][key] for r in g if r.get("status") == "ok" and is_finite_number(r["metrics"].get(key))]

    def pooled_keys(self, bg: Group, cg: Group) -> list[str]:
        """Quality metrics with at least two values on each side."""
        keys = {k for r in bg + cg if r.get("status") == "ok" for k in r["metrics"] if quality_direction(k)}
        return sorted(k for k in keys if len(self.values(bg, k)) >= 2 and len(self.values(cg, k)) >= 2)

    def spread_quality(self, name: str, key: str, bg: Group, cg: Group) -> Row:
        """Current mean against baseline mean: worse by more than the margin, the larger of the
        tolerance (relative to the baseline mean where lower is better, absolute otherwise) and
        2 standard errors of the difference, is a regression."""
        b, c = Spread.of(self.values(bg, key)), Spread.of(self.values(cg, key))
        lower = quality_direction(key) == "lower"
        worse = c.mean - b.mean if lower else b.mean - c.mean
        # as today's rule: a loss relative to the baseline (never failing on a zero baseline)
        tol = (self.a.quality_tolerance * abs(b.mean) if b.mean else math.inf) if lower else self.a.quality_tolerance
        two_se = 2 * combined_se(b.se, c.se)
        margin = max(tol, two_se)
        verdict = "FAIL" if worse > margin else "better" if worse < -margin else "same" if worse == 0 else "changed"
        note = f"margin {margin:.3g} = max(tolerance {tol:.3g}, 2 SE {two_se:.3g})"
        return Row(name, key, b.text(), c.text(), f"{c.mean - b.mean:+.4g}", verdict, note)

    def pair(self, b: dict[str, Any], c: dict[str, Any], name: str = "", skip: Any = ()) -> list[Row]:
        """Rows for one baseline run and its current run; quality metrics in ``skip`` are left
        to ``spread_quality``."""
        name = name or run_name(b)
        if c.get("status") != "ok" or b.get("status") != "ok":
            return [status_row(name, b, c)]
        rows = weights_rows(name, b, c) + self.figure_rows(name, b, c, skip)
        b_device, c_device = records.recorded_device(b), records.recorded_device(c)
        if b_device != c_device:
            return rows + [
                Row(name, "timing", b_device, c_device, "", "note", "different devices: timings not compared")
            ]
        return rows + self.timing_rows(name, b, c)

    def figure_rows(self, name: str, b: dict[str, Any], c: dict[str, Any], skip: Any) -> list[Row]:
        """The exact figures (``is_exact``) and the quality metrics not in ``skip`` of two ok runs."""
        bm, cm = b["metrics"], c["metrics"]
        both_cpu = records.recorded_device_type(b) == "cpu" and records.recorded_device_type(c) == "cpu"
        rows = []
        for key in sorted(set(bm) | set(cm)):
            if is_exact(key, both_cpu):
                rows += self.exact(name, key, bm.get(key), cm.get(key))
            elif quality_direction(key) and key not in skip:
                rows += self.quality(name, key, bm.get(key), cm.get(key))
        return rows

    def timing_rows(self, name: str, b: dict[str, Any], c: dict[str, Any]) -> list[Row]:
        """The timings both ok runs have (the median step with its per-step samples), then the
        latency grid; for two runs on the same device."""
        bm, cm = b["metrics"], c["metrics"]
        parallel = records.launched_in_parallel(b) or records.launched_in_parallel(c)
        rows = []
        for key in sorted(k for k in set(bm) & set(cm) if is_timing(k)):
            samples = (
                (b.get("train_step_ms"), c.get("train_step_ms")) if key == "train_step_ms_median" else (None, None)
            )
            rows += self.timing(name, key, bm[key], cm[key], iqr_of(bm, key), iqr_of(cm, key), samples, parallel)
        return rows + self.grid(name, b, c, parallel)

    def exact(self, name: str, key: str, bv: Any, cv: Any) -> list[Row]:
        if bv is None and cv is None:
            return []
        if bv is None or cv is None:
            return [Row(name, key, bv, cv, "", "changed", "present on one side only")]
        if bv == cv:
            return [Row(name, key, bv, cv, "", "same")]
        change = f"{cv - bv:+,}" if is_finite_number(bv) and is_finite_number(cv) else ""
        return [Row(name, key, bv, cv, change, "FAIL", "exact figure changed")]

    def quality(self, name: str, key: str, bv: Any, cv: Any) -> list[Row]:
        if not (is_finite_number(bv) and is_finite_number(cv)):
            return [] if bv is None and cv is None else [Row(name, key, bv, cv, "", "warn", "not comparable")]
        tol, direction = self.a.quality_tolerance, quality_direction(key)
        worse = (cv - bv) / abs(bv) if direction == "lower" and bv else bv - cv if direction == "higher" else 0.0
        verdict = "FAIL" if worse > tol else "better" if worse < -tol else "same" if bv == cv else "changed"
        return [Row(name, key, round(bv, 6), round(cv, 6), f"{cv - bv:+.4g}", verdict)]

    def timing(
        self,
        name: str,
        key: str,
        bv: Any,
        cv: Any,
        b_iqr: Optional[float],
        c_iqr: Optional[float],
        samples: tuple[Any, Any],
        parallel: bool,
    ) -> list[Row]:
        if self.a.timing == "off" or not (is_finite_number(bv) and is_finite_number(cv)) or bv <= 0:
            return []
        ratio = cv / bv
        note = ""
        if ratio <= 1 + self.a.time_tolerance:
            verdict = "better" if ratio < 1 - self.a.time_tolerance else "same"
        else:
            p = mann_whitney_p(*samples) if all(isinstance(s, list) for s in samples) else None
            if p is not None:
                significant, note = p < self.a.alpha, f"Mann-Whitney p={p:.2g}"
            elif b_iqr is not None and c_iqr is not None:
                significant, note = cv - bv > max(b_iqr, c_iqr), f"IQR {b_iqr:.3g} / {c_iqr:.3g}"
            else:
                significant, note = True, "no spread recorded"
            verdict = self.slow_verdict(ratio, parallel) if significant else "changed"
            if parallel:
                note += "; parallel launcher"
        return [Row(name, key, round(bv, 3), round(cv, 3), f"x{ratio:.2f}", verdict, note)]

    def slow_verdict(self, ratio: float, parallel: bool) -> str:
        if self.a.timing == "fail" and not parallel:
            return "FAIL"
        return "FAIL" if ratio > self.a.gross_slowdown and not parallel else "warn"

    def grid(self, name: str, b: dict[str, Any], c: dict[str, Any], parallel: bool) -> list[Row]:
        cur = {(p["batch"], p["length"], p["merged"]): p for p in records.latency_points(c)}
        rows = []
        base = records.latency_points(b)
        merges = any(p["merged"] for p in base)  # else every point is the method's only form
        for p in base:
            q = cur.get((p["batch"], p["length"], p["merged"]))
            if q is None:
                continue
            key = f"latency b={p['batch']} n={p['length']}{' unmerged' if merges and not p['merged'] else ''}"
            rows += self.timing(
                name, key, p["median_ms"], q["median_ms"], p.get("iqr_ms"), q.get("iqr_ms"), (None, None), parallel
            )
        return rows


def load_side(path: str, what: str) -> list[dict[str, Any]]:
    """Records under ``path``; a bad file inside a folder is reported and skipped, while a
    missing path, a file that is not a record, or no records at all raise ``RecordError``."""
    loaded = records.load([path])
    if not Path(path).is_dir() and loaded.skipped:
        raise records.RecordError(f"{what} {path}: {loaded.skipped[0][1]}")
    for f, why in loaded.skipped:
        print(f"peftbench.compare: skipped {f}: {why}", file=sys.stderr)
    if not loaded.records:
        raise records.RecordError(f"{what} {path}: no peftbench records found")
    return loaded.records


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "-" if v is None else str(v)


def print_table(rows: list[Row]) -> None:
    head = ("run", "metric", "baseline", "current", "change", "verdict", "note")
    cells = [head] + [(r.run, r.metric, fmt(r.baseline), fmt(r.current), r.change, r.verdict, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip())


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT, f"peftbench.compare: error: {message}\n")


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = Parser(prog="python -m peftbench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("baseline", help="records folder or record file")
    p.add_argument("current", help="records folder or record file")
    p.add_argument(
        "--timing",
        choices=("fail", "warn", "off"),
        default="fail",
        help="what a significant slowdown does (default: fail)",
    )
    p.add_argument("--time-tolerance", type=float, default=0.10, help="slowdown ratio allowed, 0.10 = 10%%")
    p.add_argument(
        "--gross-slowdown",
        type=float,
        default=2.0,
        help="with --timing warn, a slowdown beyond this ratio still fails (default 2.0)",
    )
    p.add_argument("--alpha", type=float, default=0.01, help="significance level of the rank test")
    p.add_argument(
        "--quality-tolerance",
        type=float,
        default=0.01,
        help="worsening allowed: relative for losses, absolute for accuracy",
    )
    p.add_argument("--allow-missing", action="store_true", help="a baseline run absent from CURRENT only warns")
    p.add_argument("-v", "--verbose", action="store_true", help="print unchanged figures too")
    a = p.parse_args(argv)
    for dest, (allowed, ok) in LIMITS.items():
        value = getattr(a, dest)
        if not (math.isfinite(value) and ok(value)):
            p.error(f"--{dest.replace('_', '-')}={value:g}: must be {allowed}")
    return a


def main(argv: Optional[list[str]] = None) -> int:
    a = parse(argv)
    try:
        base, cur = load_side(a.baseline, "baseline"), load_side(a.current, "current")
    except records.RecordError as e:
        print(f"peftbench.compare: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    pairs, missing_groups, extra_groups = match(base, cur)
    comparer = Comparer(a)
    rows: list[Row] = []
    # runs without a partner, with their group's size (a run of several is named by its seed)
    missing = [(r, len(g)) for g in missing_groups for r in g]
    extra = [(r, len(g)) for g in extra_groups for r in g]
    matched = 0
    for bg, cg, how in pairs:
        runs, lost, new = pair_seeds(bg, cg)
        rows += comparer.groups(bg, cg, runs, how)
        matched += len(runs)
        missing += [(r, len(bg)) for r in lost]
        extra += [(r, len(cg)) for r in new]
    for b, size in missing:
        rows.append(
            Row(
                seed_name(b, size),
                "run",
                "present",
                "missing",
                "",
                "warn" if a.allow_missing else "FAIL",
                f"config {b.get('config_hash')} not in current",
            )
        )
    for c, size in extra:
        rows.append(Row(seed_name(c, size), "run", "absent", "new", "", "changed", "not in baseline"))
    shown = rows if a.verbose else [r for r in rows if r.verdict != "same"]
    if shown:
        print_table(shown)
    fails = sum(r.verdict == "FAIL" for r in rows)
    warns = sum(r.verdict == "warn" for r in rows)
    status = "REGRESSION" if fails else "ok"
    print(
        f"peftbench.compare: {matched} run(s) matched, {len(missing)} missing, {len(extra)} new; "
        f"{sum(r.verdict == 'same' for r in rows)} figures unchanged, {fails} failing, {warns} warning(s): {status}"
    )
    return EXIT_REGRESSION if fails else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
