"""Regression gate: compare the records of a run against a baseline.

    python -m peftbench.compare BASELINE CURRENT [--timing fail|warn|off] [--time-tolerance 0.10]

BASELINE and CURRENT are each a folder of records (searched recursively) or one record file.
Runs are matched by config hash; a baseline run left unmatched is then matched by method,
model, task and method settings (config hashes change when the config gains a key), and the
config keys that differ are printed.

- exact: parameter counts, FLOPs, checkpoint bytes and the base weights' checksum must be equal;
  so must every tensor-byte figure (peak and breakdown) when both runs are on CPU, where the
  tracker's figure is reproducible to the byte.
- quality: eval loss / accuracy / final train loss may not get worse by more than
  ``--quality-tolerance`` (relative for losses, absolute for accuracy).
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
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional

from peftbench.records import reader as records

EXIT_OK, EXIT_REGRESSION, EXIT_INPUT = 0, 1, 2
EXACT_KEYS = ("trainable_params", "total_params", "checkpoint_bytes", "checkpoint_params", "checkpoint_tensors")
QUALITY = {"eval_loss": "lower", "train_loss_final": "lower", "eval_accuracy": "higher"}
MIN_SAMPLES = 5  # per side, for the rank test
# numeric options: what is allowed, and the test (infinities and NaN are never allowed)
LIMITS = {
    "time_tolerance": ("a finite number >= 0", lambda x: x >= 0),
    "gross_slowdown": ("a finite number >= 1", lambda x: x >= 1),
    "alpha": ("a number in (0, 1]", lambda x: 0 < x <= 1),
    "quality_tolerance": ("a finite number >= 0", lambda x: x >= 0),
}


@dataclass
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


def is_timing(key: str) -> bool:
    return "iqr" not in key and key.endswith(("_ms", "_ms_median", "_ms_per_token"))


def iqr_of(metrics: dict[str, Any], key: str) -> Optional[float]:
    for k in (key.replace("_ms", "_iqr_ms", 1), key.replace("_median", "_iqr"), f"{key}_iqr"):
        if k != key and isinstance(metrics.get(k), (int, float)):
            return metrics[k]
    return None


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pick(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest ok record of several for one run (the newest of all if none is ok)."""
    ok = [r for r in recs if r.get("status") == "ok"]
    return records.newest(ok or recs)


def index(recs: list[dict[str, Any]], key: Any) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(key(r), []).append(r)
    return {k: pick(v) for k, v in groups.items()}


def match(base: list[dict], cur: list[dict]) -> tuple[list[tuple[dict, dict, str]], list[dict], list[dict]]:
    """Pairs (baseline, current, how), the unmatched baseline runs and the unmatched current runs."""
    b_hash, c_hash = index(base, lambda r: r.get("config_hash")), index(cur, lambda r: r.get("config_hash"))
    pairs = [(b_hash[h], c_hash[h], "config hash") for h in b_hash if h in c_hash]
    rest_b = [r for h, r in b_hash.items() if h not in c_hash]
    loose: dict[str, list[dict]] = {}
    for h, r in c_hash.items():
        if h not in b_hash:
            loose.setdefault(records.loose_key(r), []).append(r)
    missing = []
    for b in rest_b:
        candidates = loose.get(records.loose_key(b)) or []
        if not candidates:
            missing.append(b)
            continue
        # of several, the one whose config differs from the baseline's in the fewest keys
        c = min(candidates, key=lambda r: len(records.config_diff(b, r)))
        candidates.remove(c)
        pairs.append((b, c, "method/model/task/method settings"))
    return pairs, missing, [r for rs in loose.values() for r in rs]


def run_name(rec: dict[str, Any]) -> str:
    extra = " ".join(
        f"{k}={v}"
        for k, v in sorted(records.method_settings(rec).items())
        if k in ("rank", "variant", "num_virtual_tokens")
    )
    return f"{rec.get('method')}{' ' + extra if extra else ''}/{rec.get('model')}/{rec.get('task')}"


def mann_whitney_p(base: list[float], cur: list[float]) -> Optional[float]:
    """One-sided p-value that ``cur`` tends to be larger (slower) than ``base``."""
    if len(base) < MIN_SAMPLES or len(cur) < MIN_SAMPLES:
        return None
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(cur, base, alternative="greater").pvalue)


class Comparer:
    """Holds the thresholds; ``pair`` turns one matched pair into rows."""

    def __init__(self, a: argparse.Namespace):
        self.a = a

    def pair(self, b: dict[str, Any], c: dict[str, Any]) -> list[Row]:
        name = run_name(b)
        if c.get("status") != "ok":
            return [
                Row(
                    name,
                    "status",
                    b.get("status"),
                    c.get("status"),
                    "",
                    "FAIL" if b.get("status") == "ok" else "warn",
                    str(c.get("error") or ""),
                )
            ]
        if b.get("status") != "ok":
            return [Row(name, "status", b.get("status"), c.get("status"), "", "better")]
        bm, cm = b["metrics"], c["metrics"]
        both_cpu = records.recorded_device_type(b) == "cpu" and records.recorded_device_type(c) == "cpu"
        rows = []
        if b.get("base_weights_sha256") and c.get("base_weights_sha256"):
            same = b["base_weights_sha256"] == c["base_weights_sha256"]
            rows.append(
                Row(
                    name,
                    "base_weights_sha256",
                    b["base_weights_sha256"][:12],
                    c["base_weights_sha256"][:12],
                    "",
                    "same" if same else "FAIL",
                    "" if same else "the base model's weights differ",
                )
            )
        for key in sorted(set(bm) | set(cm)):
            if is_exact(key, both_cpu):
                rows += self.exact(name, key, bm.get(key), cm.get(key))
            elif key in QUALITY:
                rows += self.quality(name, key, bm.get(key), cm.get(key))
        same_device = records.recorded_device(b) == records.recorded_device(c)
        if not same_device:
            rows.append(
                Row(
                    name,
                    "timing",
                    records.recorded_device(b),
                    records.recorded_device(c),
                    "",
                    "note",
                    "different devices: timings not compared",
                )
            )
            return rows
        parallel = records.launched_in_parallel(b) or records.launched_in_parallel(c)
        for key in sorted(k for k in set(bm) & set(cm) if is_timing(k)):
            samples = (
                (b.get("train_step_ms"), c.get("train_step_ms")) if key == "train_step_ms_median" else (None, None)
            )
            rows += self.timing(name, key, bm[key], cm[key], iqr_of(bm, key), iqr_of(cm, key), samples, parallel)
        rows += self.grid(name, b, c, parallel)
        return rows

    def exact(self, name: str, key: str, bv: Any, cv: Any) -> list[Row]:
        if bv is None and cv is None:
            return []
        if bv is None or cv is None:
            return [Row(name, key, bv, cv, "", "changed", "present on one side only")]
        if bv == cv:
            return [Row(name, key, bv, cv, "", "same")]
        change = f"{cv - bv:+,}" if _num(bv) and _num(cv) else ""
        return [Row(name, key, bv, cv, change, "FAIL", "exact figure changed")]

    def quality(self, name: str, key: str, bv: Any, cv: Any) -> list[Row]:
        if not (_num(bv) and _num(cv)):
            return [] if bv is None and cv is None else [Row(name, key, bv, cv, "", "warn", "not comparable")]
        tol = self.a.quality_tolerance
        worse = (cv - bv) / abs(bv) if QUALITY[key] == "lower" and bv else bv - cv if QUALITY[key] == "higher" else 0.0
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
        if self.a.timing == "off" or not (_num(bv) and _num(cv)) or bv <= 0:
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
    pairs, missing, extra = match(base, cur)
    comparer = Comparer(a)
    rows: list[Row] = []
    for b, c, how in pairs:
        if how != "config hash":
            diff = records.config_diff(b, c)
            rows.append(
                Row(run_name(b), "matched by", how, "", "", "changed", "; ".join(diff[:6]) or "no config change")
            )
        rows += comparer.pair(b, c)
    for b in missing:
        rows.append(
            Row(
                run_name(b),
                "run",
                "present",
                "missing",
                "",
                "warn" if a.allow_missing else "FAIL",
                f"config {b.get('config_hash')} not in current",
            )
        )
    for c in extra:
        rows.append(Row(run_name(c), "run", "absent", "new", "", "changed", "not in baseline"))
    shown = rows if a.verbose else [r for r in rows if r.verdict != "same"]
    if shown:
        print_table(shown)
    fails = sum(r.verdict == "FAIL" for r in rows)
    warns = sum(r.verdict == "warn" for r in rows)
    status = "REGRESSION" if fails else "ok"
    print(
        f"peftbench.compare: {len(pairs)} run(s) matched, {len(missing)} missing, {len(extra)} new; "
        f"{sum(r.verdict == 'same' for r in rows)} figures unchanged, {fails} failing, {warns} warning(s): {status}"
    )
    return EXIT_REGRESSION if fails else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
