"""``python -m peftbench.estimate``: the app glue of the estimator. Its config schema and
checks, its record (``kind: "estimate"``), and the table it prints after a sweep, from the
records read back (jobs may run in other processes). The app layer (``peftbench.app``) does the
rest, as for the run command."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from peftbench import app
from peftbench import config as config_mod
from peftbench.config import ModelConfig, require
from peftbench.estimate.cost import ATTENTION, PRECISIONS, build, estimate

PROG = "peftbench.estimate"
MAX_TOKENS = 2**32  # per step: keeps every meta tensor's element count far below 2**63


@dataclass
class EstimateConfig:
    """Settings of one estimate.

    precision: fp32 | mixed | bf16 (bytes per element: see ``PRECISIONS``). batch_size /
    seq_length: examples and tokens per example of one training step. vocab_size: vocabulary
    of a preset whose ``arch`` does not fix one (the tiny models; the default task's word
    tokenizer size). attention: flash (a fused kernel saves q, k, v, output and log-sum-exp)
    or eager (the probabilities too, as in Korthikanti et al.). flops_attention: include the
    attention score/value products in ``train_flops_per_token``. rank: interpolated into
    methods that have one.
    """

    method: Any = MISSING
    model: ModelConfig = MISSING
    rank: int = 8
    precision: str = "mixed"
    batch_size: int = 1
    seq_length: int = 1024
    vocab_size: int = 1024
    attention: str = "flash"
    flops_attention: bool = True
    results_dir: str = "results/estimates"


config_mod.register_configs()
ConfigStore.instance().store(name="estimate_schema", node=EstimateConfig)


def check(cfg: Any) -> None:
    """Reject values that cannot work (one-line ``ConfigError``)."""
    config_mod.check_method(cfg)
    require(cfg.precision in PRECISIONS, "precision", cfg.precision, f"allowed: {', '.join(PRECISIONS)}")
    require(cfg.attention in ATTENTION, "attention", cfg.attention, f"allowed: {', '.join(ATTENTION)}")
    require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    require(cfg.seq_length >= 1, "seq_length", cfg.seq_length, "must be >= 1 token")
    require(
        cfg.batch_size * cfg.seq_length <= MAX_TOKENS,
        "batch_size",
        cfg.batch_size,
        f"batch_size x seq_length must be <= {MAX_TOKENS:,} tokens per step",
    )
    require(cfg.vocab_size >= 1, "vocab_size", cfg.vocab_size, "must be >= 1")
    require(bool(str(cfg.results_dir).strip()), "results_dir", repr(cfg.results_dir), "must be a folder path")
    require(
        cfg.model.name_or_path is not None or bool(cfg.model.arch),
        "model.arch",
        "{}",
        "needs model.arch (or set model.name_or_path to a folder with a config.json)",
    )


def new_record(cfg: Any) -> dict[str, Any]:
    """A record in the measured run's format, ``kind: "estimate"``; ``task`` is null."""
    from peftbench.records import writer

    return {
        **writer.new_record(cfg, kind="estimate", task=None),
        "assumptions": {
            "precision": cfg.precision,
            "optimizer": "AdamW",
            "batch_size": cfg.batch_size,
            "seq_length": cfg.seq_length,
            "attention": cfg.attention,
            "flops_attention": cfg.flops_attention,
            "recomputation": False,
            "peak": "weights + gradients + optimizer + activations, all live at once",
        },
    }


def execute(cfg: Any, rec: dict[str, Any]) -> None:
    """Estimate one config into ``rec`` (the device is meta: nothing is allocated)."""
    import torch

    from peftbench.records import writer

    rec["provenance"] = writer.provenance(torch.device("meta"))
    check(cfg)
    rec.update(estimate(cfg))


def human(n: Optional[float], unit: str = "B") -> str:
    """1234567 -> '1.23 MB' (decimal prefixes, as the papers use)."""
    if n is None:
        return "-"
    for prefix in ("", "k", "M", "G", "T", "P", "E"):
        if abs(n) < 1000 or prefix == "E":
            return f"{n:.3g} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return str(n)


COLUMNS = (
    ("model", None),
    ("method", None),
    ("precision", None),
    ("trainable", "trainable_params"),
    ("total", "total_params"),
    ("ckpt", "checkpoint_bytes"),
    ("weights", "memory_weights_bytes"),
    ("grads", "memory_gradients_bytes"),
    ("optim", "memory_optimizer_bytes"),
    ("activ*", "memory_activations_bytes"),
    ("peak*", "peak_memory_bytes"),
    ("FLOP/token", "train_flops_per_token"),
)


def table_row(rec: dict[str, Any]) -> list[str]:
    m = rec["metrics"]
    out = [rec["model"], rec["method"], rec["config"]["precision"]]
    for _, key in COLUMNS[3:]:
        unit = "" if key.endswith("params") or key.startswith("train_flops") else "B"
        out.append(human(m.get(key), unit).strip() if rec["status"] == "ok" else "-")
    return out


def print_table(recs: list[dict[str, Any]]) -> None:
    rows = [[c for c, _ in COLUMNS]] + [table_row(r) for r in recs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(v.rjust(w) if i > 2 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))


def print_record(rec: dict[str, Any], path: Any) -> None:
    if rec["status"] != "ok":
        print(f"{PROG}: {rec['model']} / {rec['method']} failed: {rec['error']}", file=sys.stderr)
    print(f"  record: {path}")


def report(recs: list[dict[str, Any]]) -> None:
    """The table of every job's record, read back from disk."""
    if not recs:
        return
    a = recs[0]["config"]
    print(
        f"\nESTIMATES (AdamW, batch {a['batch_size']} x {a['seq_length']} tokens, "
        f"{a['attention']} attention; * activations and peak are estimates, see docs/ESTIMATES.md)"
    )
    print_table(recs)


def dry_run(cfg: Any) -> None:
    """Check the values and apply the method on meta; the job then reuses the build."""
    check(cfg)
    build(cfg, keep=True)


APP = app.App(
    prog=PROG,
    config_name="estimate",
    check=dry_run,
    new_record=new_record,
    execute=execute,
    print_record=print_record,
    report=report,
)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        from peftbench.estimate.calibrate import calibrate

        return calibrate(argv[1:])
    return app.main(APP, argv)
