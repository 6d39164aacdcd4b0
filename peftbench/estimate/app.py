"""``python -m peftbench.estimate``: the app glue of the estimator. Its config schema and
checks, its record (``kind: "estimate"``), and the table it prints after a sweep, from the
records read back (jobs may run in other processes). The app layer (``peftbench.app``) does the
rest, as for the run command."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from peftbench import app
from peftbench import config as config_mod
from peftbench.config import ModelConfig, ParallelConfig, require
from peftbench.estimate.cost import ATTENTION, PRECISIONS, build, estimate

PROG = "peftbench.estimate"
MAX_TOKENS = 2**32  # per step: keeps every meta tensor's element count far below 2**63


@dataclass
class EstimateConfig:
    """Settings of one estimate.

    precision: fp32 | bf16-mixed | bf16 | fp16-mixed, as ``train.precision`` of a run
    (``peftbench.precision``), or bf16-master (bf16 weights with fp32 master copies and moments
    of the trained ones, as Megatron/DeepSpeed; see ``cost.PRECISIONS``).
    gradient_checkpointing / grad_accum: as ``train.gradient_checkpointing`` / ``train.grad_accum``
    of a run; ``model.quantize`` (nf4 | int8 | null) as in a run. batch_size / seq_length:
    examples per micro-batch and tokens per example (a step is ``grad_accum`` micro-batches). vocab_size: vocabulary
    of a preset whose ``arch`` does not fix one (the tiny models; the default task's word
    tokenizer size). attention: flash (a fused kernel saves q, k, v, output and log-sum-exp)
    or eager (the probabilities too, as in Korthikanti et al.). flops_attention: include the
    attention score/value products in ``train_flops_per_token``. rank: interpolated into
    methods that have one.
    """

    method: Any = MISSING
    model: ModelConfig = MISSING
    rank: int = 8
    precision: str = "bf16-master"
    gradient_checkpointing: bool = False
    grad_accum: int = 1
    batch_size: int = 1
    seq_length: int = 1024
    vocab_size: int = 1024
    attention: str = "flash"
    flops_attention: bool = True
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    results_dir: str = "results/estimates"


config_mod.register_configs()
ConfigStore.instance().store(name="estimate_schema", node=EstimateConfig)


def check_parallel(cfg: Any) -> None:
    """``parallel`` as in a run: strategy none, ddp or fsdp; ``nnodes x nproc`` ranks splitting
    the global micro-batch of ``batch_size`` evenly; FSDP on a dense base."""
    from peftbench.parallel import STRATEGIES

    par = cfg.parallel
    require(par.strategy in STRATEGIES, "parallel.strategy", par.strategy, f"allowed: {', '.join(STRATEGIES)}")
    require(par.nproc >= 1, "parallel.nproc", par.nproc, "must be an integer >= 1")
    require(par.nnodes >= 1, "parallel.nnodes", par.nnodes, "must be an integer >= 1")
    if par.strategy == "none":
        require(par.nproc == 1, "parallel.nproc", par.nproc, "must be 1 with parallel=none (choose ddp or fsdp)")
        require(par.nnodes == 1, "parallel.nnodes", par.nnodes, "must be 1 with parallel=none (choose ddp or fsdp)")
        return
    require(
        cfg.batch_size % config_mod.world_size(par) == 0,
        "batch_size",
        cfg.batch_size,
        f"must be a multiple of {config_mod.split_across(par)} (the global micro-batch is split evenly)",
    )
    require(
        par.strategy != "fsdp" or cfg.model.quantize is None,
        "model.quantize",
        cfg.model.quantize,
        "parallel=fsdp shards dense weights only; allowed with fsdp: null",
    )


def check(cfg: Any) -> None:
    """Reject values that cannot work (one-line ``ConfigError``)."""
    config_mod.check_method(cfg)
    require(cfg.precision in PRECISIONS, "precision", cfg.precision, f"allowed: {', '.join(PRECISIONS)}")
    require(cfg.attention in ATTENTION, "attention", cfg.attention, f"allowed: {', '.join(ATTENTION)}")
    require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    require(cfg.grad_accum >= 1, "grad_accum", cfg.grad_accum, "must be an integer >= 1")
    require(cfg.seq_length >= 1, "seq_length", cfg.seq_length, "must be >= 1 token")
    require(
        cfg.batch_size * cfg.seq_length <= MAX_TOKENS,
        "batch_size",
        cfg.batch_size,
        f"batch_size x seq_length must be <= {MAX_TOKENS:,} tokens per step",
    )
    require(cfg.vocab_size >= 1, "vocab_size", cfg.vocab_size, "must be >= 1")
    check_parallel(cfg)
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
            "grad_accum": cfg.grad_accum,
            "seq_length": cfg.seq_length,
            "attention": cfg.attention,
            "flops_attention": cfg.flops_attention,
            "recomputation": cfg.gradient_checkpointing,
            "quantize": cfg.model.quantize,
            "parallel": cfg.parallel.strategy,
            "world_size": config_mod.world_size(cfg.parallel),
            "peak": "the tensor-memory tracker's peak of one optimizer step, run on fake CPU tensors",
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
    """The levers of a job as the table shows them: precision, grad-ckpt (yes / -), accum, quant,
    ranks (``fsdp x8``: the figures are one rank's; - for one process)."""
    quant = (config.get("model") or {}).get("quantize")
    ckpt = "yes" if config.get("gradient_checkpointing") else "-"
    par = config.get("parallel") or {}
    world = par.get("nproc", 1) * par.get("nnodes", 1)
    ranks = f"{par['strategy']} x{world}" if par.get("strategy", "none") != "none" else "-"
    return [config["precision"], ckpt, str(config.get("grad_accum", 1)), quant or "-", ranks]


def table_row(rec: dict[str, Any]) -> list[str]:
    m = rec["metrics"]
    out = [rec["model"], rec["method"], *lever_labels(rec["config"])]
    for _, key in COLUMNS[2 + len(LEVERS) :]:
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
        f"\nESTIMATES (AdamW, micro-batch {a['batch_size']} x {a['seq_length']} tokens, "
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
    if argv[:1] == ["calibrate-parallel"]:
        from peftbench.estimate.calibrate import calibrate_parallel

        return calibrate_parallel(argv[1:])
    if argv[:1] == ["calibrate"]:
        from peftbench.estimate.calibrate import calibrate

        return calibrate(argv[1:])
    return app.main(APP, argv)
