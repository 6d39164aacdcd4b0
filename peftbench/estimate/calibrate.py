"""``python -m peftbench.estimate calibrate``: each estimated part beside the tensor-memory
tracker's measurement of the same real training step on CPU, on the small built-in models, for
every cost lever and every method that the lever allows.

The real step and the estimate's traced step are one function, the run's own
``train.OptimizerStep`` (watched by ``cost.tracked_step``): the estimate runs it on fake tensors
of the 2- and 3-layer models and extrapolates, with weights, gradients and optimizer state from
the closed form; the calibration runs it on the real model."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from peftbench import app, launch, models
from peftbench import config as config_mod
from peftbench.errors import ConfigError
from peftbench.estimate import cost

CALIBRATE_MODELS = ("tiny-llama", "tiny-gpt2")
PARTS = ("weights", "gradients", "optimizer", "activations")
STATES = PARTS[:3]  # exact by construction: the calibration fails on any difference
# lever -> estimator overrides; every lever at batch_size x seq_length per micro-batch
LEVERS = {
    "fp32": ("train.precision=fp32",),
    "bf16-mixed": ("train.precision=bf16-mixed",),
    "bf16": ("train.precision=bf16",),
    "checkpointing": ("train.precision=fp32", "train.gradient_checkpointing=true"),
    "grad_accum=2": ("train.precision=fp32", "train.grad_accum=2"),
    "nf4": ("train.precision=fp32", "model.quantize=nf4"),
    "int8": ("train.precision=fp32", "model.quantize=int8"),
}


def compose(model: str, method: str, lever: str, batch: int, seq: int) -> Any:
    return app.compose(
        f"model={model}",
        f"method={method}",
        *LEVERS[lever],
        f"train.batch_size={batch}",
        f"seq_length={seq}",
        config_name="estimate",
    )


def allowed(lever: str, method: str) -> bool:
    """Whether a run allows ``lever`` with ``method`` (a quantized base refuses a method that
    trains the base: the run's own check, ``config.check_quantize``)."""
    quantize = next((o.split("=", 1)[1] for o in LEVERS[lever] if o.startswith("model.quantize=")), None)
    try:
        config_mod.check_quantize(OmegaConf.create({"model": {"quantize": quantize}, "method": {"name": method}}))
    except ConfigError:
        return False
    return True


def cells() -> list[tuple[str, str, str]]:
    """(lever, model, method) of every calibration a run allows."""
    return [
        (lever, model, method)
        for lever in LEVERS
        for model in CALIBRATE_MODELS
        for method in sorted(methods.REGISTRY)
        if allowed(lever, method)
    ]


def measured_step(cfg: DictConfig) -> dict[str, int]:
    """``cost.tracked_step`` of the real model on CPU: built as a run builds it (random
    weights, the lever's cast, quantized base, method and checkpointing: ``cost.prepare``),
    on random ids with a mask of ones."""
    lev = config_mod.levers(cfg)
    spec, vocab = cost.model_spec(cfg)
    kind = cost.task_kind(cfg)
    model = models.build(spec, kind, vocab, 0, 2)
    torch.manual_seed(0)
    model = cost.prepare(model, cfg, lev)
    return cost.tracked_step(model, lev, cost.micro_batches(lev, cfg.seq_length, vocab, kind))


def calibration_rows(model: str, method: str, lever: str, batch: int, seq: int) -> list[tuple[str, int, int]]:
    """(part, estimated, measured) for one model, method and lever: the four parts, the peak
    and the FLOPs per step (under checkpointing, also the model FLOPs, without recomputation)."""
    cfg = compose(model, method, lever, batch, seq)
    est = cost.estimate(cfg)["metrics"]
    got = measured_step(cfg)
    rows = [(c, est[f"memory_{c}_bytes"], got[f"memory_{c}_bytes"]) for c in PARTS]
    rows.append(("peak", est["peak_memory_bytes"], got["peak_memory_bytes"]))
    rows.append(("FLOPs", round(est["train_flops_per_step"]), got["flops"]))
    if cfg.train.gradient_checkpointing:
        tokens = est["train_tokens_per_step"]
        rows.append(
            ("model FLOPs", round(est["train_model_flops_per_token"] * tokens), got["flops"] - got["recomputed_flops"])
        )
    return rows


def error(estimated: int, measured: int) -> float:
    return (estimated - measured) / measured if measured else (0.0 if estimated == 0 else math.inf)


def calibrate(argv: list[str]) -> int:
    """``python -m peftbench.estimate calibrate [batch_size=4] [seq_length=128] [lever=NAME]
    [model=NAME] [method=NAME]``: estimated vs measured bytes per part for every lever, model
    and method (or those named). Exit status 1 if weights, gradients or optimizer state differ."""
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    batch, seq = int(opts.get("batch_size", 4)), int(opts.get("seq_length", 128))
    print(f"CALIBRATION: estimate vs tensor-memory tracker, one real AdamW step on CPU, micro-batch {batch} x {seq}")
    print(f"{'lever':<13} {'model':<11} {'method':<9} {'part':<12} {'estimated':>14} {'measured':>14} {'error':>8}")
    worst = 0.0
    chosen = {"lever": 0, "model": 1, "method": 2}
    for cell in cells():
        if any(opts.get(key, cell[i]) != cell[i] for key, i in chosen.items()):
            continue
        lever, model, method = cell
        for part, e, g in calibration_rows(model, method, lever, batch, seq):
            err = error(e, g)
            worst = max(worst, abs(err)) if part in STATES else worst
            print(f"{lever:<13} {model:<11} {method:<9} {part:<12} {e:>14,} {g:>14,} {100 * err:>+7.2f}%")
    print(f"largest error on weights, gradients and optimizer state: {100 * worst:.4f}%")
    return 0 if worst == 0 else 1


# ------------------------------------------------------------------------ distributed
# the measured runs behind the distributed calibration: 3 steps of a global batch of 2 x nproc
# sequences of 32 tokens of the default task (the estimate gets the same shapes and vocabulary)
PARALLEL_RUN = (
    "model=tiny-llama",
    "train.steps=3",
    "train.timing_warmup=0",
    "task.max_length=32",
    "task.num_train=64",
    "task.num_eval=16",
    "measure.latency_repeats=1",
    "measure.latency_grid_batches=[1]",
    "measure.latency_grid_lengths=[16]",
    "measure.latency_length=16",
    "measure.decode_tokens=0",
)
PARALLEL_PARTS = ("weights", "optimizer", "peak")


def parallel_rows(
    nproc: int, methods_: tuple[str, ...] = ("full", "lora"), model: tuple[str, ...] = ()
) -> list[tuple[str, str, str, int, int]]:
    """(method, strategy, part, estimated, measured) for each method under DDP and FSDP on
    ``nproc`` gloo ranks: the measured figures are those of the rank with the highest peak,
    weights and optimizer state at that peak. ``model``: overrides of tiny-llama's shape
    (``model.arch.num_hidden_layers=12``), given to the run and the estimate alike."""
    cases = [(m, s) for m in methods_ for s in ("ddp", "fsdp")]
    batch = 2 * nproc
    configs = [
        app.compose(
            f"method={m}",
            *PARALLEL_RUN,
            *model,
            f"train.batch_size={batch}",
            f"parallel={s}",
            f"parallel.nproc={nproc}",
            "parallel.oversubscribe=true",  # bytes and memory are exact on any number of cores
        )
        for m, s in cases
    ]
    for c in configs:
        launch.check_job(c)
    recs = launch.spawn(nproc, launch.run_many, configs)[0]
    rows = []
    for (m, s), rec in zip(cases, recs):
        cfg = app.compose(
            "model=tiny-llama",
            *model,
            f"method={m}",
            "train.precision=fp32",
            f"train.batch_size={batch}",
            "seq_length=32",
            f"vocab_size={rec['model_config']['vocab_size']}",
            f"parallel={s}",
            f"parallel.nproc={nproc}",
            config_name="estimate",
        )
        est = cost.estimate(cfg)["metrics"]
        top = max(rec["parallel"]["ranks"], key=lambda r: r["peak_memory_bytes"])
        for part in PARALLEL_PARTS:
            key = "peak_memory_bytes" if part == "peak" else f"memory_{part}_bytes"
            rows.append((m, s, part, est[key], top[key]))
        for k, v in rec["metrics"].items():
            if k.startswith("comm_") and k.endswith("_per_step") and k.endswith("bytes_per_step"):
                rows.append((m, s, k.removeprefix("comm_").removesuffix("_per_step"), est[f"{k}_closed_form"], v))
    return rows


def calibrate_parallel(argv: list[str]) -> int:
    """``python -m peftbench.estimate calibrate-parallel [nproc=2,4] [model.arch.KEY=VALUE ...]``:
    one rank's estimated weights, optimizer state and peak, and the collectives' bytes, beside a
    measured distributed run of full fine-tuning and LoRA under DDP and FSDP on tiny-llama
    (reshaped by the ``model.`` overrides; the rank with the highest peak). Exit status 1 if
    the weights or the collectives' bytes differ (the optimizer state at the peak may be 0: a
    peak in the first step comes before the state)."""
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    nprocs = [int(n) for n in opts.get("nproc", "2,4").split(",")]
    model = tuple(a for a in argv if a.startswith("model."))
    print(
        "CALIBRATION (distributed): one rank's estimate vs a measured gloo run on CPU, "
        f"tiny-llama{' ' + ' '.join(model) if model else ''}, 2 x 32 tokens per rank"
    )
    print(f"{'ranks':<6} {'method':<7} {'parallel':<9} {'part':<15} {'estimated':>14} {'measured':>14} {'error':>8}")
    exact = True
    for n in nprocs:
        for m, s, part, e, g in parallel_rows(n, model=model):
            if part not in ("optimizer", "peak") and e != g:  # weights and bytes moved are exact
                exact = False
            print(f"{n:<6} {m:<7} {s:<9} {part:<15} {e:>14,} {g:>14,} {100 * error(e, g):>+7.2f}%")
    return 0 if exact else 1
