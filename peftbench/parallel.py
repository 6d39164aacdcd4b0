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
import time
import traceback
import uuid
import zlib
from collections.abc import Callable
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
        import torch.distributed as dist

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
    import torch.distributed as dist

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
    all_gather, reduce_scatter = _fsdp_collectives(ctx.comm)
    for m in [*shard(model), model]:
        m.set_custom_all_gather(all_gather)
        m.set_custom_reduce_scatter(reduce_scatter)
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
    last step (every step moves the same); time in collectives (``comm_ms``: each timed step's
    busy time, ``CommCounter``) as the rank that spent most in them per step, and its share of
    that step's time."""
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
    timed = [(max(ms), s) for ms, s in zip(zip(*(r.get("comm_ms") or [] for r in ranks)), per_step) if None not in ms]
    if timed:
        st = stats([c for c, _ in timed])
        out["comm_ms_per_step_median"], out["comm_ms_per_step_iqr"] = st["median"], st["iqr"]
        out["comm_share_of_step_median"] = stats([c / s for c, s in timed])["median"]
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
        if backend(cfg.parallel.backend, device) == "nccl":  # CUDA events per collective (CommCounter)
            os.environ.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")
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


@dataclass(frozen=True)
class Topology:
    """Where this job's process sits in a run: ``nnodes`` nodes of ``nproc`` ranks each, this
    one node ``node_rank``; ``endpoint`` (host:port) is node 0's rendezvous store; ``source``
    says where the node came from (local, config, or the submitit job environment)."""

    nnodes: int
    node_rank: int
    nproc: int
    endpoint: str
    source: str

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc


def job_environment() -> Any:
    """submitit's description of the scheduler job this process is a task of (its nodes, node
    id, tasks): a submitit job, or a SLURM step started by ``srun`` (read through submitit's
    SLURM environment); None outside any."""
    try:
        import submitit
        from submitit.slurm.slurm import SlurmJobEnvironment
    except ImportError:
        return None
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return SlurmJobEnvironment() if "SLURM_JOB_ID" in os.environ else None


def knows_its_node(par: Any) -> bool:
    """Whether a job of ``parallel`` settings ``par`` will find its node: one node, both
    ``node_rank`` and ``master`` given, inside a scheduler job, or submitted through submitit's
    SLURM launcher (whose tasks are scheduler jobs)."""
    from peftbench.app import LAUNCHER_ENV

    given = par.node_rank is not None and par.master is not None
    slurm = os.environ.get(LAUNCHER_ENV, "") == "SlurmLauncher"
    return par.nnodes == 1 or given or slurm or job_environment() is not None


def job_port(job_id: str) -> int:
    """The rendezvous port every node of one scheduler job derives alike from its id (20000 to
    39999; two jobs sharing a node are unlikely to meet)."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def topology(par: Any) -> Topology:
    """This process's place in the run of ``parallel`` settings ``par``. One node: a free local
    port. Several: ``parallel.node_rank`` and ``parallel.master`` as given, else from the
    scheduler job this process is a task of (``hydra/launcher=submitit_slurm`` with
    ``hydra.launcher.nodes=M tasks_per_node=1``, or ``srun --ntasks-per-node=1``: node id,
    first host of the node list, a port from the job id). Raises ``ConfigError`` (one line)
    when neither says."""
    from methods import ConfigError

    if par.nnodes == 1:
        return Topology(1, 0, par.nproc, f"127.0.0.1:{free_port()}", "local")
    node, master, source = par.node_rank, par.master, "config"
    if node is None or master is None:
        env = job_environment()
        if env is None:
            raise ConfigError(
                f"parallel.nnodes={par.nnodes}: this process does not know its node; allowed: "
                "parallel.node_rank=K parallel.master=HOST:PORT on every node, or a submitit_slurm job of "
                f"{par.nnodes} nodes"
            )
        if env.num_nodes != par.nnodes or env.num_tasks != env.num_nodes:
            raise ConfigError(
                f"parallel.nnodes={par.nnodes}: the submitit job has {env.num_tasks} tasks on {env.num_nodes} "
                f"nodes; allowed: hydra.launcher.nodes={par.nnodes} hydra.launcher.tasks_per_node=1 (each node's "
                "task starts its parallel.nproc ranks)"
            )
        node = env.node if node is None else node
        master = master or f"{env.hostnames[0]}:{job_port(str(env.job_id))}"
        source = f"{env.name()} job {env.job_id} (submitit's job environment)"
    return Topology(par.nnodes, int(node), par.nproc, master, source)


def spawn(n: int, fn: Any, *args: Any, topo: Optional[Topology] = None, timeout_s: float = 600.0) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``n`` fresh processes through ``torch.distributed``'s elastic
    launcher (no restarts; the environment each process needs to ``init_process_group`` is
    set); returns {global rank: result} for this node's ranks. One node (``topo`` None or of
    one node): ranks 0..n-1, rendezvous on a free local port. Several: this node's launcher
    meets the others' at ``topo.endpoint`` (static rendezvous, as ``torchrun --nnodes M
    --node-rank K --master-addr ...``; node K holds ranks K n .. K n + n - 1), waiting up to
    ``timeout_s`` seconds for them. Raises the launcher's ``ChildFailedError`` when a process
    fails or dies (the others on this node are stopped)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if topo is None or topo.nnodes == 1:
        nodes, endpoint, backend_, run_id = 1, f"127.0.0.1:{free_port()}", "c10d", uuid.uuid4().hex
        configs: dict[str, Any] = {}
    else:
        nodes, endpoint, backend_ = topo.nnodes, topo.endpoint, "static"
        run_id = f"peftbench-{topo.endpoint}"
        configs = {"rank": topo.node_rank, "timeout": timeout_s}
    launch_cfg = LaunchConfig(
        min_nodes=nodes,
        max_nodes=nodes,
        nproc_per_node=n,
        run_id=run_id,
        rdzv_backend=backend_,
        rdzv_endpoint=endpoint,
        rdzv_configs=configs,
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
    """Run the job on this node's ``parallel.nproc`` ranks (this process starts them and
    waits); returns rank 0's record. Raises ``RankFailed`` naming the first rank of this node
    that failed and its error (or its exit code or signal when it died without a word). On a
    node other than node 0 of a run across several, raises ``app.RecordElsewhere`` instead,
    saying how this node's share ended: node 0's job writes the record."""
    from peftbench.app import RecordElsewhere, failure

    topo = topology(cfg.parallel)
    try:
        rec = _launch(cfg, topo)
    except Exception as e:
        if topo.node_rank == 0:
            raise
        raise RecordElsewhere(f"node {topo.node_rank} of {topo.nnodes} failed: {failure(e)}", ok=False) from e
    if topo.node_rank != 0:
        first, last = topo.node_rank * topo.nproc, (topo.node_rank + 1) * topo.nproc - 1
        mine = f"rank {first}" if first == last else f"ranks {first}-{last}"
        raise RecordElsewhere(
            f"node {topo.node_rank} of {topo.nnodes}: {mine} of {topo.world} trained; node 0 ({topo.endpoint}) "
            "writes the record",
            ok=True,
        )
    rec.setdefault("parallel", {}).update(
        {"nnodes": topo.nnodes, "nproc_per_node": topo.nproc, "rendezvous": topo.source}
    )
    return rec


def _launch(cfg: Any, topo: Topology) -> Optional[dict[str, Any]]:
    """``launch``'s ranks: rank 0's record (None on a node without rank 0)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    world = topo.world
    elsewhere = "; a rank on another node may have failed first (see that node's log)" if topo.nnodes > 1 else ""
    with tempfile.TemporaryDirectory(prefix="peftbench-ranks-") as errors:
        try:
            results = spawn(topo.nproc, _worker, cfg, errors, topo=topo, timeout_s=cfg.parallel.timeout_s)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            said = Path(errors, f"{rank}.txt")
            if said.is_file():
                raise RankFailed(f"rank {rank} of {world}: {said.read_text().splitlines()[0]}{elsewhere}") from None
            code = failure.exitcode
            why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise RankFailed(f"rank {rank} of {world} died ({why}); the other ranks were stopped{elsewhere}") from None
    return results.get(0)
