"""What one rank of a distributed run (DDP or FSDP2) needs while it trains, passed down to the
training loop as an explicit object (``Rank``): its rank, the world, the strategy, the collective
counters; how the model is wrapped (``Rank.wrap``), a micro-batch's gradient sync under
accumulation (``no_sync``), the rank's slice of a global batch (``rank_slice``); and, after
training, the ranks' figures gathered and combined (``gather``, ``combine``). The processes
themselves are started by ``peftbench.launch``, above the run.

Communication (``CommCounter``): DDP's gradient all-reduce is counted by a communication hook
on every bucket; FSDP2's all-gathers and reduce-scatters by its custom-collective hooks. Bytes
are message sizes (the full buffer a collective reduces or gathers); ``comm_closed_form`` gives
them from the trainable set and the sharding, and the ring algorithm's bytes each rank sends
follow from them (all-reduce 2 (N-1)/N, all-gather and reduce-scatter (N-1)/N of the message).
The estimator traces one FSDP2 rank with the same ``shard``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import torch
import torch.distributed as dist
from torch import nn

from peftbench.memory import storage_resized
from peftbench.throughput import StepRecorder
from peftbench.timing import stats


# ------------------------------------------------------------------------ the current rank
@dataclass
class Rank:
    """This process's place in a distributed run: ``rank`` of ``world`` ranks, training under
    ``strategy`` (ddp | fsdp), its collectives counted and timed by ``comm``. Made by the
    launcher's worker (``peftbench.launch``) and handed down to the run and the loop; a plain
    run has none (``rank=None``)."""

    rank: int
    world: int
    strategy: str
    comm: CommCounter = field(default_factory=lambda: CommCounter())

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` as the strategy trains it (``wrap``)."""
        return wrap(model, self, device)


# ----------------------------------------------------------------------- communication
class CommCounter:
    """Bytes, calls and time of the collectives of the training steps, per optimizer step:
    ``begin`` at a step's start, ``end`` at its end keeps the step's totals (``steps``) and,
    for a timed step, the milliseconds during which a collective was in flight (``timed_ms``).

    Time (``issued``): on gloo, from the moment a collective is issued to the moment its work
    completes (its future's callback, on the gloo thread), so it includes waiting for a late
    peer, as any collective's time does; a step's figure is the union of its collectives'
    intervals (busy time: queued collectives are not counted twice). On NCCL the CUDA events of
    the collective's own stream (``TORCH_NCCL_ENABLE_TIMING``, set by the launcher), summed
    after the step, which synchronises anyway. Collectives run beside compute (DDP overlaps
    buckets with the backward), so busy time is an upper bound of what they add to the step.
    """

    def __init__(self) -> None:
        self.current: dict[str, int] = {}
        self.steps: list[dict[str, int]] = []
        self.intervals: list[list[float]] = []  # this step's [issued, done] (perf_counter, s)
        self.works: list[Any] = []  # this step's NCCL works, timed by their CUDA events
        self.untimed = 0  # this step's collectives that could not be timed
        self.timed_ms: list[Optional[float]] = []  # None: a step with an untimed collective
        self.nccl: Optional[bool] = None  # the group's backend, looked up at the first collective

    def add(self, kind: str, nbytes: int) -> None:
        self.current[f"{kind}_bytes"] = self.current.get(f"{kind}_bytes", 0) + int(nbytes)
        self.current[f"{kind}_calls"] = self.current.get(f"{kind}_calls", 0) + 1

    def issued(self, issue: Callable[[], Any], wait: bool) -> Any:
        """Issue one collective (``issue()``: its asynchronous ``dist.Work``) and time it to its
        completion. ``wait``: the caller asked for a synchronous call, so wait here and return
        None; else return the work. On gloo the end is the return of the wait, or the work's
        future when the caller waits later (a work without a future leaves the step untimed)."""
        if self.nccl is None:
            self.nccl = dist.get_backend() == "nccl"
        nccl = self.nccl
        t0 = time.perf_counter()
        work = issue()
        if nccl:
            self.works.append(work)
        if wait:
            work.wait()
            if not nccl:
                self.intervals.append([t0, time.perf_counter()])
            return None
        if not nccl:
            span = [t0, math.nan]
            try:
                work.get_future().add_done_callback(lambda _fut: span.__setitem__(1, time.perf_counter()))
            except RuntimeError:  # "getFuture not implemented" for this collective
                self.untimed += 1
            else:
                self.intervals.append(span)
        return work

    def begin(self) -> None:
        self.current, self.intervals, self.works, self.untimed = {}, [], [], 0

    def end(self, timed: bool = False) -> None:
        self.steps.append(dict(self.current))
        if timed:
            try:
                works = sum(w._get_duration() for w in self.works)  # ms, CUDA events (NCCL)
            except RuntimeError:  # timing not enabled in this process group: untimed, not guessed
                self.untimed += 1
            self.timed_ms.append(None if self.untimed else busy_ms(self.intervals) + works)


def busy_ms(intervals: list[list[float]]) -> float:
    """Milliseconds covered by at least one of the ``[start, end]`` intervals (seconds)."""
    total, reach = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if math.isnan(stop):
            raise RuntimeError("a collective of this step had not completed at the step's end")
        if stop > reach:
            total += stop - max(start, reach)
            reach = stop
    return total * 1e3


def _ddp_hook(counter: CommCounter) -> Any:
    """DDP's default hook (the bucket divided by the world size, then all-reduced), counted and
    timed."""

    def hook(state, bucket):  # noqa: ANN001, ANN202 (DDP checks the annotations: none or GradBucket)
        buf = bucket.buffer()
        counter.add("all_reduce", buf.numel() * buf.element_size())
        group = state if state is not None else dist.group.WORLD
        buf.div_(dist.get_world_size(group))
        work = counter.issued(lambda: dist.all_reduce(buf, group=group, async_op=True), wait=False)
        return work.get_future().then(lambda fut: fut.value()[0])

    return hook


def _fsdp_collectives(counter: CommCounter) -> tuple[Any, Any]:
    """FSDP2's default all-gather and reduce-scatter, counted and timed: issued asynchronously
    (so the work can be timed) and waited for here when FSDP asked for a synchronous call."""

    # imported here, as every heavy third-party module a distributed run alone needs: they add
    # seconds to the start of every command (a config error included)
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountedAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):  # noqa: ANN001
            counter.add("all_gather", output_tensor.numel() * output_tensor.element_size())
            issue = super().__call__
            return counter.issued(lambda: issue(output_tensor, input_tensor, group, True), wait=not async_op)

    class CountedReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # noqa: ANN001
            counter.add("reduce_scatter", input_tensor.numel() * input_tensor.element_size())
            issue = super().__call__
            return counter.issued(lambda: issue(output_tensor, input_tensor, group, op, True), wait=not async_op)

    return CountedAllGather(), CountedReduceScatter()


def follow_fsdp_storage() -> None:
    """Make FSDP2's storage frees and re-allocations (``storage.resize_``, which no operator
    shows) known to the memory tracker (``memory.storage_resized``), so an unsharded parameter
    counts only while its storage holds bytes. Idempotent."""

    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    if getattr(_fsdp_param.free_storage, "_peftbench", False):
        return
    for module, name in (
        (_fsdp_param, "free_storage"),
        (_fsdp_param, "alloc_storage"),
        (_fsdp_param_group, "alloc_storage"),
    ):
        original = getattr(module, name)

        def followed(tensor: torch.Tensor, _original: Any = original) -> None:
            _original(tensor)
            storage_resized(tensor)

        followed._peftbench = True  # type: ignore[attr-defined]
        setattr(module, name, followed)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: every transformer layer (transformers'
    ``GradientCheckpointingLayer``: LLaMA's decoder layers, GPT-2's blocks, BERT's layers, with
    whatever a method put inside them); the root takes the rest (embeddings, head, a prefix)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def wrap(model: nn.Module, ctx: Rank, device: torch.device) -> nn.Module:
    """The model as the strategy trains it: DDP (a replica per rank, gradients all-reduced) or
    FSDP2 (every transformer layer, then the root, ``fully_shard``; frozen and trainable
    parameters may share a unit, as FSDP2 allows). The counters are installed here."""
    if ctx.strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=ids)
        ddp.register_comm_hook(None, _ddp_hook(ctx.comm))
        return ddp
    all_gather, reduce_scatter = _fsdp_collectives(ctx.comm)
    for m in [*shard(model), model]:  # FSDPModule's methods, which fully_shard gave them
        cast(Any, m).set_custom_all_gather(all_gather)
        cast(Any, m).set_custom_reduce_scatter(reduce_scatter)
    return model


def shard(model: nn.Module, mesh: Any = None) -> list[nn.Module]:
    """FSDP2 ``fully_shard`` on every transformer layer (``shard_units``), then on the root, over
    ``mesh`` (default: the whole default group); the storage frees followed by the memory
    tracker. Returns the layers."""
    from torch.distributed.fsdp import fully_shard

    follow_fsdp_storage()
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return units


def no_sync(model: nn.Module, last: bool, rank: Optional[Rank]) -> AbstractContextManager:
    """The context of one micro-batch's backward under accumulation: gradients are reduced only
    at the step's last micro-batch (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync``).
    ``rank``: the run's ``Rank`` (None in a plain run: nothing to hold back)."""
    if rank is None or last:
        if rank is not None and rank.strategy == "fsdp":
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
        return nullcontext()
    if rank.strategy == "ddp":
        return model.no_sync()  # type: ignore[operator]
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    return nullcontext()


def padded_numel(p: torch.Tensor, world: int) -> int:
    """Elements of ``p`` once FSDP pads its first dimension to a multiple of ``world``."""
    shape = tuple(p.shape)
    if not shape:
        return world
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / world) * world * rest


def comm_closed_form(model: nn.Module, strategy: str, world: int, micro_batches: int = 1) -> dict[str, int]:
    """Collective message bytes of one optimizer step of ``micro_batches`` micro-batches, from
    the trainable set and the sharding of a plain (unwrapped) ``model``. Gradients are reduced
    once per step (``no_sync``).

    DDP: one all-reduce of every trainable parameter's gradient (bytes of the gradients).
    FSDP2 (``wrap``): for every micro-batch, each unit's parameters all-gathered (padded to
    ``world`` rows) in forward, and again in backward for every unit but the root (the root
    keeps its parameters unsharded between forward and backward); once per step, each unit's
    trainable gradients reduce-scattered (padded).
    """
    if strategy == "ddp":  # DDP all-reduces its buckets even on one rank
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return {"all_reduce_bytes": grads}
    if world == 1:  # FSDP2 on one rank holds everything whole and issues no collective
        return {"all_gather_bytes": 0, "reduce_scatter_bytes": 0}
    units = shard_units(model)
    owner: dict[int, int] = {}  # parameter -> index of the unit that shards it (len(units): root)
    for i, unit in enumerate(units):
        for p in unit.parameters():
            owner.setdefault(id(p), i)
    gather = [0] * (len(units) + 1)
    reduce = [0] * (len(units) + 1)
    for p in model.parameters():
        i = owner.get(id(p), len(units))
        n = padded_numel(p, world) * p.element_size()
        gather[i] += n
        if p.requires_grad:
            reduce[i] += n
    backward_regather = sum(gather[:-1])
    return {"all_gather_bytes": (sum(gather) + backward_regather) * micro_batches, "reduce_scatter_bytes": sum(reduce)}


def ring_bytes_sent(message: dict[str, int], world: int) -> int:
    """Bytes each rank sends for these messages under ring algorithms: all-reduce 2 (N-1)/N,
    all-gather and reduce-scatter (N-1)/N of the message."""
    factor = {"all_reduce_bytes": 2.0, "all_gather_bytes": 1.0, "reduce_scatter_bytes": 1.0}
    return round(sum(factor[k] * v * (world - 1) / world for k, v in message.items() if k in factor))


def rank_slice(batch: dict[str, torch.Tensor], ctx: Optional[Rank]) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of a global batch (the batch itself in a plain run)."""
    if ctx is None or ctx.world == 1:
        return batch
    n = next(iter(batch.values())).shape[0] // ctx.world
    return {k: v[ctx.rank * n : (ctx.rank + 1) * n] for k, v in batch.items()}


# ------------------------------------------------------------------------ per-rank figures
def gather(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``local`` figures, in rank order (a collective: every rank calls it)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def combine(ranks: list[dict[str, Any]], steps: StepRecorder) -> dict[str, Any]:
    """The run's flat figures from its ranks' (``ranks[r]``: ``peak_memory_bytes``, the
    breakdown, ``step_ms`` of the timed steps, ``comm``, ``comm_ms``) and the global batch's
    sizes per timed step (``steps``: its tokens, padded tokens and samples; its times are
    ignored). Peak memory and breakdown: the rank with the highest peak. Each timed step lasts
    as long as its slowest rank, and every throughput figure is the global batch over that time
    (``StepRecorder.metrics``: medians and IQRs). Collective bytes: the last step's (every step
    moves the same). Time in collectives (``comm_ms``: each timed step's busy time,
    ``CommCounter``): the rank that spent most in them per step, and its share of that step."""
    out: dict[str, Any] = {}
    top = max(ranks, key=lambda r: r.get("peak_memory_bytes") or 0)
    for k, v in top.items():
        if k.startswith(("peak_memory", "memory_")):
            out[k] = v
    out["peak_memory_rank"] = top["rank"]
    per_step = [max(ms) for ms in zip(*(r["step_ms"] for r in ranks))]
    if per_step:
        out.update(StepRecorder(per_step, steps.tokens, steps.padded, steps.samples).metrics())
    comm = ranks[0].get("comm") or {}
    out.update({f"comm_{k}_per_step": v for k, v in comm.items()})
    timed = [(max(ms), s) for ms, s in zip(zip(*(r.get("comm_ms") or [] for r in ranks)), per_step) if None not in ms]
    if timed:
        st = stats([c for c, _ in timed])
        out["comm_ms_per_step_median"], out["comm_ms_per_step_iqr"] = st["median"], st["iqr"]
        out["comm_share_of_step_median"] = stats([c / s for c, s in timed])["median"]
    return out
