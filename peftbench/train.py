"""The one training loop every method goes through, and evaluation.

Same data order (seeded), optimizer (AdamW over the parameters that require grad), schedule
(linear warm-up then linear decay) and gradient clipping for every method. The first
``memory_steps`` steps run under the tensor-memory tracker and the next one under the FLOP
counter (apart, because the FLOP counter's module hooks keep some activations alive for
longer); they and the rest of the first ``train.timing_warmup`` steps are not timed.
Each timed step (forward, backward, clipping, optimizer and schedule step, zeroing the
gradients) is one Stopwatch region: CUDA events on a GPU, wall clock on CPU.

On a GPU the allocator's ``cuda_train_*`` figures cover the memory steps, the tracker's window;
``cuda_train_phase_max_allocated_bytes`` covers every step but the FLOP step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from peftbench.measure import cuda_phase_stats, cuda_reset, flop_counter
from peftbench.memory import TensorMemoryTracker
from peftbench.timing import Stopwatch, stats


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StepRecorder:
    """Per-step times (ms) and sizes of the timed steps, reduced to medians and IQRs."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.tokens: list[int] = []
        self.padded: list[int] = []
        self.samples: list[int] = []

    def add(self, ms: float, batch: dict[str, torch.Tensor]) -> None:
        self.ms.append(ms)
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.padded.append(batch["input_ids"].numel())
        self.samples.append(batch["input_ids"].shape[0])

    def rate(self, counts: list[int]) -> dict[str, float]:
        return stats([c / ms * 1e3 for c, ms in zip(counts, self.ms)])

    def metrics(self) -> dict[str, Any]:
        if not self.ms:
            return {"train_timed_steps": 0}
        st, tok = stats(self.ms), self.rate(self.tokens)
        return {
            "train_step_ms_median": st["median"],
            "train_step_ms_iqr": st["iqr"],
            "train_tokens_per_s": tok["median"],
            "train_tokens_per_s_iqr": tok["iqr"],
            "train_padded_tokens_per_s": self.rate(self.padded)["median"],
            "train_samples_per_s": self.rate(self.samples)["median"],
            "train_timed_steps": len(self.ms),
        }


def train(
    model: nn.Module,
    batches: Iterator[dict],
    steps: int,
    lr: float,
    train_cfg: Any,
    memory_steps: int,
    device: torch.device,
    param_groups: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """Train for ``steps`` steps; returns metrics (timing, memory, FLOPs) and the per-step
    losses and times. ``param_groups``: the optimizer's parameter groups when a method sets
    its own (LoRA+: B at a multiple of A's learning rate); default one group of every
    parameter that requires grad, at ``lr``."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups if param_groups is not None else [{"params": params}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=train_cfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, min(train_cfg.warmup_steps, steps), steps)
    flop_step = memory_steps
    untimed = max(train_cfg.timing_warmup, flop_step + 1)
    model.train()

    losses: list[float] = []
    timed = StepRecorder()
    measured: dict[str, Any] = {}
    tracker: Optional[TensorMemoryTracker] = None
    flops: Any = None
    cuda_reset(device)  # the cache released: the train window's reserved bytes are its own
    bar = tqdm(range(steps), desc="train", unit="step", mininterval=1.0, leave=False)
    for step in bar:
        batch = to_device(next(batches), device)
        with ExitStack() as instruments:
            if step < memory_steps:
                if tracker is None:
                    tracker = TensorMemoryTracker(model, optimizer, device)
                tracker.track(batch.values())  # this step's inputs, made outside the tracker
                instruments.enter_context(tracker)
            if step == flop_step:
                flops = instruments.enter_context(flop_counter())
            with Stopwatch(device) as sw:
                loss = model(**batch).loss
                loss.backward()
                if train_cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        del loss
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {step}")
        losses.append(value)
        if step == flop_step:
            measured["train_flops_per_step"] = int(flops.get_total_flops())
            measured["train_flops_per_token"] = measured["train_flops_per_step"] / batch["input_ids"].numel()
            cuda_reset(device, release=False)  # the phase's allocated peak leaves the FLOP step out
        if step >= untimed:
            timed.add(sw.ms, batch)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
        if tracker is not None and step == min(memory_steps, steps) - 1:
            measured.update(tracker.summary())
            measured.update(cuda_phase_stats(device, "train", tracker))
            measured["train_memory_steps"] = step + 1
            tracker.close()
    bar.close()
    if device.type == "cuda":  # max of the memory steps' window and the steps after the FLOP step
        phase = max(measured["cuda_train_max_allocated_bytes"], torch.cuda.max_memory_allocated(device))
        measured["cuda_train_phase_max_allocated_bytes"] = phase
        measured["cuda_train_phase_steps"] = steps - (steps > flop_step)

    out: dict[str, Any] = {"train_losses": losses, "train_step_ms": timed.ms}
    out["metrics"] = {**timed.metrics(), **measured, "train_loss_final": losses[-1] if losses else None}
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
