"""The tuned comparison (``python -m peftbench.tune``'s folders) read back and compared.

``load`` reads a comparison's selection records, its trials (the sensitivity of the validation
objective to the learning rate) and its final records (each method at its chosen rate, one
record per seed, on the test split). ``compare`` puts the methods side by side on the first
quality metric every final has (``aggregate.QUALITY_ORDER``): mean and standard error over
seeds, and, for an accuracy, a paired comparison of each method with the best from the
per-example predictions (the same test examples for every method): the difference with its 95%
interval and p-value (paired bootstrap over examples, seeds resampled per method,
``stats.paired_bootstrap``), Holm-adjusted over the methods compared with the best. For a loss
(the runs keep no per-example losses) the comparison is over seeds: Welch's t-test on each
seed's figure (``stats.welch``), which leaves out the test data's own sampling noise. A method
whose adjusted p is at least 0.05 is not distinguishable from the best. Figures from different
splits or example sets are never compared: such a comparison is refused with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from peftbench.records import reader
from peftbench.report.aggregate import QUALITY_ORDER, pareto
from peftbench.stats import Difference, OverSeeds, Spread, holm, paired_bootstrap, welch
from peftbench.tasks import answers

ALPHA = 0.05
TRIALS, SELECTION, FINAL = "trials", "selection", "final"  # the folders of peftbench.tune.plan


@dataclass
class Tuned:
    """One comparison as read from disk: per method, its selection record, its trial records
    and its final records (ok, at the selected rate, one per seed)."""

    root: Path
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    trials: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    finals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """One method of the comparison."""

    method: str
    lr: Optional[float]
    at_edge: Optional[str]
    trials: int
    metric: Optional[str]
    spread: Optional[Spread]
    examples: Optional[int]
    split: Optional[str]
    paired: Optional[Difference] = None  # against the best (Paired or OverSeeds); None for the best itself
    p_holm: Optional[float] = None

    @property
    def distinguishable(self) -> Optional[bool]:
        """Whether the method is worse than the best beyond the noise (None: not tested)."""
        return None if self.p_holm is None else self.p_holm < ALPHA


def _records(folder: Path) -> list[dict[str, Any]]:
    return reader.load(sorted(folder.glob("*.json"))).records if folder.is_dir() else []


def load(root: str | Path) -> Tuned:
    """The comparison under ``root`` (``selection``, ``trials``, ``final``)."""
    root = Path(root)
    out = Tuned(root)
    folder = root / SELECTION
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        sel = json.loads(p.read_text())
        if sel.get("kind") == "lr-selection":
            out.selections[sel["method"]] = sel
    trials, finals = _records(root / TRIALS), _records(root / FINAL)
    for m, sel in out.selections.items():
        ids = {t["run_id"] for t in sel["trials"] if t.get("run_id")}
        out.trials[m] = sorted((r for r in trials if r.get("run_id") in ids), key=lambda r: r.get("train_lr") or 0)
        lr, seeds = sel.get("selected_lr"), set(sel.get("seeds", []))
        mine = [
            r
            for r in finals
            if r.get("status") == "ok"
            and r.get("method") == m
            and r.get("train_lr") == lr
            and r.get("config", {}).get("seed") in seeds
        ]
        by_seed: dict[Any, dict[str, Any]] = {}
        for r in sorted(mine, key=reader.stamp):  # the newest record of each seed
            by_seed[r["config"]["seed"]] = r
        out.finals[m] = [by_seed[s] for s in sorted(by_seed)]
    return out


def eval_set(rec: dict[str, Any]) -> tuple[Any, ...]:
    """What a record's quality figures were measured on: the data, split and examples."""
    task = rec.get("config", {}).get("task", {})
    m = rec.get("metrics", {})
    return (
        task.get("path"),
        task.get("eval_split"),
        task.get("num_eval"),
        m.get("eval_examples"),
        m.get("eval_generate_examples"),
    )


def metric_of(t: Tuned) -> Optional[str]:
    """The first metric of ``QUALITY_ORDER`` every final record of every method has."""
    recs = [r for rs in t.finals.values() for r in rs]
    for key in QUALITY_ORDER:
        if recs and all(isinstance(r["metrics"].get(key), (int, float)) for r in recs):
            return key
    return None


def correct(rec: dict[str, Any], metric: str, folder: Path) -> Optional[list[float]]:
    """Per test example, 1.0 if the run got it right by ``metric`` else 0.0, from the record's
    predictions file; None without one."""
    name = rec.get("predictions_file")
    if not name or not (folder / name).is_file():
        return None
    rows = [json.loads(line)["final"] for line in (folder / name).read_text().splitlines() if line.strip()]
    task = rec["config"]["task"]
    if metric == "eval_accuracy":
        return [float(r["predicted"] == r["reference"]) for r in rows]
    extract = answers.rule(task.get("answer_rule", "exact"), task.get("answer_regex"))
    field_ = {"eval_generate_accuracy": "generated", "eval_choice_accuracy": "chosen"}[metric]
    return [
        float(r[field_] is not None and extract(r[field_]) == extract(r["reference"]) and extract(r["reference"]) != "")
        for r in rows
    ]


def compare(t: Tuned, resamples: int = 10_000) -> tuple[list[Row], Optional[str]]:
    """The rows of the comparison, best first, and why the paired comparison was not made (None
    when it was)."""
    metric = metric_of(t)
    sets = {eval_set(r) for rs in t.finals.values() for r in rs}
    why = None
    if len(sets) > 1:
        why = "the final runs were evaluated on different splits or example sets: not compared"
        metric = None
    lower = metric is not None and not metric.endswith("_accuracy")
    base: dict[str, Row] = {}
    for m, sel in t.selections.items():
        finals = t.finals.get(m, [])
        spread = Spread.of([float(r["metrics"][metric]) for r in finals]) if metric and finals else None
        m0 = finals[0]["metrics"] if finals else {}
        base[m] = Row(
            m,
            sel.get("selected_lr"),
            sel.get("at_edge"),
            sum(1 for x in sel["trials"] if x["objective"] is not None),
            metric,
            spread,
            m0.get("eval_generate_examples") or m0.get("eval_examples"),
            finals[0]["config"]["task"].get("eval_split") if finals else None,
        )
    ranked = sorted(
        base.values(), key=lambda r: (r.spread is None, (1 if lower else -1) * (r.spread.mean if r.spread else 0))
    )
    if not ranked or ranked[0].spread is None or metric is None:
        return ranked, why or "no final records"
    if not metric.endswith("_accuracy"):  # no per-example scores: over seeds
        best_values = [float(r["metrics"][metric]) for r in t.finals[ranked[0].method]]
        tests = {
            r.method: welch([float(x["metrics"][metric]) for x in t.finals[r.method]], best_values)
            for r in ranked[1:]
            if r.spread is not None
        }
        over = {m: w for m, w in tests.items() if w is not None}
        adjusted = holm({m: w.p for m, w in over.items()}) if over else {}
        rows = [ranked[0]] + [
            Row(**{**r.__dict__, "paired": over.get(r.method), "p_holm": adjusted.get(r.method)}) for r in ranked[1:]
        ]
        return rows, why or (None if len(over) == len(tests) else f"{metric}: a method with one seed, not compared")
    folder = t.root / FINAL
    found = {r.method: [correct(rec, metric, folder) for rec in t.finals[r.method]] for r in ranked if r.spread}
    if any(c is None for cs in found.values() for c in cs):
        return ranked, "a final record has no predictions file: not compared"
    matrices = {m: [c for c in cs if c is not None] for m, cs in found.items()}
    best = ranked[0].method
    paired = {
        r.method: paired_bootstrap(matrices[r.method], matrices[best], resamples=resamples)
        for r in ranked[1:]
        if r.spread is not None
    }
    adjusted = holm({m: p.p for m, p in paired.items()}) if paired else {}
    rows = [ranked[0]] + [
        Row(**{**r.__dict__, "paired": paired.get(r.method), "p_holm": adjusted.get(r.method)}) for r in ranked[1:]
    ]
    return rows, why


def wall_line(t: Tuned) -> Optional[str]:
    """The comparison's wall time: the sum of its trials' and finals' ``wall_s`` (seconds), or
    None when no record has one."""
    trials = [r.get("wall_s") for rs in t.trials.values() for r in rs]
    finals = [r.get("wall_s") for rs in t.finals.values() for r in rs]
    tw = sum(x for x in trials if isinstance(x, (int, float)))
    fw = sum(x for x in finals if isinstance(x, (int, float)))
    if not tw and not fw:
        return None
    return (
        f"wall time: {len(trials)} trials {tw / 60:.1f} min, {len(finals)} finals {fw / 60:.1f} min, "
        f"{(tw + fw) / 60:.1f} min in all (the records' wall_s)"
    )


def notes(r: Row, first: bool) -> list[str]:
    """What the comparison says of row ``r`` (``first``: the best row): a rate at a grid edge, and
    where it stands against the best."""
    out = [f"best rate at the {r.at_edge} edge of the grid: widen the grid"] if r.at_edge else []
    if r.distinguishable is False:
        out.append("not distinguishable from the best")
    elif r.distinguishable:
        out.append("worse than the best")
    elif first and r.spread is not None:
        out.append("best")
    return out


def selection_line(sel: dict[str, Any]) -> str:
    """One line: the method, the rate chosen of those tried, and a flag at a grid edge."""
    tried = ", ".join(
        f"{x['lr']:.3g}: {'-' if x['objective'] is None else format(x['objective'], '.4g')}" for x in sel["trials"]
    )
    if sel.get("selected_lr") is None:
        return f"{sel['method']}: no trial gave a finite {sel['objective']} ({tried}); nothing selected"
    edge = f"; at the {sel['at_edge']} rate tried: widen the grid" if sel.get("at_edge") else ""
    return (
        f"{sel['method']}: lr {sel['selected_lr']:.3g} selected on validation {sel['objective']} "
        f"({sel['direction']} is better; {tried}){edge}"
    )


def how(rows: list[Row]) -> str:
    """How the rows were compared with the best, in words."""
    if any(isinstance(r.paired, OverSeeds) for r in rows):
        return (
            "over seeds (Welch's t-test on each seed's figure, 95% interval; the runs keep no per-example "
            "losses, so the test data's own sampling noise is not in it), p-values Holm-adjusted over the "
            "methods compared with the best"
        )
    return (
        "example by example (paired bootstrap over examples and seeds, 95% interval), p-values Holm-adjusted "
        "over the methods compared with the best"
    )


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def text(t: Tuned) -> str:
    """The comparison as a plain-text table, with what it is measured on and how."""
    rows, why = compare(t)
    if not rows:
        return "TUNED COMPARISON: no selection records"
    metric = next((r.metric for r in rows if r.metric), None)
    lines = [
        f"TUNED COMPARISON ({t.root}): test {metric or 'quality'} over seeds, each method at its rate "
        "chosen on validation"
    ]
    lines.append(
        f"  {'method':10s} {'lr':>9s} {'trials':>6s} {'mean':>7s} {'± se':>7s} {'seeds':>5s} "
        f"{'vs best':>8s} {'95% CI':>17s} {'p (Holm)':>9s}  note"
    )
    for r in rows:
        s = r.spread
        ci = f"[{r.paired.low:+.3f}, {r.paired.high:+.3f}]" if r.paired else ""
        note = notes(r, r is rows[0])
        diff = _fmt(r.paired.diff if r.paired else None, "+.3f")
        lines.append(
            f"  {r.method:10s} {_fmt(r.lr, '.3g'):>9s} {r.trials:6d} {_fmt(s.mean if s else None):>7s} "
            f"{_fmt(s.se if s else None):>7s} {s.n if s else 0:5d} {diff:>8s} "
            f"{ci:>17s} {_fmt(r.p_holm, '.3g'):>9s}  {'; '.join(note)}"
        )
    ex = next((r for r in rows if r.examples), None)
    if ex:
        lines.append(f"  measured on {ex.examples} {ex.split} examples; {how(rows)}")
    if why:
        lines.append(f"  {why}")
    wall = wall_line(t)
    if wall:
        lines.append(f"  {wall}")
    return "\n".join(lines)


def markdown(t: Tuned, out: Path) -> list[str]:
    """The report's "Tuned comparison" section: the comparison table, each method's selection
    and the sensitivity plot (validation objective against the learning rate)."""
    rows, why = compare(t)
    lines = [f"## Tuned comparison: `{t.root}`", ""]
    if not rows:
        return [*lines, "No selection records.", ""]
    metric = next((r.metric for r in rows if r.metric), None)
    ex = next((r for r in rows if r.examples), None)
    where = f"{ex.examples} {ex.split} examples" if ex else "the test split"
    objective = next(iter(t.selections.values()))["objective"]
    lines += [
        f"Each method at its own learning rate, chosen on validation `{objective}` "
        f"from the trials' records; test `{metric}` over seeds on {where}, mean ± standard error; "
        f"compared with the best: {how(rows)}.",
        "",
        "| method | lr (chosen) | rates tried | test quality | seeds | vs best | 95% interval | p (Holm) | note "
        "| trainable params | peak train MiB | step ms | checkpoint MiB | forgetting KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.spread
        note = notes(r, r is rows[0])
        quality = f"{s.mean:.4f} ± {_fmt(s.se, '.4f')}" if s else "-"
        ci = f"[{r.paired.low:+.4f}, {r.paired.high:+.4f}]" if r.paired else ""
        diff = f"{r.paired.diff:+.4f}" if r.paired else ""
        cost = costs(t.finals.get(r.method, []))
        lines.append(
            f"| {r.method} | {_fmt(r.lr, '.3g')} | {r.trials} | {quality} | {s.n if s else 0} | {diff} | {ci} "
            f"| {_fmt(r.p_holm, '.3g')} | {'; '.join(note)} | {cost} |"
        )
    if why:
        lines += ["", why]
    wall = wall_line(t)
    if wall:
        lines += ["", wall[0].upper() + wall[1:] + "."]
    lines += ["", "Selections (validation):", ""]
    lines += [f"- {selection_line(sel)}" for sel in t.selections.values()]
    plot = sensitivity_plot(t, out)
    if plot:
        lines += ["", f"![validation objective against the learning rate]({plot})"]
    for title, name in pareto_plots(t, rows, out):
        lines += ["", f"![{title}]({name})"]
    lines += compute_matched_table(t)
    for title, name in curve_plots(t, out):
        lines += ["", f"![{title}]({name})"]
    return [*lines, ""]


def costs(finals: list[dict[str, Any]]) -> str:
    """The cost and forgetting cells of a method's row: trainable parameters, peak training
    memory (MiB), median step time (ms) and checkpoint size (MiB), the means over its seeds; the
    forgetting KL (nats/token) as mean ± std over seeds; "-" where not measured."""

    def mean(key: str) -> Optional[float]:
        vals = [float(r["metrics"][key]) for r in finals if isinstance(r["metrics"].get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    def mib(key: str) -> str:
        v = mean(key)
        return "-" if v is None else f"{v / 2**20:,.1f}"

    params = mean("trainable_params")
    kl = [float(r["metrics"]["forgetting_kl"]) for r in finals if isinstance(r["metrics"].get("forgetting_kl"), float)]
    forgetting = "-" if not kl else Spread.of(kl).text()
    return " | ".join(
        [
            "-" if params is None else f"{params:,.0f}",
            mib("peak_memory_bytes"),
            _fmt(mean("train_step_ms_median"), ",.0f"),
            mib("checkpoint_bytes"),
            forgetting,
        ]
    )


def sensitivity_plot(t: Tuned, out: Path) -> Optional[str]:
    """Validation objective against the learning rate (log scale), one line per method, the
    chosen rate circled; the file name under ``out``, or None without two finite trials."""
    import matplotlib.pyplot as plt  # heavy: only when a report has a tuned comparison

    series = {
        m: [(x["lr"], x["objective"]) for x in sel["trials"] if x["objective"] is not None]
        for m, sel in t.selections.items()
    }
    if not any(len(v) >= 2 for v in series.values()):
        return None
    objective = next(iter(t.selections.values()))["objective"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, pts in series.items():
        if not pts:
            continue
        xs, ys = zip(*sorted(pts))
        (line,) = ax.plot(xs, ys, marker="o", label=m)
        chosen = t.selections[m].get("selected_lr")
        for x, y in pts:
            if x == chosen:
                ax.plot([x], [y], marker="o", markersize=12, fillstyle="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {objective}")
    ax.set_title("Sensitivity to the learning rate (chosen rate circled)")
    ax.legend()
    fig.tight_layout()
    name = f"tuned-sensitivity-{t.root.name}.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def mean_of(finals: list[dict[str, Any]], value: Any) -> Optional[float]:
    """The mean over the final records of ``value(record)`` where it is a number, else None."""
    vals = [v for v in (value(r) for r in finals) if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def train_seconds(rec: dict[str, Any]) -> Optional[float]:
    """A run's training seconds: median step ms x steps / 1000 (as the report's other tables)."""
    ms = rec["metrics"].get("train_step_ms_median")
    steps = (rec.get("config") or {}).get("train", {}).get("steps")
    return ms * steps / 1000 if isinstance(ms, (int, float)) and isinstance(steps, int) and steps > 0 else None


def pareto_plots(t: Tuned, rows: list[Row], out: Path) -> list[tuple[str, str]]:
    """Test quality (mean over seeds, standard-error bars) against peak training memory (MiB)
    and against training time (s), one point per method, the Pareto front joined; (title, file
    name) of each plot made (none without two methods with both figures)."""
    import matplotlib.pyplot as plt  # heavy: only when a report has a tuned comparison

    made = []
    axes = (
        ("peak training memory (MiB)", "memory", lambda r: (r["metrics"].get("peak_memory_bytes") or math.nan) / 2**20),
        ("training time (s)", "time", train_seconds),
    )
    for xlabel, slug, value in axes:
        pts = []
        for r in rows:
            x = mean_of(t.finals.get(r.method, []), value)
            if x is not None and r.spread is not None:
                se = r.spread.se if math.isfinite(r.spread.se) else 0.0
                pts.append((r.method, x, r.spread.mean, se))
        if len(pts) < 2:
            continue
        metric = rows[0].metric or "quality"
        higher = metric.endswith("_accuracy")
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, x, y, se in pts:
            ax.errorbar([x], [y], yerr=[se], marker="o", capsize=3, label=m)
        front = sorted((pts[i] for i in pareto([(p[1], p[2]) for p in pts], higher)), key=lambda p: p[1])
        ax.plot([p[1] for p in front], [p[2] for p in front], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric} (± se over seeds)")
        ax.set_title(f"Tuned: quality against {xlabel.split(' (')[0]} (Pareto front dashed)")
        ax.legend()
        fig.tight_layout()
        name = f"tuned-pareto-{slug}-{t.root.name}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        made.append((f"quality against {xlabel}", name))
    return made


@dataclass(frozen=True)
class Curve:
    """A method's learning curve, each point the mean over its seeds' curves (points at the same
    step): steps, training FLOPs and seconds so far, and the eval loss."""

    method: str
    split: str
    examples: int
    steps: list[int]
    flops: list[float]
    seconds: list[float]
    loss: list[float]
    seeds: int


def curves(t: Tuned) -> list[Curve]:
    """The learning curves of the finals, one per method whose every final has one, at the same
    steps, with FLOPs and seconds at each point."""
    out = []
    for m, finals in t.finals.items():
        got: list[dict[str, Any]] = [r.get("learning_curve") or {} for r in finals]
        pts = [c.get("points") or [] for c in got]
        if not finals or not all(pts):
            continue
        steps = [p["step"] for p in pts[0]]
        if any([p["step"] for p in ps] != steps for ps in pts):
            continue
        cols: dict[str, list[float]] = {}
        for key in ("train_flops", "train_s", "eval_loss"):
            vals = [[ps[i][key] for ps in pts] for i in range(len(steps))]
            if any(v is None for row in vals for v in row):
                break
            cols[key] = [sum(row) / len(row) for row in vals]
        if len(cols) < 3:
            continue
        split, examples = got[0]["split"], got[0]["examples"]
        out.append(
            Curve(m, split, examples, steps, cols["train_flops"], cols["train_s"], cols["eval_loss"], len(finals))
        )
    return out


def at_budget(xs: list[float], ys: list[float], budget: float) -> Optional[float]:
    """``ys`` at ``budget`` on the x axis, linearly between the points around it (exact at a
    point); None below the first point, where the curve says nothing."""
    if not xs or budget < xs[0]:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= budget <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
    return ys[-1] if budget >= xs[-1] else None


Matched = tuple[Curve, float, Optional[float], Optional[float]]


def compute_matched(t: Tuned) -> tuple[Optional[float], Optional[float], list[Matched]]:
    """The budgets (training FLOPs and seconds of the cheapest method's final step) and per
    method: its curve, its eval loss at its last step (the same steps for every method) and at
    each budget."""
    cs = curves(t)
    if not cs:
        return None, None, []
    flops = min(c.flops[-1] for c in cs)
    seconds = min(c.seconds[-1] for c in cs)
    return (
        flops,
        seconds,
        [(c, c.loss[-1], at_budget(c.flops, c.loss, flops), at_budget(c.seconds, c.loss, seconds)) for c in cs],
    )


def compute_matched_table(t: Tuned) -> list[str]:
    """The "same compute" table of the tuned section (nothing without learning curves)."""
    flops, seconds, rows = compute_matched(t)
    if not rows or flops is None or seconds is None:
        return []
    c0 = rows[0][0]
    lines = [
        "",
        f"Quality at the same compute: the learning curve's eval loss ({c0.examples} {c0.split} examples, mean over "
        f"seeds) at the last step, and at the budget of the cheapest method's last step: {flops:.3g} training FLOPs "
        f"and {seconds:.1f} s of training (interpolated between the curve's points).",
        "",
        "| method | eval loss at the last step | at the same FLOPs | at the same seconds |",
        "|---|---|---|---|",
    ]
    for c, last, at_f, at_s in rows:
        lines.append(f"| {c.method} | {last:.4f} | {_fmt(at_f, '.4f')} | {_fmt(at_s, '.4f')} |")
    return lines


def curve_plots(t: Tuned, out: Path) -> list[tuple[str, str]]:
    """The learning curves against training FLOPs and against training seconds, one line per
    method; (title, file name) of each plot made."""
    import matplotlib.pyplot as plt  # heavy: only when a report has a tuned comparison

    cs = curves(t)
    if not cs:
        return []
    made = []
    for label, slug, axis in (("training FLOPs", "flops", "flops"), ("training seconds", "seconds", "seconds")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in cs:
            ax.plot(getattr(c, axis), c.loss, marker=".", label=c.method)
        ax.set_xlabel(label)
        ax.set_ylabel(f"eval loss ({cs[0].examples} {cs[0].split} examples)")
        ax.set_title(f"Learning curves against {label}")
        ax.legend()
        fig.tight_layout()
        name = f"tuned-curve-{slug}-{t.root.name}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        made.append((f"learning curves against {label}", name))
    return made
