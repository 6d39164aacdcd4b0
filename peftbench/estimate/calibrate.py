"""``python -m peftbench.estimate calibrate``: each estimated part beside the tensor-memory
tracker's measurement of the same real training step on CPU, on the small built-in models, for
every cost lever and every method that the lever allows.

The real step and the estimate's traced step are one function (``cost.tracked_step``): the
estimate runs it on fake tensors of the 2- and 3-layer models and extrapolates, with weights,
gradients and optimizer state from the closed form; the calibration runs it on the real model."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import OmegaConf

import methods
from methods import ConfigError
from peftbench import app
from peftbench import config as config_mod
from peftbench.estimate import cost

CALIBRATE_MODELS = ("tiny-llama", "tiny-gpt2")
PARTS = ("weights", "gradients", "optimizer", "activations")
STATES = PARTS[:3]  # exact by construction: the calibration fails on any difference
# lever -> estimator overrides; every lever at batch_size x seq_length per micro-batch
LEVERS = {
    "fp32": ("precision=fp32",),
    "bf16-mixed": ("precision=bf16-mixed",),
    "bf16": ("precision=bf16",),
    "checkpointing": ("precision=fp32", "gradient_checkpointing=true"),
    "grad_accum=2": ("precision=fp32", "grad_accum=2"),
    "nf4": ("precision=fp32", "model.quantize=nf4"),
    "int8": ("precision=fp32", "model.quantize=int8"),
}


def compose(model: str, method: str, lever: str, batch: int, seq: int) -> Any:
    return app.compose(
        f"model={model}",
        f"method={method}",
        *LEVERS[lever],
        f"batch_size={batch}",
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


def measured_step(cfg: Any) -> dict[str, int]:
    """``cost.tracked_step`` of the real model on CPU: built as a run builds it (random
    weights, the lever's cast, quantized base, method and checkpointing: ``cost.prepare``),
    on random ids with a mask of ones."""
    from peftbench import models

    spec, vocab = cost.model_spec(cfg)
    model = models.build(spec, "causal-lm", vocab, 0, 0)
    torch.manual_seed(0)
    model = cost.prepare(model, cfg)
    return cost.tracked_step(model, cfg, cost.micro_batches(cfg, vocab))


def calibration_rows(model: str, method: str, lever: str, batch: int, seq: int) -> list[tuple[str, int, int]]:
    """(part, estimated, measured) for one model, method and lever: the four parts, the peak
    and the FLOPs per step (under checkpointing, also the model FLOPs, without recomputation)."""
    cfg = compose(model, method, lever, batch, seq)
    est = cost.estimate(cfg)["metrics"]
    got = measured_step(cfg)
    rows = [(c, est[f"memory_{c}_bytes"], got[f"memory_{c}_bytes"]) for c in PARTS]
    rows.append(("peak", est["peak_memory_bytes"], got["peak_memory_bytes"]))
    rows.append(("FLOPs", round(est["train_flops_per_step"]), got["flops"]))
    if cfg.gradient_checkpointing:
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
