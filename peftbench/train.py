"""The one training loop every method goes through, and evaluation.

Same data order (seeded), optimizer (AdamW over the parameters that require grad), schedule
(linear warm-up then linear decay) and gradient clipping for every method. The first
``memory_steps`` steps run under the tensor-memory tracker and the next one under the FLOP
counter (apart, because the FLOP counter's module hooks keep some activations alive for
longer); they and the rest of the first ``train.timing_warmup`` steps are not timed.
Each timed step (the forward and backward of each of its ``train.grad_accum`` micro-batches,
clipping, optimizer and schedule step, zeroing the gradients) is one Stopwatch region: CUDA
events on a GPU, wall clock on CPU; throughput counts every micro-batch's tokens, and the
memory steps' peak is that of one optimizer step, so with accumulation it holds one
micro-batch's activations plus the accumulated gradients.

On a GPU the allocator's ``cuda_train_*`` figures cover the memory steps, the tracker's window;
``cuda_train_phase_max_allocated_bytes`` covers every step but the FLOP step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from peftbench import parallel, precision
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

    def add(self, ms: float, micro: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step of ``ms`` milliseconds over the micro-batches ``micro``."""
        self.ms.append(ms)
        self.tokens.append(sum(int(b["attention_mask"].sum()) for b in micro))
        self.padded.append(sum(b["input_ids"].numel() for b in micro))
        self.samples.append(sum(b["input_ids"].shape[0] for b in micro))

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


def predicted(b: dict[str, torch.Tensor]) -> int:
    """What a batch's mean loss averages over: its predicted tokens (causal LM, labels shifted
    by one, -100 ignored) or its examples (classification)."""
    labels = b["labels"]
    return int((labels[:, 1:] != -100).sum()) if labels.dim() > 1 else labels.shape[0]


def loss_shares(
    micro: list[dict[str, torch.Tensor]], whole: Optional[list[dict]] = None, world: int = 1
) -> list[float]:
    """Each micro-batch's share of an optimizer step's loss: its ``predicted`` count over the
    step's, so that the accumulated gradient is the gradient of the loss over the whole step's
    batch. Distributed, ``micro`` is this rank's slice of the global micro-batches ``whole``:
    the shares are taken of the global count and multiplied by ``world``, since the ranks'
    gradients are averaged."""
    counts = [predicted(b) for b in micro]
    total = sum(predicted(b) for b in whole) if whole is not None else sum(counts)
    return [c / total * world if total else 1.0 / len(micro) for c in counts]


def train(
    model: nn.Module,
    batches: Iterator[dict],
    steps: int,
    lr: float,
    train_cfg: Any,
    memory_steps: int,
    device: torch.device,
    param_groups: Optional[list[dict[str, Any]]] = None,
    set_checkpointing: Optional[Callable[[bool], None]] = None,
) -> dict[str, Any]:
    """Train for ``steps`` optimizer steps; returns metrics (timing, memory, FLOPs) and the
    per-step losses and times.

    Each optimizer step takes ``train_cfg.grad_accum`` micro-batches from ``batches``, each
    loss weighted by ``loss_shares``; the step's loss is their weighted sum (the loss over the
    step's batch). Forwards run under ``train_cfg.precision``'s autocast, with fp16-mixed's
    loss scaler. ``param_groups``: the optimizer's parameter groups when a method sets its own
    (LoRA+: B at a multiple of A's learning rate); default one group of every parameter that
    requires grad, at ``lr``. ``set_checkpointing``: switches the model's gradient
    checkpointing (given when it is on): the FLOP step then also counts the step without
    recomputation, the model FLOPs behind MFU, in an extra untimed pass whose gradients are
    discarded and whose random state is restored.
    """
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups if param_groups is not None else [{"params": params}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=train_cfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, min(train_cfg.warmup_steps, steps), steps)
    scaler = precision.scaler(train_cfg.precision, device)
    accum = train_cfg.grad_accum
    ctx = parallel.active()
    world = ctx.world if ctx is not None else 1
    flop_step = memory_steps
    untimed = max(train_cfg.timing_warmup, flop_step + 1)
    model.train()

    def forward_backward(micro: list[dict[str, torch.Tensor]], shares: list[Optional[float]]) -> torch.Tensor:
        """The step's loss (detached; distributed: this rank's part); gradients accumulated in
        ``.grad`` (distributed: reduced across the ranks at the last micro-batch only)."""
        total: Any = None
        for i, (b, share) in enumerate(zip(micro, shares)):
            with parallel.no_sync(model, last=i == len(micro) - 1):
                with precision.autocast(train_cfg.precision, device):
                    loss = model(**b).loss
                if share is not None:
                    loss = loss * share
                (scaler.scale(loss) if scaler is not None else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    losses: list[float] = []
    timed = StepRecorder()
    measured: dict[str, Any] = {}
    tracker: Optional[TensorMemoryTracker] = None
    flops: Any = None
    cuda_reset(device)  # the cache released: the train window's reserved bytes are its own
    bar = tqdm(range(steps), desc="train", unit="step", mininterval=1.0, leave=False)
    for step in bar:
        host = [next(batches) for _ in range(accum)]  # distributed: the global micro-batches
        mine = [parallel.rank_slice(b, ctx) for b in host]
        # counted on the host, before the timed region (on a GPU, counting there would synchronise)
        shares: list[Optional[float]] = loss_shares(mine, host, world) if accum > 1 or world > 1 else [None]
        micro = [to_device(b, device) for b in mine]
        if ctx is not None:
            ctx.comm.begin()
        with ExitStack() as instruments:
            if step < memory_steps:
                if tracker is None:
                    tracker = TensorMemoryTracker(model, optimizer, device)
                for b in micro:  # this step's inputs, made outside the tracker
                    tracker.track(b.values())
                instruments.enter_context(tracker)
            if step == flop_step:
                flops = instruments.enter_context(flop_counter())
            with Stopwatch(device) as sw:
                loss = forward_backward(micro, shares)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if train_cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
        if ctx is not None:
            ctx.comm.end(timed=step >= untimed)
            if world > 1:  # the global batch's loss, for the record (after the timed region)
                torch.distributed.all_reduce(loss)
                loss = loss / world
        value = loss.item()
        del loss
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {step}")
        losses.append(value)
        if step == flop_step:
            padded = sum(b["input_ids"].numel() for b in micro)
            measured["train_flops_per_step"] = int(flops.get_total_flops())
            measured["train_flops_per_token"] = measured["train_flops_per_step"] / padded
            if set_checkpointing is not None:
                measured["train_model_flops_per_token"] = (
                    model_flops(
                        functools.partial(forward_backward, micro, shares),
                        set_checkpointing,
                        lambda: optimizer.zero_grad(set_to_none=True),
                    )
                    / padded
                )
            cuda_reset(device, release=False)  # the phase's allocated peak leaves the FLOP step out
        if step >= untimed:
            timed.add(sw.ms, host)  # the global batch: throughput counts every rank's tokens
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
    if scaler is not None:
        measured["train_loss_scale_final"] = float(scaler.get_scale())

    out: dict[str, Any] = {"train_losses": losses, "train_step_ms": timed.ms}
    out["step_tokens"], out["step_samples"] = timed.tokens, timed.samples
    out["metrics"] = {**timed.metrics(), **measured, "train_loss_final": losses[-1] if losses else None}
    return out


def model_flops(
    step: Callable[[], Any],
    set_checkpointing: Callable[[bool], None],
    zero_grad: Callable[[], None],
) -> int:
    """FLOPs of ``step`` (the FLOP step's forward and backward again) without gradient checkpointing (the
    model FLOPs of PaLM's MFU, Chowdhery et al. 2022, which leave recomputation out). Runs
    between two optimizer steps; its gradients are dropped and the random state restored, so
    training goes on as if it had not run."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_checkpointing(False)
    try:
        with flop_counter() as counter:
            step()
    finally:
        set_checkpointing(True)
        zero_grad()
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return int(counter.get_total_flops())


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
