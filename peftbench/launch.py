"""Starting the ranks of a distributed run, above the run itself: ``python -m peftbench
parallel=ddp parallel.nproc=2`` (or ``parallel=fsdp``).

The job's process (``execute``) starts ``parallel.nproc`` worker processes through
``torch.distributed``'s elastic launcher (``spawn``), one per rank, gloo on CPU and NCCL on CUDA
(rank r on ``cuda:r``). Each worker (``_worker``) joins the process group and runs the job as its
rank: ``peftbench.run.execute(cfg, rec, rank)`` with an explicit ``peftbench.ranks.Rank``. Every
rank builds the same model and method (same seed), evaluates it before training on its own plain
copy (no communication), wraps it and trains on its slice of every global batch of
``train.batch_size`` examples; each micro-batch's loss is weighted by its share of the global
batch's predicted tokens times the world size, so the averaged gradient is the global batch's,
and the loss curve is the one process's (tested). After training the ranks gather their figures
on rank 0 (``ranks.combine``); rank 0 alone then evaluates, measures inference and returns the
record, which the job's process writes: one record per run. A plain run (``parallel=none``)
runs in the job's process.

A rank that fails or dies stops the others (the launcher's monitor; collectives also time out
after ``parallel.timeout_s``) and the job's record says ``failed``, naming the rank and the
reason (``RankFailed``); the sweep goes on. Across several nodes each node's job starts its own
ranks (``topology``: from the config or the scheduler job); node 0 writes the record and the
others raise ``errors.RecordElsewhere``.

Started by torchrun (``torchrun --nproc-per-node 2 -m peftbench parallel=ddp``, or ``accelerate
launch``), every process runs the command: a ddp or fsdp job joins the launcher's world, each
process as its rank (``join``), and rank 0 writes the one record; ``parallel.nproc`` defaults to
the launcher's processes per node and is checked against them (``config.check_launcher``), and a
job that would run once per process (``parallel=none``, a sweep, srun with several tasks per
node, mpirun) is refused in one line on every process, exit status 2, nothing written.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import tempfile
import threading
import traceback
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, open_dict
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from peftbench import config as config_mod
from peftbench import run
from peftbench.app import LAUNCHER_ENV
from peftbench.errors import ConfigError, RecordElsewhere, failure
from peftbench.ranks import Rank

# fault injection for the tests: the rank named in this variable kills itself (SIGKILL) right
# after joining the group, as a crashed or OOM-killed worker would
KILL_RANK = "PEFTBENCH_KILL_RANK"
# the record keys ``run.new_record`` sets from the job's config: rank 0's record (its config names
# the rank's own device) gives everything else
IDENTITY = ("schema_version", "run_id", "kind", "status", "error", "method", "model", "task", "config_hash", "config")


def execute(cfg: DictConfig, rec: dict[str, Any]) -> None:
    """The run command's job: a plain run in this process (``run.execute``), or, with
    ``parallel`` other than none, this node's ranks started and rank 0's record taken into
    ``rec`` (the job's identity, its run id, config and hash, stays this process's)."""
    if cfg.parallel.strategy == "none":
        run.execute(cfg, rec)
        return
    config_mod.check(cfg)
    outside = config_mod.external_launcher()
    if outside is not None and outside.joins and outside.world > 1:
        found = join(cfg, outside)
    else:
        found = launch(cfg)
    rec.update({k: v for k, v in found.items() if k not in IDENTITY})


def check_job(cfg: DictConfig) -> None:
    """The run command's check of a composed config: the run's own (``run.check_run``: values,
    data, the method on the model's structure on meta), then whether this process can find its
    node in a run across several (``check_topology``)."""
    run.check_run(cfg)
    check_topology(cfg.parallel)


def backend(name: str, device: torch.device) -> str:
    return ("nccl" if device.type == "cuda" else "gloo") if name == "auto" else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(cfg: DictConfig, errors: str) -> Optional[dict[str, Any]]:
    """One rank started by ``spawn`` (in its own process): ``_rank``; a failure is written to
    ``errors/<rank>.txt`` and raised, so the launcher stops the other ranks."""
    try:
        return _rank(cfg)
    except BaseException as e:
        Path(errors, f"{os.environ['RANK']}.txt").write_text(failure(e) + "\n" + traceback.format_exc())
        raise


def interrupt_once() -> None:
    """Let a Ctrl-C stop this rank once: the first SIGINT raises ``KeyboardInterrupt``, and any
    later one is ignored while the job unwinds. A terminal's Ctrl-C reaches a rank twice (from
    the terminal, to the whole process group, and from its launcher, which forwards the SIGINT
    it got), and a second ``KeyboardInterrupt`` inside the first's unwinding prints a traceback
    that no handler can catch (Python reports it as ``Exception ignored in``)."""

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # only the main thread may set it
        signal.signal(signal.SIGINT, stop)


def _rank(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """This process as one rank of the world its launcher set up (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``: ``spawn``'s or torchrun's): join the group,
    run the job as this rank, and return the record (rank 0) or None. A Ctrl-C stops it once
    (``interrupt_once``)."""
    interrupt_once()
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
        with open_dict(cfg):
            cfg.device = str(device)  # this rank's device (cuda:<local rank>)
        if os.environ.get(KILL_RANK) == str(rank):  # fault injection (tests): die unannounced
            os.kill(os.getpid(), signal.SIGKILL)
        rec = run.new_record(cfg)
        run.execute(cfg, rec, Rank(rank, world, cfg.parallel.strategy))
        return rec if rank == 0 else None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def join(cfg: DictConfig, outside: config_mod.Launcher) -> dict[str, Any]:
    """Run the job as this process's rank of the world an external launcher started (torchrun,
    ``accelerate launch``: every process runs the command, ``config.check_launcher`` has checked
    ``parallel.nproc`` and ``nnodes`` against the world). Rank 0 returns its record, which its
    job writes: one record per job. Any other rank raises ``errors.RecordElsewhere`` saying how
    its share ended (ok, or failed with its reason). A rank that fails is the launcher's to stop
    the others (torchrun does); rank 0 records a failure only when it fails itself."""
    where = f"rank {outside.rank} of {outside.world} ({outside.name})"
    try:
        rec = _rank(cfg)
    except Exception as e:
        if outside.rank == 0:
            raise
        raise RecordElsewhere(f"{where} failed: {failure(e)}", ok=False) from e
    if outside.rank != 0:
        raise RecordElsewhere(f"{where} trained; rank 0 writes the record", ok=True)
    assert rec is not None  # rank 0's
    rec.setdefault("parallel", {}).update(
        {
            "nnodes": outside.world // outside.local,
            "nproc_per_node": outside.local,
            "rendezvous": f"{outside.name} (its {outside.world} processes joined as the ranks)",
        }
    )
    return rec


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
        """Ranks in the whole run (``config.world_size`` of the settings it came from)."""
        return config_mod.world_size({"strategy": "ddp", "nnodes": self.nnodes, "nproc": self.nproc})


def job_environment() -> Any:
    """submitit's description of the scheduler job this process is a task of (its nodes, node
    id, tasks): a submitit job, or a SLURM step started by ``srun`` (read through submitit's
    SLURM environment); None outside any."""
    try:
        import submitit  # optional: the SLURM launcher's package
        from submitit.slurm.slurm import SlurmJobEnvironment
    except ImportError:
        return None
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return SlurmJobEnvironment() if "SLURM_JOB_ID" in os.environ else None


def knows_its_node(par: DictConfig) -> bool:
    """Whether a job of ``parallel`` settings ``par`` will find its node: one node, both
    ``node_rank`` and ``master`` given, started by torchrun, inside a scheduler job, or submitted
    through submitit's SLURM launcher (whose tasks are scheduler jobs)."""
    given = par.node_rank is not None and par.master is not None
    slurm = os.environ.get(LAUNCHER_ENV, "") == "SlurmLauncher"
    outside = config_mod.external_launcher()
    joins = outside is not None and outside.joins  # torchrun knows every process's place
    return par.nnodes == 1 or given or slurm or joins or job_environment() is not None


def check_topology(par: DictConfig) -> None:
    """One-line ``ConfigError`` when a run across several nodes cannot tell which node this
    process is (``knows_its_node``)."""
    config_mod.require(
        knows_its_node(par),
        "parallel.nnodes",
        par.nnodes,
        "this process cannot tell which node it is; allowed: parallel.node_rank=K and parallel.master=HOST:PORT "
        "on every node, a SLURM job (srun, one task per node), or -m hydra/launcher=submitit_slurm",
    )


def job_port(job_id: str) -> int:
    """The rendezvous port every node of one scheduler job derives alike from its id (20000 to
    39999; two jobs sharing a node are unlikely to meet)."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def topology(par: DictConfig) -> Topology:
    """This process's place in the run of ``parallel`` settings ``par``. One node: a free local
    port. Several: ``parallel.node_rank`` and ``parallel.master`` as given, else from the
    scheduler job this process is a task of (``hydra/launcher=submitit_slurm`` with
    ``hydra.launcher.nodes=M tasks_per_node=1``, or ``srun --ntasks-per-node=1``: node id,
    first host of the node list, a port from the job id). Raises ``ConfigError`` (one line)
    when neither says."""
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


def run_many(configs: list[DictConfig], timeout_s: float = 120.0) -> Optional[list[dict[str, Any]]]:
    """In each process of ``spawn``: join one gloo group and run every config (composed and
    checked, each with its ``parallel`` settings) as this rank, one after another; rank 0
    returns the records (not written), the others None. For the estimator's distributed
    calibration and the tests, which run many small distributed jobs on one group."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    try:
        for cfg in configs:
            rec = run.new_record(cfg)
            run.execute(cfg, rec, Rank(rank, world, cfg.parallel.strategy))
            out.append(rec)
    finally:
        dist.destroy_process_group()
    return out if rank == 0 else None


class RankFailed(RuntimeError):
    """A rank of a distributed run failed or died (one line: which rank, and why)."""


def launch(cfg: DictConfig) -> dict[str, Any]:
    """Run the job on this node's ``parallel.nproc`` ranks (this process starts them and
    waits); returns rank 0's record. Raises ``RankFailed`` naming the first rank of this node
    that failed and its error (or its exit code or signal when it died without a word). On a
    node other than node 0 of a run across several, raises ``errors.RecordElsewhere`` instead,
    saying how this node's share ended: node 0's job writes the record."""
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
    assert rec is not None  # node 0 holds rank 0, whose record this is
    rec.setdefault("parallel", {}).update(
        {"nnodes": topo.nnodes, "nproc_per_node": topo.nproc, "rendezvous": topo.source}
    )
    return rec


def _launch(cfg: DictConfig, topo: Topology) -> Optional[dict[str, Any]]:
    """``launch``'s ranks: rank 0's record (None on a node without rank 0)."""
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
