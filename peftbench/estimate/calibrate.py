"""``python -m peftbench.estimate calibrate``: each estimated part beside the tensor-memory
tracker's measurement of a real fp32 training step on CPU, on the small built-in models."""

from __future__ import annotations

import math
from typing import Any

import torch

import methods
from peftbench import app
from peftbench.estimate.cost import estimate, model_spec

CALIBRATE_MODELS = ("tiny-llama", "tiny-gpt2")
PARTS = ("weights", "gradients", "optimizer", "activations")


def tracked_step(cfg: Any) -> dict[str, int]:
    """The tensor-memory tracker's figures for one real fp32 AdamW step on CPU of the model and
    method of ``cfg`` (batch of ``batch_size`` x ``seq_length`` random ids, mask of ones).

    Two steps run (the first creates the optimizer state); in the second, the tracker gives:
    ``memory_activations_bytes``: live non-weight, non-state bytes right after the forward (the
    batch, what autograd saved, the loss); weights, gradients and optimizer bytes right after
    ``optimizer.step()``; and the step's peak with its breakdown (``peak_*``).
    """
    from peftbench import models
    from peftbench.memory import TensorMemoryTracker

    spec, vocab = model_spec(cfg)
    model = models.build(spec, "causal-lm", vocab, 0, 0)
    torch.manual_seed(0)
    model = methods.build(cfg.method).apply(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    out: dict[str, int] = {}
    tracker = TensorMemoryTracker(model, optimizer, "cpu", extra=batch.values())
    model.train()
    for step in range(2):
        with tracker:
            tracker.reset_peak()
            loss = model(**batch).loss
            if step == 1:
                tracker.reset_peak()
                out["memory_activations_bytes"] = tracker.summary()["memory_activations_bytes"]
            loss.backward()
            optimizer.step()
            if step == 1:
                out.update({f"peak_{k}": v for k, v in tracker.summary().items()})
                tracker.reset_peak()
                now = tracker.summary()
                out.update({f"memory_{c}_bytes": now[f"memory_{c}_bytes"] for c in PARTS[:3]})
            optimizer.zero_grad(set_to_none=True)
            del loss
    return out


def calibration_rows(model: str, method: str, batch: int, seq: int) -> list[tuple[str, str, str, int, int]]:
    """(model, method, part, estimated bytes, measured bytes) for one model and method."""
    cfg = app.compose(
        f"model={model}",
        f"method={method}",
        "precision=fp32",
        f"batch_size={batch}",
        f"seq_length={seq}",
        config_name="estimate",
    )
    est = estimate(cfg)["metrics"]
    got = tracked_step(cfg)
    rows = [(model, method, c, est[f"memory_{c}_bytes"], got[f"memory_{c}_bytes"]) for c in PARTS]
    rows.append((model, method, "peak (sum)", est["peak_memory_bytes"], got["peak_peak_memory_bytes"]))
    return rows


def calibrate(argv: list[str]) -> int:
    """``python -m peftbench.estimate calibrate [batch_size=4] [seq_length=128]``: estimated vs
    measured bytes per part for every method on the small built-in models (fp32, CPU)."""
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    batch, seq = int(opts.get("batch_size", 4)), int(opts.get("seq_length", 128))
    print(
        f"CALIBRATION: estimate (precision=fp32) vs tensor-memory tracker, one real AdamW step on CPU, "
        f"batch {batch} x {seq} tokens"
    )
    print(f"{'model':<11} {'method':<8} {'part':<12} {'estimated':>12} {'measured':>12} {'error':>8}")
    worst = 0.0
    for model in CALIBRATE_MODELS:
        for method in sorted(methods.REGISTRY):
            for m, meth, part, e, g in calibration_rows(model, method, batch, seq):
                err = (e - g) / g if g else math.inf
                worst = max(worst, abs(err)) if part in PARTS[:3] else worst
                print(f"{m:<11} {meth:<8} {part:<12} {e:>12,} {g:>12,} {100 * err:>+7.2f}%")
    print(f"largest error on weights, gradients and optimizer state: {100 * worst:.4f}%")
    return 0 if worst == 0 else 1
