"""The one training loop every method goes through, its one optimizer step, and evaluation.

The step (``OptimizerStep``: each micro-batch's forward and weighted backward, unscaling,
clipping, the optimizer and schedule step, zeroing the gradients) is the function the run's loop
calls and the one the estimator traces on fake tensors (``peftbench.estimate.cost``), watching it
through a ``StepProbe``; the levers it obeys come in one ``config.Levers``. In a distributed run
the loop gets the rank (``ranks.Rank``) as an argument.

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
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from methods.virtual import first_keyword
from peftbench import precision
from peftbench.config import Levers
from peftbench.measure import cuda_phase_stats, cuda_reset, flop_counter
from peftbench.memory import TensorMemoryTracker
from peftbench.ranks import Rank, no_sync, rank_slice
from peftbench.throughput import StepRecorder
from peftbench.timing import Stopwatch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def step_shares(
    mine: list[dict[str, torch.Tensor]], host: list[dict[str, torch.Tensor]], lev: Levers
) -> list[Optional[float]]:
    """The shares ``OptimizerStep`` weights the micro-batches' losses by (``loss_shares``), or
    ``[None]`` for one micro-batch on one rank, whose loss is the step's as it is."""
    if lev.grad_accum > 1 or lev.world_size > 1:
        return list(loss_shares(mine, host, lev.world_size))
    return [None]


class StepProbe:
    """Where a caller looks into ``OptimizerStep``; this one looks at nothing (the run's).

    ``accumulating()``: the context of the forwards, backwards, unscaling and clipping (the
    estimator's fake-tensor mode, memory tracker and FLOP counter); ``updating()``: the context
    of the optimizer's and the schedule's step and the zeroing of the gradients;
    ``before_forward()`` / ``after_forward()`` around each micro-batch's forward (before its
    loss is weighted); ``after_update()`` right after the optimizer's step."""

    def accumulating(self) -> AbstractContextManager:
        return nullcontext()

    def updating(self) -> AbstractContextManager:
        return nullcontext()

    def before_forward(self) -> None:
        pass

    def after_forward(self) -> None:
        pass

    def after_update(self) -> None:
        pass


@dataclass
class Optimizer:
    """The optimizer side of the step: AdamW over ``params`` (in the method's groups, if it
    sets its own), the learning-rate ``schedule`` (None: constant) and fp16-mixed's loss
    ``scaler`` (None otherwise)."""

    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    schedule: Any = None
    scaler: Optional[torch.amp.GradScaler] = None


def make_optimizer(
    model: nn.Module,
    lev: Levers,
    steps: int,
    device: torch.device,
    param_groups: Optional[list[dict[str, Any]]] = None,
) -> Optimizer:
    """AdamW at ``lev.lr`` with ``lev.weight_decay`` over the parameters that require grad (or
    ``param_groups``, a method's own: LoRA+), linear warm-up over ``lev.warmup_steps`` then linear
    decay to 0 at ``steps``, and the precision's loss scaler."""
    # heavy: transformers.optimization imports its trainer utilities (and peft where installed),
    # seconds at the start of every command; only a run that trains needs it
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups if param_groups is not None else [{"params": params}]
    optimizer = torch.optim.AdamW(groups, lr=lev.lr, weight_decay=lev.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, min(lev.warmup_steps, steps), steps)
    return Optimizer(optimizer, params, schedule, precision.scaler(lev.precision, device))


@dataclass
class OptimizerStep:
    """One optimizer step, as every method trains: the model, its ``Optimizer``, the ``Levers``,
    the device, the rank of a distributed run (None: a plain run) and who watches (``probe``).
    Called with a step's micro-batches and their loss shares; the training loop calls it once
    per step, the estimator once on fake tensors (``peftbench.estimate.cost.tracked_step``)."""

    model: nn.Module
    opt: Optimizer
    lev: Levers
    device: torch.device
    rank: Optional[Rank] = None
    probe: StepProbe = field(default_factory=StepProbe)

    def accumulate(self, micro: list[dict[str, torch.Tensor]], shares: list[Optional[float]]) -> torch.Tensor:
        """The forward and backward of every micro-batch of a step: each loss (under the
        precision's autocast) weighted by its share, scaled by the loss scaler, back-propagated;
        gradients accumulate in ``.grad`` (distributed: reduced across the ranks at the last
        micro-batch only, ``ranks.no_sync``). Returns the step's loss, detached (distributed:
        this rank's part)."""
        total: Any = None
        scaler, probe = self.opt.scaler, self.probe
        for i, (b, share) in enumerate(zip(micro, shares)):
            with no_sync(self.model, i == len(micro) - 1, self.rank):
                probe.before_forward()
                with precision.autocast(self.lev.precision, self.device):
                    loss = self.model(**b).loss
                probe.after_forward()
                if share is not None:
                    loss = loss * share
                (scaler.scale(loss) if scaler is not None else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def __call__(self, micro: list[dict[str, torch.Tensor]], shares: list[Optional[float]]) -> torch.Tensor:
        """``accumulate`` the micro-batches, unscale (fp16-mixed), clip the gradient norm at
        ``lev.grad_clip`` (0: no clipping), step the optimizer (through the scaler, which skips a
        step with inf/nan gradients) and the schedule, zero the gradients. Returns the step's
        loss, detached."""
        opt = self.opt
        with self.probe.accumulating():
            loss = self.accumulate(micro, shares)
            if opt.scaler is not None:
                opt.scaler.unscale_(opt.optimizer)
            if self.lev.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(opt.params, self.lev.grad_clip)
        with self.probe.updating():
            if opt.scaler is not None:
                opt.scaler.step(opt.optimizer)
                opt.scaler.update()
            else:
                opt.optimizer.step()
            self.probe.after_update()
            if opt.schedule is not None:
                opt.schedule.step()
            opt.optimizer.zero_grad(set_to_none=True)
        return loss


@dataclass
class Instruments:
    """The untimed instruments of the first steps: the tensor-memory tracker over steps
    ``0 .. memory_steps - 1``, the FLOP counter over step ``memory_steps`` (apart, because its
    module hooks keep some activations alive for longer); the figures they gave (``measured``)."""

    memory_steps: int
    steps: int
    device: torch.device
    tracker: Optional[TensorMemoryTracker] = None
    flops: Any = None
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def flop_step(self) -> int:
        return self.memory_steps

    def enter(self, stack: ExitStack, step: int, model: nn.Module, opt: Optimizer, micro: list[dict]) -> None:
        """Put step ``step`` under the instrument it runs under, if any."""
        if step < self.memory_steps:
            if self.tracker is None:
                self.tracker = TensorMemoryTracker(model, opt.optimizer, self.device)
            for b in micro:  # this step's inputs, made outside the tracker
                self.tracker.track(b.values())
            stack.enter_context(self.tracker)
        if step == self.flop_step:
            self.flops = stack.enter_context(flop_counter())

    def after(self, step: int, micro: list[dict], model_flops_of: Optional[Callable[[], int]]) -> None:
        """Keep what the instruments saw once their steps are done: FLOPs per step and per
        (padded) token, the model FLOPs without recomputation (``model_flops_of``, under gradient
        checkpointing), the memory steps' peak and breakdown."""
        if step == self.flop_step:
            padded = sum(b["input_ids"].numel() for b in micro)
            self.measured["train_flops_per_step"] = int(self.flops.get_total_flops())
            self.measured["train_flops_per_token"] = self.measured["train_flops_per_step"] / padded
            if model_flops_of is not None:
                self.measured["train_model_flops_per_token"] = model_flops_of() / padded
            cuda_reset(self.device, release=False)  # the phase's allocated peak leaves the FLOP step out
        if self.tracker is not None and step == min(self.memory_steps, self.steps) - 1:
            self.measured.update(self.tracker.summary())
            self.measured.update(cuda_phase_stats(self.device, "train", self.tracker))
            self.measured["train_memory_steps"] = step + 1
            self.tracker.close()

    def finish(self) -> dict[str, Any]:
        """The figures, with the CUDA phase peak: the max of the memory steps' window and the
        steps after the FLOP step."""
        if self.device.type == "cuda":
            phase = max(self.measured["cuda_train_max_allocated_bytes"], torch.cuda.max_memory_allocated(self.device))
            self.measured["cuda_train_phase_max_allocated_bytes"] = phase
            self.measured["cuda_train_phase_steps"] = self.steps - (self.steps > self.flop_step)
        return self.measured


def train(
    model: nn.Module,
    batches: Iterator[dict],
    steps: int,
    lev: Levers,
    timing_warmup: int,
    memory_steps: int,
    device: torch.device,
    param_groups: Optional[list[dict[str, Any]]] = None,
    set_checkpointing: Optional[Callable[[bool], None]] = None,
    rank: Optional[Rank] = None,
    curve: Optional[Callable[[], float]] = None,
    curve_every: int = 0,
) -> dict[str, Any]:
    """Train for ``steps`` optimizer steps of ``lev.grad_accum`` micro-batches each
    (``OptimizerStep``); returns metrics (timing, memory, FLOPs) and the per-step losses and times.

    The first ``timing_warmup`` steps, the memory steps and the FLOP step are not timed.
    ``param_groups``: the optimizer's parameter groups when a method sets its own (LoRA+).
    ``set_checkpointing``: switches the model's gradient checkpointing (given when it is on):
    the FLOP step then also counts the step without recomputation, the model FLOPs behind MFU,
    in an extra untimed pass whose gradients are discarded and whose random state is restored.
    ``rank``: this process's rank of a distributed run (None: a plain run); ``batches`` then
    yields the global micro-batches, of which it trains on its slice. ``curve``: the learning
    curve's evaluation (an eval loss), called after every ``curve_every`` steps and after the
    last, between steps (outside every timed, tracked or counted region); its points go to
    ``curve`` in the result: the step and the padded tokens trained so far.
    """
    opt = make_optimizer(model, lev, steps, device, param_groups)
    step_once = OptimizerStep(model, opt, lev, device, rank)
    instruments = Instruments(memory_steps, steps, device)
    untimed = max(timing_warmup, instruments.flop_step + 1)
    losses: list[float] = []
    points: list[dict[str, Any]] = []
    padded = 0  # tokens trained so far, padding included (the FLOP counter's basis)
    timed = StepRecorder()
    model.train()
    cuda_reset(device)  # the cache released: the train window's reserved bytes are its own
    bar = tqdm(range(steps), desc="train", unit="step", mininterval=1.0, leave=False)
    for step in bar:
        host = [next(batches) for _ in range(lev.grad_accum)]  # distributed: the global micro-batches
        mine = [rank_slice(b, rank) for b in host]
        shares = step_shares(mine, host, lev)  # on the host, before the timed region (no GPU sync there)
        micro = [to_device(b, device) for b in mine]
        if rank is not None:
            rank.comm.begin()
        with ExitStack() as stack:
            instruments.enter(stack, step, model, opt, micro)
            with Stopwatch(device) as sw:
                loss = step_once(micro, shares)
        value = step_loss(loss, step, rank, timed=step >= untimed)
        del loss  # not alive during the next (tracked) step
        losses.append(value)
        again = None  # the FLOP step without recomputation (model FLOPs)
        if set_checkpointing is not None:
            again = functools.partial(model_flops, step_once, micro, shares, set_checkpointing)
        instruments.after(step, micro, again)
        if step >= untimed:
            timed.add(sw.ms, host)  # the global batch: throughput counts every rank's tokens
        padded += sum(int(b["input_ids"].numel()) for b in host)
        if curve is not None and curve_every > 0 and ((step + 1) % curve_every == 0 or step + 1 == steps):
            points.append({"step": step + 1, "padded_tokens": padded, "eval_loss": curve()})
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    measured = instruments.finish()
    if opt.scaler is not None:
        measured["train_loss_scale_final"] = float(opt.scaler.get_scale())
    out: dict[str, Any] = {"train_losses": losses, "train_step_ms": timed.ms, "steps": timed, "curve": points}
    out["metrics"] = {**timed.metrics(), **measured, "train_loss_final": losses[-1] if losses else None}
    return out


def step_loss(loss: torch.Tensor, step: int, rank: Optional[Rank], timed: bool) -> float:
    """The step's loss as a number, after its timed region: distributed, the collectives'
    accounting of the step closed and the global batch's loss averaged over the ranks.
    Raises ``FloatingPointError`` for a loss that is not finite."""
    if rank is not None:
        rank.comm.end(timed=timed)
        if rank.world > 1:
            torch.distributed.all_reduce(loss)
            loss = loss / rank.world
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss is {value} at step {step}")
    return value


def model_flops(
    step: OptimizerStep,
    micro: list[dict[str, torch.Tensor]],
    shares: list[Optional[float]],
    set_checkpointing: Callable[[bool], None],
) -> int:
    """FLOPs of the FLOP step's forwards and backwards (``OptimizerStep.accumulate``) run again without
    gradient checkpointing (the model FLOPs of PaLM's MFU, Chowdhery et al. 2022, which leave
    recomputation out). Runs between two optimizer steps; its gradients are dropped and the
    random state restored, so training goes on as if it had not run."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_checkpointing(False)
    try:
        with flop_counter() as counter:
            step.accumulate(micro, shares)
    finally:
        set_checkpointing(True)
        step.opt.optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return int(counter.get_total_flops())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterator[dict],
    kind: str,
    device: torch.device,
    look: Optional[Callable[[int, torch.Tensor, Optional[list[int]]], None]] = None,
    labelled_only: bool = False,
) -> dict[str, Any]:
    """Mean eval loss (per predicted token for causal LM, per example for classification) and,
    for classification, the predicted labels; a batch without a labelled token adds nothing.

    ``labelled_only`` (causal LM, a model whose forward takes ``logits_to_keep``): the logits
    only at the positions that predict a labelled token in some row of the batch, the loss
    computed from them (the same loss up to float rounding, without the full-vocabulary logits
    of every prompt position). ``look(b, logits, positions)``, when given, sees batch ``b``'s
    logits (0, 1, ...; rows, positions, vocab) right after its forward, and the sequence
    positions they are at (None: every position); it must keep no tensor of them."""
    model.eval()
    total, count = 0.0, 0
    preds: list[int] = []
    refs: list[int] = []
    selective = labelled_only and kind == "causal-lm" and first_keyword(model, ("logits_to_keep",)) is not None
    for b, batch in enumerate(batches):
        batch = to_device(batch, device)
        positions: Optional[list[int]] = None
        if selective:
            labels = batch["labels"]
            cols = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()  # (positions,): each predicts a label
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=cols)
            targets = labels[:, cols + 1]  # (batch, positions)
            n = int((targets != -100).sum())
            logits = out.logits.float().flatten(0, 1)  # (batch * positions, vocab)
            loss = F.cross_entropy(logits, targets.flatten(), ignore_index=-100) if n else None
            positions = cols.tolist()
        else:
            out = model(**batch)
            loss = out.loss
            if kind == "causal-lm":
                n = int((batch["labels"][:, 1:] != -100).sum())
            else:
                n = batch["labels"].shape[0]
                preds += out.logits.argmax(-1).tolist()
                refs += batch["labels"].tolist()
        if look is not None:
            look(b, out.logits, positions)
        if n and loss is not None:
            total += float(loss) * n
            count += n
    model.train()
    result: dict[str, Any] = {"eval_loss": total / max(count, 1)}
    if kind == "classification":
        result["predictions"], result["references"] = preds, refs
    return result
