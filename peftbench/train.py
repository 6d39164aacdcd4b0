"""The one training loop every method goes through, and evaluation.

Same data order (seeded), optimizer (AdamW over the parameters that require grad), schedule
(linear warm-up then linear decay) and gradient clipping for every method. The first
``measure.memory_steps`` steps run under the tensor-memory tracker; they and the rest of the
first ``train.timing_warmup`` steps are not timed. Each timed step is synchronised on CUDA.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from peftbench.memory import TensorMemoryTracker
from peftbench.timing import Stopwatch, stats


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(model: nn.Module, batches: Iterator[dict], steps: int, lr: float, train_cfg: Any,
          memory_steps: int, device: torch.device) -> dict[str, Any]:
    """Train for ``steps`` steps; returns metrics and the per-step losses and times."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train_cfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, min(train_cfg.warmup_steps, steps), steps)
    untimed = max(train_cfg.timing_warmup, memory_steps)
    model.train()

    losses: list[float] = []
    step_ms: list[float] = []
    real_tokens: list[int] = []
    padded_tokens: list[int] = []
    samples: list[int] = []
    memory: dict[str, int] = {}
    tracker: Optional[TensorMemoryTracker] = None
    bar = tqdm(range(steps), desc="train", unit="step", mininterval=1.0, leave=False)
    for step in bar:
        batch = to_device(next(batches), device)
        tracked = step < memory_steps
        if step == 0:
            tracker = TensorMemoryTracker(model, optimizer, device, extra=batch.values())
        elif tracked:
            tracker.track(batch.values())
        with tracker if tracked else nullcontext():
            with Stopwatch(device) as sw:
                loss = model(**batch).loss
                loss.backward()
                if train_cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {step}")
        losses.append(value)
        if step >= untimed:
            step_ms.append(sw.ms)
            real_tokens.append(int(batch["attention_mask"].sum()))
            padded_tokens.append(batch["input_ids"].numel())
            samples.append(batch["input_ids"].shape[0])
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
        if step == memory_steps - 1 or (step == steps - 1 and tracked):
            memory = tracker.summary()
    bar.close()

    out: dict[str, Any] = {"train_losses": losses, "train_step_ms": step_ms, "memory": memory}
    if step_ms:
        st = stats(step_ms)
        out["metrics"] = {
            "train_step_ms_median": st["median"],
            "train_step_ms_iqr": st["iqr"],
            "train_tokens_per_s": stats([t / ms * 1e3 for t, ms in zip(real_tokens, step_ms)])["median"],
            "train_padded_tokens_per_s": stats([t / ms * 1e3 for t, ms in zip(padded_tokens, step_ms)])["median"],
            "train_samples_per_s": stats([s / ms * 1e3 for s, ms in zip(samples, step_ms)])["median"],
            "train_timed_steps": len(step_ms),
        }
    else:
        out["metrics"] = {"train_timed_steps": 0}
    out["metrics"]["train_loss_final"] = losses[-1] if losses else None
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[dict], kind: str, device: torch.device) -> dict[str, Any]:
    """Mean eval loss (per predicted token for causal LM, per example for classification) and,
    for classification, the predicted labels."""
    model.eval()
    total, count = 0.0, 0
    preds: list[int] = []
    refs: list[int] = []
    for batch in batches:
        batch = to_device(batch, device)
        out = model(**batch)
        if kind == "causal-lm":
            n = int((batch["labels"][:, 1:] != -100).sum())
        else:
            n = batch["labels"].shape[0]
            preds += out.logits.argmax(-1).tolist()
            refs += batch["labels"].tolist()
        total += float(out.loss) * n
        count += n
    model.train()
    result: dict[str, Any] = {"eval_loss": total / max(count, 1)}
    if kind == "classification":
        result["predictions"], result["references"] = preds, refs
    return result
