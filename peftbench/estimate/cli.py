"""``python -m peftbench.estimate``: the estimator's command. Its check (``config.check_estimate``
and the method on the meta model), its record (``kind: "estimate"``), and the table it prints
after a sweep, from the records read back (jobs may run in other processes); ``calibrate`` and
``calibrate-parallel`` (``peftbench.estimate.calibrate``). The app layer (``peftbench.app``)
does the rest, as for the run command. Its config schema is ``config.EstimateConfig``: the levers
spelled as a run spells them (``train.precision``, ``train.batch_size``, ...); the old top-level
spellings are refused in one line naming the new key (``config.RENAMED_ESTIMATE_KEYS``)."""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from peftbench import app
from peftbench import config as config_mod
from peftbench.estimate import calibrate
from peftbench.estimate.cost import build, estimate
from peftbench.records import writer

PROG = "peftbench.estimate"


def new_record(cfg: DictConfig) -> dict[str, Any]:
    """A record in the measured run's format, ``kind: "estimate"``; ``task`` is null."""
    return {
        **writer.new_record(cfg, kind="estimate", task=None, model=config_mod.model_label(cfg.model)),
        "assumptions": {
            "precision": cfg.train.precision,
            "optimizer": "AdamW",
            "batch_size": cfg.train.batch_size,
            "grad_accum": cfg.train.grad_accum,
            "seq_length": cfg.seq_length,
            "attention": cfg.attention,
            "flops_attention": cfg.flops_attention,
            "recomputation": cfg.train.gradient_checkpointing,
            "quantize": cfg.model.quantize,
            "parallel": cfg.parallel.strategy,
            "world_size": config_mod.world_size(cfg.parallel),
            "peak": "the tensor-memory tracker's peak of one optimizer step, run on fake CPU tensors",
        },
    }


def execute(cfg: DictConfig, rec: dict[str, Any]) -> None:
    """Estimate one config into ``rec`` (the device is meta: nothing is allocated)."""
    rec["provenance"] = writer.provenance(torch.device("meta"))
    config_mod.check_estimate(cfg)
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


LEVERS = ("precision", "grad-ckpt", "accum", "quant", "ranks")  # columns that name the job with the method

COLUMNS = (
    ("model", None),
    ("method", None),
    *((lever, None) for lever in LEVERS),
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


def lever_labels(config: dict[str, Any]) -> list[str]:
    """The levers of a job (a record's config) as the table shows them: precision, grad-ckpt
    (yes / -), accum, quant, ranks (``fsdp x8``: the figures are one rank's; - for one process)."""
    quant = (config.get("model") or {}).get("quantize")
    train = config.get("train") or {}
    ckpt = "yes" if train.get("gradient_checkpointing") else "-"
    par = config.get("parallel") or {}
    ranks = f"{par['strategy']} x{config_mod.world_size(par)}" if par.get("strategy", "none") != "none" else "-"
    return [train["precision"], ckpt, str(train.get("grad_accum", 1)), quant or "-", ranks]


def table_row(rec: dict[str, Any]) -> list[str]:
    m = rec["metrics"]
    out = [rec["model"], rec["method"], *lever_labels(rec["config"])]
    for _, key in COLUMNS[2 + len(LEVERS) :]:
        assert key is not None  # the figure columns name their metric
        unit = "" if key.endswith("params") or key.startswith("train_flops") else "B"
        out.append(human(m.get(key), unit).strip() if rec["status"] == "ok" else "-")
    return out


def print_table(recs: list[dict[str, Any]]) -> None:
    rows = [[c for c, _ in COLUMNS]] + [table_row(r) for r in recs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        left = 2 + len(LEVERS)
        print("  ".join(v.rjust(w) if i >= left else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))


def print_record(rec: dict[str, Any], path: Any) -> None:
    """One line per job: its bytes per category at the training step, their sum and the traced
    peak (the table follows a sweep); then where the record is."""
    if rec["status"] != "ok":
        print(f"{PROG}: {rec['model']} / {rec['method']} failed: {rec['error']}", file=sys.stderr)
    else:
        m = rec["metrics"]
        parts = {c: m[f"memory_{c}_bytes"] for c in ("weights", "gradients", "optimizer", "activations")}
        levers = dict(zip(LEVERS, lever_labels(rec["config"])))
        print(
            f"  {rec['model']} / {rec['method']} (precision {levers['precision']}, checkpointing "
            f"{levers['grad-ckpt']}, accum {levers['accum']}, quantize {levers['quant']}): "
            + ", ".join(f"{c} {human(n)}" for c, n in parts.items())
            + f" = {human(sum(parts.values()))}; peak* {human(m['peak_memory_bytes'])}"
        )
        if m.get("world_size"):
            comm = {
                k.removeprefix("comm_").removesuffix("_bytes_per_step_closed_form"): v
                for k, v in m.items()
                if k.endswith("_per_step_closed_form")
            }
            print(
                f"    per rank of {levers['ranks']} (micro-batch split across the ranks); collectives per step: "
                + ", ".join(f"{k} {human(v)}" for k, v in comm.items())
                + f"; each rank sends {human(m['comm_ring_bytes_sent_per_rank_per_step'])} (ring)"
            )
    print(f"  record: {path}")


def report(recs: list[dict[str, Any]]) -> None:
    """The table of every job's record, read back from disk."""
    if not recs:
        return
    a = recs[0]["config"]
    print(
        f"\nESTIMATES (AdamW, micro-batch {a['train']['batch_size']} x {a['seq_length']} tokens, "
        f"{a['attention']} attention; * activations and peak are estimates, see docs/ESTIMATES.md)"
    )
    print_table(recs)


def check(cfg: DictConfig) -> None:
    """Check the values (``config.check_estimate``) and apply the method on the meta model, so a
    setting the model cannot take fails before any job runs."""
    config_mod.check_estimate(cfg)
    build(cfg, config_mod.levers(cfg))


APP = app.App(
    prog=PROG,
    config_name="estimate",
    check=check,
    new_record=new_record,
    execute=execute,
    print_record=print_record,
    report=report,
    renamed=config_mod.RENAMED_ESTIMATE_KEYS,
)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate-parallel"]:
        return calibrate.calibrate_parallel(argv[1:])
    if argv[:1] == ["calibrate"]:
        return calibrate.calibrate(argv[1:])
    return app.main(APP, argv)
