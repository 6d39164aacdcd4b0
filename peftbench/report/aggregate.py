"""From run records to the report's numbers: pandas frames and plain data, no text and no plots.

``frame`` makes one row per record (what ``records.csv`` holds) with labels and ratios against
full fine-tuning; ``measured_groups`` splits the ok measured runs by (device, model, task);
``pool_seeds`` folds the runs that differ only in seed into one row with their spread over
seeds. The standard errors of a row's quality (``standard_error``, ``total_standard_error``)
decide which differences are within noise (``within_noise``, ``rank_studies``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import pandas as pd

from peftbench.compare import quality_direction
from peftbench.records import reader as records
from peftbench.stats import Spread, binomial_se, combined_se

MiB = 2**20
# the ``quality`` column: the first of these metrics that a record has
QUALITY_ORDER = ("eval_generate_accuracy", "eval_choice_accuracy", "eval_accuracy", "eval_loss")
# the number of eval examples behind an accuracy (its binomial standard error); accuracy by
# choice is scored on the same first ``task.num_generate`` examples as accuracy by generation
EXAMPLES = {"eval_generate_accuracy": "eval_generate_examples", "eval_choice_accuracy": "eval_generate_examples"}
# a group whose records have one of these gets the two instruction tables and the time plot
INSTRUCTION = ("eval_generate_accuracy", "eval_choice_accuracy")
# ratio column: the column it divides by the full fine-tuning run's
RATIOS = {
    "trainable_vs_full": "trainable_params",
    "memory_vs_full": "peak_bytes",
    "throughput_vs_full": "train_tokens_per_s",
    "latency_vs_full": "inference_latency_ms",
    "checkpoint_vs_full": "checkpoint_bytes",
}
# Config keys of the cost levers; a run's lever is named by those that differ from the default.
LEVER_KEYS = (
    "train.precision",
    "train.gradient_checkpointing",
    "train.grad_accum",
    "train.batch_size",
    "model.quantize",
)


# ---------------------------------------------------------------------------------- table
def row(rec: dict[str, Any]) -> dict[str, Any]:
    """One record as a flat row: identity, provenance, method settings, scalar metrics."""
    m = rec.get("metrics") or {}
    prov = rec.get("provenance") or {}
    out: dict[str, Any] = {
        "run_id": rec.get("run_id"),
        "kind": rec.get("kind", "measured"),
        "status": rec.get("status"),
        "error": rec.get("error"),
        "method": rec.get("method"),
        "model": rec.get("model"),
        "task": rec.get("task"),
        "device": records.recorded_device(rec),
        "device_type": records.recorded_device_type(rec),
        "config_hash": rec.get("config_hash"),
        "git_sha": (prov.get("git_sha") or "")[:10] or None,
        "timestamp": prov.get("timestamp"),
        "parallel_launcher": records.launched_in_parallel(rec),
        "train_steps": ((rec.get("config") or {}).get("train") or {}).get("steps"),
        "eval_set": eval_set(rec),
        "path": rec.get("_path"),
    }
    out.update({f"method.{k}": v for k, v in records.method_settings(rec).items() if k != "name"})
    out.update({k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None})
    out["peak_bytes"] = m.get("peak_memory_bytes")
    if rec.get("phase_s"):  # where the wall time went (records from before phases were timed have none)
        out["wall_s"] = rec.get("wall_s")
        out.update({f"phase_{k}_s": v for k, v in rec["phase_s"].items()})
    out.update(throughput_quartiles(m, rec.get("train_step_ms")))
    key = next((k for k in QUALITY_ORDER if m.get(k) is not None), None)
    if key:
        out["quality"], out["quality_metric"] = m[key], f"{key} ({quality_direction(key)} is better)"
    return out


def eval_set(rec: dict[str, Any]) -> Optional[str]:
    """What a record's quality figures were measured on, in words: the eval split and the number
    of examples (and of generated examples, where fewer); None for a record without eval figures."""
    m = rec.get("metrics") or {}
    n = m.get("eval_examples")
    if n is None:
        return None
    split = (((rec.get("config") or {}).get("task") or {}).get("eval_split")) or "eval"
    gen = m.get("eval_generate_examples")
    return f"{split}, {n} examples" + (f" ({gen} generated)" if gen is not None and gen != n else "")


def throughput_quartiles(m: dict[str, Any], steps: Any) -> dict[str, float]:
    """``train_tokens_per_s_q25`` and ``_q75`` (tokens/s): the median -/+ half the recorded IQR,
    else from the per-step times ``steps`` (ms; tokens per step taken as constant); {} when
    neither is known."""
    if m.get("train_tokens_per_s") and m.get("train_tokens_per_s_iqr") is not None:
        half = m["train_tokens_per_s_iqr"] / 2
        return {
            "train_tokens_per_s_q25": m["train_tokens_per_s"] - half,
            "train_tokens_per_s_q75": m["train_tokens_per_s"] + half,
        }
    if isinstance(steps, list) and len(steps) >= 2 and m.get("train_tokens_per_s"):
        q = pd.Series(steps, dtype=float).quantile([0.25, 0.75])
        scale = m["train_tokens_per_s"] * (m.get("train_step_ms_median") or q.mean())
        return {"train_tokens_per_s_q25": scale / q[0.75], "train_tokens_per_s_q75": scale / q[0.25]}
    return {}


def frame(recs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record (``row``), labelled (``labels``), with ratios against full fine-tuning."""
    df = pd.DataFrame([row(r) for r in recs])
    if df.empty:
        return df
    df["label"] = labels(df, recs)
    return add_ratios(df)


def labels(df: pd.DataFrame, recs: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> pd.Series:
    """The method, plus the config keys that tell its runs apart within their (device, model,
    task) group (``lora rank=4``, ``adapter variant=pfeiffer``, ``full train.lr=0.001``);
    ``recs[i]`` is the record of row ``i``, and keys starting with ``ignore`` are left out."""
    out = df["method"].astype(str).copy()
    configs = [records.flat(r.get("config") or {}) for r in recs]
    ignore = ("results_dir", "force", "objective", "method.name", *ignore)
    for _, g in df.groupby(["device", "model", "task", "method"], dropna=False):
        cfgs = {i: configs[i] for i in g.index}
        keys = sorted({k for c in cfgs.values() for k in c if not k.startswith(ignore)})
        varying = [k for k in keys if len({repr(c.get(k)) for c in cfgs.values()}) > 1]
        if "rank" in varying and "method.rank" in varying:
            varying.remove("rank")  # the interpolated top-level key behind method.rank
        for i, c in cfgs.items():
            extra = " ".join(f"{k.removeprefix('method.')}={c.get(k)}" for k in varying)
            out[i] = f"{out[i]} {extra}".strip()
    return out


def add_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Ratios against the full fine-tuning run of the same device, model and task."""
    df = df.copy()
    for col in RATIOS:
        df[col] = float("nan")
    ok = (df["status"] == "ok") & (df["kind"] == "measured")
    for _, g in df[ok].groupby(["device", "model", "task"], dropna=False):
        full = g[g["method"] == "full"]
        if full.empty:
            continue
        ref = full.sort_values("run_id").iloc[-1]
        for col, base in RATIOS.items():
            if base in g and pd.notna(ref.get(base)) and ref.get(base):
                df.loc[g.index, col] = g[base] / ref[base]
    return df


def newest_per_config(df: pd.DataFrame) -> pd.DataFrame:
    """The newest record (by run id) of each config on each device."""
    return df.sort_values("run_id").drop_duplicates(["config_hash", "device"], keep="last")


def measured_groups(df: pd.DataFrame) -> Iterable[tuple[tuple[Any, Any, Any], pd.DataFrame]]:
    """The ok measured runs, newest of each config on each device, grouped by (device, model,
    task): iterating yields ``((device, model, task), rows)``."""
    measured = newest_per_config(df[(df["kind"] == "measured") & (df["status"] == "ok")])
    return measured.groupby(["device", "model", "task"], dropna=False)


def failed_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The records whose status is not ok, in load order."""
    return df[df["status"] != "ok"]


def estimates(df: pd.DataFrame) -> pd.DataFrame:
    """The ok estimates (``kind: estimate``), newest of each config."""
    return newest_per_config(df[(df["kind"] == "estimate") & (df["status"] == "ok")])


def latency_frame(recs: list[dict[str, Any]]) -> pd.DataFrame:
    """The latency grids of all records, long form (what ``latency.csv`` holds): one row per
    point, with the run's id, method, model, task and device."""
    return pd.DataFrame(
        [
            {
                "run_id": r["run_id"],
                "method": r["method"],
                "model": r["model"],
                "task": r["task"],
                "device": records.recorded_device(r),
                **p,
            }
            for r in recs
            for p in records.latency_points(r)
        ]
    )


def latency_points(g: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The latency grid points of the rows of ``g``, each with its row's label."""
    return pd.DataFrame(
        [{**p, "label": r["label"]} for _, r in g.iterrows() for p in records.latency_points(by_id[r["run_id"]])]
    )


def ordered(g: pd.DataFrame) -> pd.DataFrame:
    """Full first, then by method, rank (numerically) and label."""
    keys = g.assign(_full=g["method"] != "full", _rank=g["method.rank"] if "method.rank" in g else 0)
    return g.loc[keys.sort_values(["_full", "method", "_rank", "label"]).index]


def has_instruction_metrics(g: pd.DataFrame) -> bool:
    """Whether some row of ``g`` has accuracy by generation or by choice (``INSTRUCTION``)."""
    return any(k in g and g[k].notna().any() for k in INSTRUCTION)


def train_seconds(g: pd.DataFrame) -> pd.Series:
    """Seconds per training run: median step ms x ``config.train.steps`` / 1000 (NaN without
    steps or a step time). Warm-up and memory-tracked steps are counted at the median too."""
    if "train_step_ms_median" not in g or "train_steps" not in g:
        return pd.Series(float("nan"), index=g.index)
    steps = pd.to_numeric(g["train_steps"], errors="coerce")
    return g["train_step_ms_median"] * steps.where(steps > 0) / 1000


def pareto(points: list[tuple[float, float]], higher_better: bool) -> list[int]:
    """Indices of the points (cost, quality) that no other point beats on both."""
    front = []
    for i, (m, q) in enumerate(points):
        beaten = any((m2 <= m and (q2 >= q if higher_better else q2 <= q)) and (m2, q2) != (m, q) for m2, q2 in points)
        if not beaten:
            front.append(i)
    return front


def comparable_quality(g: pd.DataFrame, col: str) -> tuple[Optional[str], pd.DataFrame]:
    """The group's first metric of ``QUALITY_ORDER`` that some row's quality is, and the rows
    whose quality is that metric and that have column ``col`` (a cost to plot it against)."""
    keys = pd.Series([quality_key(r) for _, r in g.iterrows()], index=g.index, dtype=object)
    key = next((k for k in QUALITY_ORDER if (keys == k).any()), None)
    return key, g[(keys == key) & g[col].notna() & g["quality"].notna()]


# ------------------------------------------------------------------------ seeds and noise
def pool_seeds(g: pd.DataFrame, by_id: dict[str, dict[str, Any]], before_after: Iterable[str] = ()) -> pd.DataFrame:
    """The rows of one (device, model, task) group with the runs that differ only in seed
    (``records.seed_free_key``) pooled into one row each (``pooled``); labels, ratios and the
    order are then taken again, without the seed. A group where no two runs differ only in
    seed is returned as it is. ``before_after``: the metrics shown before and after training,
    whose spread is kept with that of the quality metrics."""
    keys = g["run_id"].map(lambda i: records.seed_free_key(by_id[i]))
    if keys.nunique() == len(g):
        return g
    shown = tuple(before_after)
    spread_keys = set(shown) | {f"{k}_initial" for k in shown}
    parts = [pooled(s, by_id, spread_keys) for _, s in g.groupby(keys, sort=False)]
    out = pd.concat(parts, ignore_index=True)
    out["label"] = labels(out, [by_id[i] for i in out["run_id"]], ignore=("seed",))
    return ordered(add_ratios(out))


def pooled(s: pd.DataFrame, by_id: dict[str, dict[str, Any]], spread_keys: set[str]) -> pd.DataFrame:
    """One row for the runs in ``s`` (one per seed, the newest if a seed has several): the
    newest run's identity (its run id names the row; the latency plots show its grid), the
    mean of every numeric column, ``seeds`` (the seeds, in order), ``n_seeds``, and ``spread``:
    {metric: ``Spread``} over the runs that have it, for every quality metric and every metric
    of ``spread_keys``."""
    s = s.assign(_seed=s["run_id"].map(lambda i: repr(records.run_seed(by_id[i]))))
    s = s.sort_values("run_id").drop_duplicates("_seed", keep="last").drop(columns="_seed")
    out = s.iloc[[-1]].copy()
    if len(s) == 1:
        return out.assign(seeds=str(records.run_seed(by_id[out["run_id"].iloc[0]])), n_seeds=1)
    for col in s.columns:
        if pd.api.types.is_numeric_dtype(s[col]) and not pd.api.types.is_bool_dtype(s[col]):
            out[col] = s[col].mean()
    out["parallel_launcher"] = bool(s["parallel_launcher"].any())
    runs = records.seed_groups(by_id[i] for i in s["run_id"])
    seeds = [records.run_seed(r) for rs in runs.values() for r in rs]
    out["seeds"] = ", ".join(str(x) for x in seeds)
    out["n_seeds"] = len(s)
    names = {k for i in s["run_id"] for k in by_id[i].get("metrics") or {}}
    metrics = sorted(k for k in names if quality_direction(k) or k in spread_keys)
    spread = {k: Spread.of(s[k].dropna().tolist()) for k in metrics if k in s and s[k].notna().any()}
    out["spread"] = pd.Series([spread], index=out.index, dtype=object)
    return out


def n_seeds(r: pd.Series) -> int:
    """The number of seeds pooled into row ``r`` (1 for a single run)."""
    return int(r["n_seeds"]) if pd.notna(r.get("n_seeds")) else 1


def row_seeds(r: pd.Series, by_id: dict[str, dict[str, Any]]) -> Any:
    """The seeds of row ``r``: those pooled into it (``"0, 1, 2"``), else its run's seed."""
    return r.get("seeds") if isinstance(r.get("seeds"), str) else records.run_seed(by_id[r["run_id"]])


def spreads(r: pd.Series) -> dict[str, Spread]:
    """{metric: ``Spread``} over the seeds pooled into row ``r``; {} for a single run."""
    spread = r.get("spread")
    return spread if isinstance(spread, dict) else {}


def quality_key(r: pd.Series) -> Optional[str]:
    """The metric behind the row's ``quality`` column (one of ``QUALITY_ORDER``)."""
    q = r.get("quality_metric")
    return q.split()[0] if isinstance(q, str) else None


def quality_columns(g: pd.DataFrame) -> list[str]:
    """The quality metrics some row of ``g`` has, sorted; figures taken before training
    (``_initial``) are not quality."""
    return sorted(c for c in g.columns if quality_direction(c) and not c.endswith("_initial") and g[c].notna().any())


def quality_spread(r: pd.Series) -> Optional[Spread]:
    """The spread of the row's quality over seeds, for a pooled row."""
    spread = r.get("spread")
    return spread.get(quality_key(r)) if isinstance(spread, dict) else None


def eval_set_se(r: pd.Series) -> Optional[float]:
    """For a row whose quality is an accuracy, the binomial sqrt(p (1 - p) / N) of the finite
    eval set, N from ``EXAMPLES`` (``eval_generate_examples`` for accuracy by generation or
    choice, else ``eval_examples``); None otherwise or when N is unknown."""
    key = quality_key(r)
    if key and key.endswith("_accuracy") and pd.notna(r.get("quality")):
        return binomial_se(float(r["quality"]), r.get(EXAMPLES.get(key, "eval_examples")))
    return None


def standard_error(r: pd.Series) -> Optional[float]:
    """The standard error of the row's quality: std / sqrt(n) over n >= 2 seeds; for a single
    accuracy with a known number of eval examples, the binomial ``eval_set_se``; else None
    (unknown)."""
    spread = quality_spread(r)
    if spread is not None and spread.n >= 2:
        return spread.se
    return eval_set_se(r)


def total_standard_error(r: pd.Series) -> Optional[float]:
    """The standard error of the row's quality counting both sources of noise, for judging one
    setting against another: the seeds' std / sqrt(n) (training randomness; 0 for a single run)
    and, for an accuracy, the finite eval set's binomial sqrt(p (1 - p) / N) (every seed is
    scored on the same N examples, so it does not shrink with n), combined as
    sqrt(se_seeds^2 + se_eval^2). None when neither is known."""
    spread = quality_spread(r)
    seeds = spread.se if spread is not None and spread.n >= 2 else None
    parts = [x for x in (seeds, eval_set_se(r)) if x is not None and math.isfinite(x)]
    return math.hypot(*parts) if parts else None


@dataclass(frozen=True)
class NoisePair:
    """Two rows (by label) whose quality, the same ``metric``, differs by ``diff`` (absolute),
    less than ``noise``: their standard errors combined."""

    a: str
    b: str
    metric: str
    diff: float
    noise: float


def within_noise(g: pd.DataFrame) -> list[NoisePair]:
    """Each two rows whose quality (same metric) differs by less than the noise: both rows'
    standard errors combined, sqrt(se1^2 + se2^2). Rows whose standard error is unknown are
    not judged."""
    rows = [(r, standard_error(r)) for _, r in g.iterrows()]
    judged = [(r, se) for r, se in rows if se is not None and math.isfinite(se) and pd.notna(r.get("quality"))]
    out = []
    for i, (a, se_a) in enumerate(judged):
        for b, se_b in judged[i + 1 :]:
            if quality_key(a) != quality_key(b):
                continue
            diff, noise = abs(float(a["quality"]) - float(b["quality"])), combined_se(se_a, se_b)
            if diff < noise:
                out.append(NoisePair(str(a["label"]), str(b["label"]), str(quality_key(a)), diff, noise))
    return out


# ------------------------------------------------------------------------------ rank study
@dataclass
class RankStudy:
    """One method run at several ranks, one row per rank (seeds pooled; sorted by rank) and
    nothing else varying. ``se``: each row's ``total_standard_error`` by row index. Of the rows
    whose standard error is known: ``best``, the index of the best quality; ``close``, the
    indices within noise of it (the best included), by rank; ``gap`` and ``noise``, each one's
    distance from the best and the two standard errors combined. ``best`` is None when no
    rank's standard error is known."""

    method: str
    metric: str
    rows: pd.DataFrame
    se: dict[Any, Optional[float]]
    best: Any = None
    close: list[Any] = field(default_factory=list)
    gap: dict[Any, float] = field(default_factory=dict)
    noise: dict[Any, float] = field(default_factory=dict)

    def rank(self, i: Any) -> int:
        return int(self.rows.loc[i, "method.rank"])

    def quality(self, i: Any) -> float:
        return float(self.rows.loc[i, "quality"])


def rank_studies(g: pd.DataFrame) -> list[RankStudy]:
    """A ``RankStudy`` for every method of ``g`` with a quality at two or more ranks, each
    rank once."""
    if "method.rank" not in g or "quality" not in g:
        return []
    out = []
    for method, s in g[g["method.rank"].notna() & g["quality"].notna()].groupby("method", sort=False):
        if s["method.rank"].nunique() < 2 or s["method.rank"].duplicated().any():
            continue
        out.append(rank_study(str(method), s.sort_values("method.rank")))
    return out


def rank_study(method: str, s: pd.DataFrame) -> RankStudy:
    """The study of ``method``'s rows ``s`` (sorted by rank): the best rank, and those whose
    quality differs from the best's by less than the two total standard errors combined
    (sqrt(se_r^2 + se_best^2))."""
    key = cast(str, quality_key(s.iloc[0]))  # every row with a quality names its metric
    ses = {i: total_standard_error(r) for i, r in s.iterrows()}
    judged = s[[ses[i] is not None for i in s.index]]
    if judged.empty:
        return RankStudy(method, key, s, ses)
    se = cast(dict[Any, float], ses)  # known for every judged row
    higher = quality_direction(key) != "lower"
    best = judged["quality"].idxmax() if higher else judged["quality"].idxmin()
    gap = {i: abs(float(judged.loc[i, "quality"]) - float(judged.loc[best, "quality"])) for i in judged.index}
    noise = {i: combined_se(se[i], se[best]) for i in judged.index}
    close = sorted((i for i in judged.index if gap[i] < noise[i]), key=lambda i: judged.loc[i, "method.rank"])
    return RankStudy(method, key, s, ses, best, close, gap, noise)


# ---------------------------------------------------------------------------------- levers
def lever_name(cfg: dict[str, Any]) -> str:
    """``fp32`` for the reference setting, else the levers pulled (``bf16-mixed + checkpointing``)."""
    parts = []
    if cfg.get("train.precision", "fp32") != "fp32":
        parts.append(str(cfg["train.precision"]))
    if cfg.get("train.gradient_checkpointing"):
        parts.append("checkpointing")
    if (cfg.get("train.grad_accum") or 1) > 1:
        parts.append(f"accumulation {cfg['train.grad_accum']} x {cfg.get('train.batch_size')}")
    if cfg.get("model.quantize"):
        parts.append(f"{cfg['model.quantize']} base")
    return " + ".join(parts) or "fp32"


def lever_rows(g: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> Optional[list[tuple[str, pd.Series, pd.Series]]]:
    """(lever name, row, reference row) for each run of ``g`` that has a reference: the run of
    the same method and settings with no lever pulled (fp32, no checkpointing, no accumulation,
    dense base) and the same effective batch; by method, the reference first, then by lever.
    None when the group holds no lever runs."""
    rows = []
    for _, r in g.iterrows():
        cfg = records.flat(by_id[r["run_id"]].get("config") or {})
        effective = (cfg.get("train.batch_size") or 0) * (cfg.get("train.grad_accum") or 1)
        rest = {k: v for k, v in cfg.items() if k not in LEVER_KEYS and k not in ("results_dir", "force")}
        rows.append((repr(sorted(rest.items())), effective, lever_name(cfg), r))
    refs = {(k, e): r for k, e, name, r in rows if name == "fp32"}
    if all(name == "fp32" for _, _, name, _ in rows):
        return None
    out = []
    for key, effective, name, r in sorted(rows, key=lambda t: (str(t[3]["method"]), t[2] != "fp32", t[2])):
        ref = refs.get((key, effective))
        if ref is not None:  # every fp32 run is its own reference
            out.append((name, r, ref))
    return out


def parallel_runs(g: pd.DataFrame, by_id: dict[str, dict[str, Any]]) -> list[tuple[pd.Series, dict[str, Any]]]:
    """(row, its record's ``parallel`` block) for the distributed runs of ``g``, by method,
    strategy and world size."""
    rows = [(r, by_id[r["run_id"]]["parallel"]) for _, r in g.iterrows() if by_id[r["run_id"]].get("parallel")]
    return sorted(rows, key=lambda t: (str(t[0]["method"]), t[1]["strategy"], t[1]["world_size"]))
