"""One fine-tuning job across several processes: data parallel (DDP) or sharded (FSDP2), with
PyTorch's own stack (``torch.distributed``, its elastic launcher, ``DistributedDataParallel``,
``fully_shard``), measured per rank.

``python -m peftbench parallel=ddp parallel.nproc=2`` (or ``parallel=fsdp``): the job's process
starts ``parallel.nproc`` worker processes through ``torch.distributed``'s elastic launcher
(``launch``), one per rank, gloo on CPU and NCCL on CUDA (rank r on ``cuda:r``). Every rank
builds the same model and method (same seed), evaluates it before training on its own plain
copy (no communication), wraps it (``wrap``) and trains on its slice of every global batch of
``train.batch_size`` examples; each micro-batch's loss is weighted by its share of the global
batch's predicted tokens times the world size, so the averaged gradient is the global batch's,
and the loss curve is the one process's (tested). After training the ranks gather their
figures on rank 0 (``combine``): peak memory and breakdown per rank (sharded weights, gradients
and optimizer state appear as the shard each rank holds), step times (a step takes as long as
its slowest rank), collective bytes. Rank 0 alone then evaluates, measures inference and
returns the record, which the job's process writes: one record per run.

A rank that fails or dies stops the others (the launcher's monitor; collectives also time out
after ``parallel.timeout_s``) and the job's record says ``failed``, naming the rank and the
reason; the sweep goes on.

Communication (``CommCounter``): DDP's gradient all-reduce is counted by a communication hook
on every bucket; FSDP2's all-gathers and reduce-scatters by its custom-collective hooks. Bytes
are message sizes (the full buffer a collective reduces or gathers); ``comm_closed_form`` gives
them from the trainable set and the sharding, and the ring algorithm's bytes each rank sends
follow from them (all-reduce 2 (N-1)/N, all-gather and reduce-scatter (N-1)/N of the message).
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import socket
import tempfile
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")
# fault injection for the tests: the rank named in this variable kills itself (SIGKILL) right
# after joining the group, as a crashed or OOM-killed worker would
KILL_RANK = "PEFTBENCH_KILL_RANK"
BACKENDS = ("auto", "gloo", "nccl")


# ------------------------------------------------------------------------ the current rank
@dataclass
class Context:
    """The distributed run this process is a rank of (``ACTIVE``; None in a plain run)."""

    rank: int
    world: int
    strategy: str
    comm: CommCounter = field(default_factory=lambda: CommCounter())


ACTIVE: Optional[Context] = None


def active() -> Optional[Context]:
    return ACTIVE


# ----------------------------------------------------------------------- communication
class CommCounter:
    """Bytes and calls of the collectives of the training steps, per optimizer step: ``begin``
    at a step's start, ``end`` at its end keeps the step's totals (``steps``)."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}
        self.steps: list[dict[str, int]] = []

    def add(self, kind: str, nbytes: int) -> None:
        self.current[f"{kind}_bytes"] = self.current.get(f"{kind}_bytes", 0) + int(nbytes)
        self.current[f"{kind}_calls"] = self.current.get(f"{kind}_calls", 0) + 1

    def begin(self) -> None:
        self.current = {}

    def end(self) -> None:
        self.steps.append(dict(self.current))


def _ddp_hook(counter: CommCounter) -> Any:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):  # noqa: ANN001, ANN202 (DDP checks the annotations: none or GradBucket)
        buf = bucket.buffer()
        counter.add("all_reduce", buf.numel() * buf.element_size())
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def _fsdp_collectives(counter: CommCounter) -> tuple[Any, Any]:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountedAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):  # noqa: ANN001
            counter.add("all_gather", output_tensor.numel() * output_tensor.element_size())
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountedReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # noqa: ANN001
            counter.add("reduce_scatter", input_tensor.numel() * input_tensor.element_size())
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountedAllGather(), CountedReduceScatter()


def follow_fsdp_storage() -> None:
    """Make FSDP2's storage frees and re-allocations (``storage.resize_``, which no operator
    shows) known to the memory tracker (``memory.storage_resized``), so an unsharded parameter
    counts only while its storage holds bytes. Idempotent."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    from peftbench.memory import storage_resized

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


def wrap(model: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    """The model as the strategy trains it: DDP (a replica per rank, gradients all-reduced) or
    FSDP2 (every transformer layer, then the root, ``fully_shard``; frozen and trainable
    parameters may share a unit, as FSDP2 allows). The counters are installed here."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        ddp.register_comm_hook(None, _ddp_hook(ctx.comm))
        return ddp
    from torch.distributed.fsdp import fully_shard

    follow_fsdp_storage()
    all_gather, reduce_scatter = _fsdp_collectives(ctx.comm)
    units = shard_units(model)
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    for m in [*units, model]:
        m.set_custom_all_gather(all_gather)
        m.set_custom_reduce_scatter(reduce_scatter)
    return model


def no_sync(model: nn.Module, last: bool) -> Any:
    """The context of one micro-batch's backward under accumulation: gradients are reduced only
    at the step's last micro-batch (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync``)."""
    from contextlib import nullcontext

    ctx = ACTIVE
    if ctx is None or last:
        if ctx is not None and ctx.strategy == "fsdp":
            model.set_requires_gradient_sync(True)
        return nullcontext()
    if ctx.strategy == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)
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


# --------------------------------------------------------------------------- the batch
def rank_slice(batch: dict[str, torch.Tensor], ctx: Optional[Context]) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of a global batch (the batch itself in a plain run)."""
    if ctx is None or ctx.world == 1:
        return batch
    n = next(iter(batch.values())).shape[0] // ctx.world
    return {k: v[ctx.rank * n : (ctx.rank + 1) * n] for k, v in batch.items()}


# ------------------------------------------------------------------------ per-rank figures
def gather(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``local`` figures, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def combine(ranks: list[dict[str, Any]], global_tokens: list[int], global_samples: list[int]) -> dict[str, Any]:
    """The run's flat figures from its ranks' (``ranks[r]``: ``peak_memory_bytes``, the
    breakdown, ``step_ms`` of the timed steps, ``comm``): peak memory and breakdown of the rank
    with the highest peak; each timed step as long as its slowest rank, its throughput the global
    batch's tokens (samples) over that time, medians and IQRs of them; collective bytes of the
    last step (every step moves the same)."""
    from peftbench.timing import stats

    out: dict[str, Any] = {}
    top = max(ranks, key=lambda r: r.get("peak_memory_bytes") or 0)
    for k, v in top.items():
        if k.startswith(("peak_memory", "memory_")):
            out[k] = v
    out["peak_memory_rank"] = top["rank"]
    per_step = [max(ms) for ms in zip(*(r["step_ms"] for r in ranks))]
    if per_step:
        st = stats(per_step)
        tok = stats([t / ms * 1e3 for t, ms in zip(global_tokens, per_step)])
        out.update(
            {
                "train_step_ms_median": st["median"],
                "train_step_ms_iqr": st["iqr"],
                "train_tokens_per_s": tok["median"],
                "train_tokens_per_s_iqr": tok["iqr"],
                "train_samples_per_s": stats([s / ms * 1e3 for s, ms in zip(global_samples, per_step)])["median"],
            }
        )
    comm = ranks[0].get("comm") or {}
    out.update({f"comm_{k}_per_step": v for k, v in comm.items()})
    return out


# -------------------------------------------------------------------------------- launch
def backend(name: str, device: torch.device) -> str:
    return ("nccl" if device.type == "cuda" else "gloo") if name == "auto" else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(cfg: Any, errors: str) -> Optional[dict[str, Any]]:
    """One rank (in its own process): join the group, run the job's steps, and return the
    record (rank 0) or None. A failure is written to ``errors/<rank>.txt`` and raised, so the
    launcher stops the other ranks."""
    global ACTIVE
    import torch.distributed as dist

    from peftbench import config as config_mod
    from peftbench import run

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        device = config_mod.resolve_device(cfg.device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend(cfg.parallel.backend, device),
            timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.device = str(device)  # this rank's device (cuda:<local rank>)
        if os.environ.get(KILL_RANK) == str(rank):  # fault injection (tests): die unannounced
            os.kill(os.getpid(), signal.SIGKILL)
        ACTIVE = Context(rank, world, cfg.parallel.strategy)
        rec = run.new_record(cfg)
        run.execute(cfg, rec)
        return rec if rank == 0 else None
    except BaseException as e:
        from peftbench.app import failure

        Path(errors, f"{rank}.txt").write_text(failure(e) + "\n" + traceback.format_exc())
        raise
    finally:
        ACTIVE = None
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(n: int, fn: Any, *args: Any) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``n`` fresh processes, ranks 0..n-1 of one local group, through
    ``torch.distributed``'s elastic launcher (rendezvous on a free local port, no restarts; the
    environment each process needs to ``init_process_group`` is set); returns {rank: result}.
    Raises the launcher's ``ChildFailedError`` when a process fails or dies (the others are
    stopped)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch_cfg = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    return elastic_launch(launch_cfg, fn)(*args)


def run_configs(configs: list[list[str]], timeout_s: float = 120.0) -> Optional[list[dict[str, Any]]]:
    """In each process of ``spawn``: join one gloo group and run every config (a list of
    Hydra overrides, with its ``parallel`` settings) as this rank, one after another; rank 0
    returns the records (not written), the others None. For tests and the estimator's
    calibration, which run many small distributed jobs on one group."""
    global ACTIVE
    import torch.distributed as dist

    from peftbench import cli, run

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    try:
        for overrides in configs:
            cfg = cli.checked_config(*overrides)
            ACTIVE = Context(rank, world, cfg.parallel.strategy)
            rec = run.new_record(cfg)
            run.execute(cfg, rec)
            out.append(rec)
    finally:
        ACTIVE = None
        dist.destroy_process_group()
    return out if rank == 0 else None


class RankFailed(RuntimeError):
    """A rank of a distributed run failed or died (one line: which rank, and why)."""


def launch(cfg: Any) -> dict[str, Any]:
    """Run the job on ``parallel.nproc`` ranks (this process starts them and waits); returns
    rank 0's record. Raises ``RankFailed`` naming the first rank that failed and its error (or
    its exit code or signal when it died without a word)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    n = cfg.parallel.nproc
    with tempfile.TemporaryDirectory(prefix="peftbench-ranks-") as errors:
        try:
            results = spawn(n, _worker, cfg, errors)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            said = Path(errors, f"{rank}.txt")
            if said.is_file():
                raise RankFailed(f"rank {rank} of {n}: {said.read_text().splitlines()[0]}") from None
            code = failure.exitcode
            why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise RankFailed(f"rank {rank} of {n} died ({why}); the other ranks were stopped") from None
    return results[0]
