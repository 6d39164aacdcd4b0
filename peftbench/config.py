"""Typed configuration: dataclass schemas in Hydra's ConfigStore, plus value checks.

The YAML files under ``conf/`` pick these schemas through their defaults lists, so a value of
the wrong type is rejected by OmegaConf, and ``check`` rejects values of the right type that
cannot work. Both end in a one-line error naming the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import methods
from peftbench.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
TASK_KINDS = ("causal-lm", "classification")
DTYPES = ("float32", "bfloat16", "float16")
# The values the runtime accepts, declared here so that the config layer checks them without
# importing the runtime (``peftbench.precision``, ``peftbench.quantize``, ``peftbench.ranks``,
# ``peftbench.launch``); ``tests/test_layers.py`` holds the runtime to the same tuples.
PRECISIONS = ("fp32", "bf16-mixed", "bf16", "fp16-mixed")  # train.precision
MIXED_PRECISIONS = ("bf16-mixed", "fp16-mixed")  # float32 master weights, autocast compute
# bf16-master (estimator only): bf16 weights with fp32 master copies and moments of the trained
# ones, as Megatron and DeepSpeed (``peftbench.estimate.cost``)
MASTER = "bf16-master"
ESTIMATE_PRECISIONS = (*PRECISIONS, MASTER)
QUANTIZE_SCHEMES = ("nf4", "int8")  # model.quantize
STRATEGIES = ("none", "ddp", "fsdp")  # parallel.strategy
BACKENDS = ("auto", "gloo", "nccl")  # parallel.backend
ATTENTION = ("flash", "eager")  # the estimator's attention kernel
PROFILES = ("full", "quality")  # measure.profile
MAX_ESTIMATE_TOKENS = 2**32  # per step: keeps every meta tensor's element count far below 2**63


@dataclass
class ModelConfig:
    """The base model.

    name: the preset's name, as it appears in results. name_or_path: a local directory, a hub
    id, a ``.gguf`` file, or ``pkg://<package>/<file>`` (a file shipped in an installed package)
    to load pretrained weights from (``peftbench.weights``); null builds ``arch`` with seeded
    random weights. install: the command that installs a preset's weights (named in the error
    when they are missing).
    arch: transformers config keys (``model_type`` first) for a random-init model.
    init_seed: seed of the random base weights and of a fresh task head, the same for every
    method so that every method starts from identical weights.
    quantize: store the frozen base's linear layers quantized, as QLoRA does (``nf4``: 4-bit
    NormalFloat, about 0.53 bytes per weight; ``int8``: per-row int8, about 1 byte), for methods
    that freeze the base; null keeps them in ``dtype`` (``peftbench.quantize``).
    """

    name: str = MISSING
    name_or_path: Optional[str] = None
    install: Optional[str] = None
    arch: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    dtype: str = "float32"
    quantize: Optional[str] = None


@dataclass
class TaskConfig:
    """The fine-tuning task.

    kind: causal-lm or classification. path: folder of train/validation(/test) CSV or JSON
    files, or a hub dataset id (real-data tasks). max_length: tokens per example.
    num_train / num_eval: examples generated (synthetic tasks) or kept at most (real data;
    null keeps all). vocab_size: size of the word-level tokenizer built from the training
    text when the model brings no tokenizer. data_seed: seed of generated data, fixed so that
    every run sees the same examples.

    Instruction tasks (prompt -> response, loss on the response only): format: auto | alpaca |
    messages (auto: ``messages`` when the files have a ``messages_column``). Alpaca layout:
    ``prompt_column`` (the instruction), optional ``input_column``, ``response_column``; chat
    layout: ``messages_column``, a list of {role, content}, the last assistant message being the
    response. system_prompt: a system message put before every prompt (null: none). template:
    auto (the tokenizer's chat template when it has one, else the plain one in
    ``peftbench.tasks.chat``) | chat | plain. Accuracy by generation: greedy decoding of up to
    ``max_new_tokens`` tokens, the answer taken by ``answer_rule`` (exact | first_word |
    last_number | regex, with ``answer_regex``) on ``num_generate`` eval examples (null: all
    kept). choices: the fixed set of answers, for accuracy by each choice's log-likelihood.
    """

    name: str = MISSING
    kind: str = "causal-lm"
    path: Optional[str] = None
    text_column: str = "text"
    label_column: str = "label"
    eval_split: str = "validation"
    max_length: int = 128
    num_train: Optional[int] = 4000
    num_eval: Optional[int] = 256
    vocab_size: int = 1024
    data_seed: int = 1234
    format: str = "auto"
    prompt_column: str = "instruction"
    input_column: Optional[str] = "input"
    response_column: str = "output"
    messages_column: str = "messages"
    system_prompt: Optional[str] = None
    template: str = "auto"
    answer_rule: str = "exact"
    answer_regex: Optional[str] = None
    max_new_tokens: int = 16
    num_generate: Optional[int] = None
    choices: Optional[list[str]] = None


@dataclass
class TrainConfig:
    """The one training loop every method goes through.

    steps: optimizer steps (0: a latency-only run, no training and no evaluation). batch_size:
    examples per step. lr: learning rate; null takes the method's default (``method.lr``).
    warmup_steps: linear learning-rate warm-up, then linear decay to 0 (default 0, as the
    transformers Trainer: no warm-up, linear decay, clipping at 1.0). timing_warmup: first
    steps excluded from throughput timing (the memory and FLOP steps are always excluded too).
    grad_clip: max gradient norm (0 disables).

    Cost levers (docs/METHODOLOGY.md, "Cost levers"): precision: fp32 | bf16-mixed | bf16 |
    fp16-mixed (``peftbench.precision``). gradient_checkpointing: recompute each layer's
    activations in backward instead of keeping them (transformers' non-reentrant
    checkpointing of every decoder/encoder layer). grad_accum: micro-batches of
    ``batch_size`` examples per optimizer step (the effective batch is their product).
    """

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    timing_warmup: int = 5
    grad_clip: float = 1.0


@dataclass
class MeasureConfig:
    """Measurement settings (see docs/METHODOLOGY.md).

    memory_steps: first training steps run under the tensor-memory tracker; the step after them
    runs under the FLOP counter (all of them untimed). latency_batch / latency_length: the default inference
    point (examples, tokens), the one behind the flat ``inference_*`` figures.
    latency_grid_batches x latency_grid_lengths: the prefill latency grid. latency_warmup /
    latency_repeats: untimed and timed forward passes per point. decode_tokens: new tokens N of
    the decode measurement (0 skips it); decode_repeats: timed generate calls per length.
    forgetting: measure forgetting (``peftbench.quality.forgetting``) on pretrained causal LMs;
    forgetting_tokens: length of the base model's reference responses (tokens); skill_examples:
    addition questions of the general-skill accuracy.
    profile: full (every measurement) | quality (for search trials and quality sweeps: no
    latency grid, no decode timing, no inference memory or FLOPs, no checkpoint size; their
    figures are absent from the record). reuse_zero_shot: the figures before training are read
    from the zero-shot cache (``peftbench.quality.zero_shot``) when they were computed before for
    the same model, data and settings: the base model's for a method that is the identity at
    initialisation, the model with the method applied, in the same initial state, for prefix and
    prompt tuning. eval_batch: prompts (sequences) per forward of accuracy by generation and by
    choice, forgetting and skill (left-padded, with the KV cache; the same tokens and choices as
    one at a time, tested); 1: one at a time. curve_every: optimizer steps between the points of
    the learning curve (``learning_curve`` in the record: the eval loss on the first
    ``curve_examples`` examples of the eval split, with the step, tokens, training FLOPs and
    seconds so far), and one at the last step; 0: no curve.
    """

    memory_steps: int = 2
    latency_batch: int = 1
    latency_length: int = 128
    latency_grid_batches: list[int] = field(default_factory=lambda: [1, 8])
    latency_grid_lengths: list[int] = field(default_factory=lambda: [32, 128])
    latency_warmup: int = 3
    latency_repeats: int = 20
    decode_tokens: int = 32
    decode_repeats: int = 5
    forgetting: bool = True
    forgetting_tokens: int = 24
    skill_examples: int = 24
    profile: str = "full"
    reuse_zero_shot: bool = True
    eval_batch: int = 16
    curve_every: int = 0
    curve_examples: int = 64


@dataclass
class ParallelConfig:
    """One job across several processes (``peftbench.launch`` starts the ranks; ``peftbench.ranks``
    is what each needs while training; docs/SWEEPS.md).

    strategy: none (one process) | ddp (a replica per rank, gradients all-reduced) | fsdp
    (FSDP2: every transformer layer and the root sharded across the ranks). nproc: ranks
    (worker processes this job starts, one per device on CUDA); ``train.batch_size`` is the
    global batch, split evenly. timeout_s: how long a collective waits for a rank, and a node
    for the others to join, before the run fails (seconds). backend: auto (gloo on CPU, NCCL on
    CUDA) | gloo | nccl.

    Several nodes (world size ``nnodes x nproc``): every node runs the same job with its
    ``node_rank`` (0 .. nnodes-1) and the ``master`` (HOST:PORT) of node 0, as ``torchrun
    --nnodes --node-rank --master-addr`` does; in a submitit SLURM job of ``nnodes`` nodes both
    come from the job when left null. Where the job runs, not what it is: neither is hashed.

    oversubscribe: on a CPU, more ranks on this node than it has cores (each rank's timings then
    share the cores; memory, bytes moved and losses stay exact); refused unless true. Not hashed.
    """

    strategy: str = "none"
    nproc: int = 1
    timeout_s: float = 600.0
    backend: str = "auto"
    nnodes: int = 1
    node_rank: Optional[int] = None
    master: Optional[str] = None
    oversubscribe: bool = False


@dataclass
class Config:
    """Top-level run configuration. ``rank`` is interpolated into methods that have one.
    objective: the metric a job returns to Hydra's sweeper (null: none), for a sweeper that
    searches (``hydra/sweeper=optuna``); one of ``TUNE_OBJECTIVES``, read from the record."""

    method: Any = MISSING
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    device: str = "auto"
    rank: int = 8
    results_dir: str = "results/runs"
    force: bool = False
    objective: Optional[str] = None


@dataclass
class EstimateTrainConfig:
    """The levers of an estimated step, spelled as a run spells them (``train.*``; the keys a
    run has and an estimate does not use are left out). precision: ``train.precision``'s
    values or bf16-master (``ESTIMATE_PRECISIONS``). batch_size: examples per micro-batch (the
    global one, split across the ranks); grad_accum: micro-batches per optimizer step."""

    batch_size: int = 1
    grad_accum: int = 1
    precision: str = MASTER
    gradient_checkpointing: bool = False
    lr: Optional[float] = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class EstimateConfig:
    """Settings of one estimate (``python -m peftbench.estimate``).

    train: the levers, as in a run (``EstimateTrainConfig``); ``model.quantize`` (nf4 | int8 |
    null) and ``parallel`` as in a run. seq_length: tokens per example. vocab_size: vocabulary
    of a preset whose ``arch`` does not fix one (the tiny models; the default task's word
    tokenizer size). attention: flash (a fused kernel saves q, k, v, output and log-sum-exp) or
    eager (the probabilities too, as in Korthikanti et al.). flops_attention: include the
    attention score/value products in ``train_flops_per_token``. rank: interpolated into
    methods that have one.
    """

    method: Any = MISSING
    model: ModelConfig = MISSING
    rank: int = 8
    train: EstimateTrainConfig = field(default_factory=EstimateTrainConfig)
    seq_length: int = 1024
    vocab_size: int = 1024
    attention: str = "flash"
    flops_attention: bool = True
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    results_dir: str = "results/estimates"
    task: Any = None


TUNE_OBJECTIVES = ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_choice_accuracy", "eval_generate_accuracy")
TUNE_SEARCHES = ("grid", "optuna")


@dataclass
class TuneConfig:
    """Settings of a tuned comparison (``python -m peftbench.tune``; every key is given there as
    ``tune.<key>=``, every other argument is a run override applied to every job).

    methods: the methods compared (``method=`` names). grid: the learning rates tried, as
    multiples of each method's default (``method.lr``; log-spaced around it). objective: the
    validation metric a rate is chosen on (lower is better for a loss or perplexity, higher for
    an accuracy). seeds: the seeds of the final runs (the trials use the first). trial: overrides
    of a trial (cheap: validation split, the quality-only profile; ``tune.trial.train.steps=20``
    on the command line shortens them). final: overrides of a final run (the test split, all of
    it, every measurement, a learning-curve point every 5 steps; ``tune.final.<key>=`` sets one
    more).
    search: ``grid`` (every rate of the grid) or ``optuna`` (Hydra's Optuna sweeper, TPE seeded
    with the first seed, the rate drawn log-uniformly between the grid's lowest and highest
    multiple of the default; ``pip install hydra-optuna-sweeper``). trials: the Optuna trials per
    method (null: as many as the grid has rates). results_dir: trials in
    ``<results_dir>/trials``, the selections in ``<results_dir>/selection``, the finals in
    ``<results_dir>/final``.
    """

    methods: list[str] = field(default_factory=lambda: ["full", "lora", "adapter", "prefix"])
    grid: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0])
    objective: str = "eval_loss"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    trial: list[str] = field(default_factory=lambda: ["task.eval_split=validation", "measure.profile=quality"])
    final: list[str] = field(
        default_factory=lambda: [
            "task.eval_split=test",
            "task.num_eval=null",
            "task.num_generate=null",
            "measure.curve_every=5",
        ]
    )
    search: str = "grid"
    trials: Optional[int] = None
    results_dir: str = "results/tuned"


def check_tune(t: Any) -> None:
    """The values of a tuned comparison's settings (``TuneConfig``), each refused in one line."""
    require(len(t.methods) > 0, "tune.methods", list(t.methods), "at least one method")
    for m in t.methods:
        require(m in methods.REGISTRY, "tune.methods", m, f"allowed: {', '.join(sorted(methods.REGISTRY))}")
    require(len(set(t.methods)) == len(t.methods), "tune.methods", list(t.methods), "each method once")
    require(
        len(t.grid) >= 2 and all(isinstance(g, (int, float)) and g > 0 for g in t.grid),
        "tune.grid",
        list(t.grid),
        "at least 2 positive multiples of the method's default learning rate",
    )
    require(len(set(t.grid)) == len(t.grid), "tune.grid", list(t.grid), "each multiple once")
    require(t.objective in TUNE_OBJECTIVES, "tune.objective", t.objective, f"allowed: {', '.join(TUNE_OBJECTIVES)}")
    require(len(t.seeds) > 0, "tune.seeds", list(t.seeds), "at least one seed")
    require(len(set(t.seeds)) == len(t.seeds), "tune.seeds", list(t.seeds), "each seed once")
    require(t.search in TUNE_SEARCHES, "tune.search", t.search, f"allowed: {', '.join(TUNE_SEARCHES)}")
    trials = t.get("trials")
    require(
        trials is None or (isinstance(trials, int) and not isinstance(trials, bool) and trials >= 2),
        "tune.trials",
        trials,
        "null (as many as tune.grid has rates) or an integer >= 2",
    )
    if t.search == "optuna":
        require(
            importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None,
            "tune.search",
            t.search,
            "needs the Optuna sweeper (pip install hydra-optuna-sweeper); allowed: grid",
        )
    for key, overrides in (("tune.trial", t.trial), ("tune.final", t.final)):
        for o in overrides:
            name = str(o).split("=", 1)[0].lstrip("+~")
            require(
                "=" in str(o) and name not in ("method", "train.lr", "seed", "results_dir"),
                key,
                o,
                "key=value run overrides; method, train.lr, seed and results_dir are set by the search",
            )


# The estimator's keys before it read a run's shape: refused in one line naming the new key.
RENAMED_ESTIMATE_KEYS = {
    "precision": "train.precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "grad_accum": "train.grad_accum",
    "batch_size": "train.batch_size",
}


# ------------------------------------------------------------------- external launchers
# What torchrun (and ``python -m torch.distributed.run``, ``accelerate launch``) sets in every
# process it starts: the process's rank, the world, this node's share, and where to meet.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launcher:
    """The external launcher this process was started by, read from the variables it set
    (``external_launcher``): ``name``; this process's ``rank`` of ``world`` processes, ``local``
    of them on each node. ``joins``: torchrun-like, so a distributed job joins the launcher's
    world as its ranks (``peftbench.launch.join``). srun with several tasks per node and mpirun
    start one whole peftbench per process, which peftbench refuses: its jobs start their own
    ranks."""

    name: str
    rank: int
    world: int
    local: int
    joins: bool


def external_launcher(env: Optional[Mapping[str, str]] = None) -> Optional[Launcher]:
    """The launcher that started this process (``env``: ``os.environ``), or None: torchrun (or
    any launcher setting ``TORCHRUN_VARS``), srun with more tasks than nodes in its step, or
    mpirun (Open MPI's or a PMI launcher's size). srun with one task per node is not one: that is
    how a run across nodes starts each node's job (``peftbench.launch.topology``)."""
    env = os.environ if env is None else env

    def num(key: str) -> Optional[int]:
        try:
            return int(env[key])
        except (KeyError, ValueError):
            return None

    rank, world, local = num("RANK"), num("WORLD_SIZE"), num("LOCAL_WORLD_SIZE")
    if all(k in env for k in TORCHRUN_VARS) and None not in (rank, world, local):
        name = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "the launcher (RANK, WORLD_SIZE)"
        return Launcher(name, cast(int, rank), cast(int, world), cast(int, local), True)
    tasks, nodes = num("SLURM_STEP_NUM_TASKS"), num("SLURM_STEP_NUM_NODES")
    if tasks is not None and nodes is not None:
        if tasks > nodes:
            return Launcher("srun", num("SLURM_PROCID") or 0, tasks, -(-tasks // max(nodes, 1)), False)
        return None
    for size_var, rank_var in (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK")):
        size = num(size_var)
        if size is not None and size > 1:
            return Launcher("mpirun", num(rank_var) or 0, size, num("OMPI_COMM_WORLD_LOCAL_SIZE") or size, False)
    return None


def launcher_nproc(default: Any) -> int:
    """``parallel.nproc``'s default in ``conf/parallel/{ddp,fsdp}.yaml``: the processes per node of
    the torchrun-like launcher this process was started by, else ``default``."""
    found = external_launcher()
    return found.local if found is not None and found.joins else int(default)


def check_launcher(par: DictConfig, found: Optional[Launcher]) -> None:
    """Under an external launcher of more than one process (``found``), one record per job: a
    torchrun-like launcher is joined by a ddp or fsdp job whose ``nproc`` and ``nnodes`` match
    its world; anything else is refused in one line saying how to run it."""
    if found is None or found.world == 1:
        return
    require(
        found.joins,
        "parallel.nproc",
        par.nproc,
        f"{found.name} started {found.world} processes, {found.local} per node, and each would run the whole "
        f"job and write its record; allowed: one process per node (srun --ntasks-per-node=1), which starts "
        f"its parallel.nproc ranks itself (parallel=ddp parallel.nproc={found.local})",
    )
    require(
        par.strategy != "none",
        "parallel.strategy",
        par.strategy,
        f"{found.name} started {found.world} processes, and each would run this job and write its record; "
        f"allowed: ddp or fsdp (the job joins {found.name}'s {found.world} ranks), or one process without {found.name}",
    )
    require(
        par.nproc == found.local,
        "parallel.nproc",
        par.nproc,
        f"{found.name} started {found.local} processes per node; allowed: {found.local} (or leave parallel.nproc out)",
    )
    require(
        par.nnodes * found.local == found.world,
        "parallel.nnodes",
        par.nnodes,
        f"{found.name}'s world has {found.world} ranks, {found.local} per node; allowed: {found.world // found.local}",
    )


def package_model_path(package: str) -> str:
    """Directory of a model shipped inside a Python package (``get_model_path()``)."""
    return importlib.import_module(package).get_model_path()


def repo_path(relative: str) -> str:
    """A path inside the peftbench checkout (its shipped data, e.g. ``data/rt-polarity``), absolute."""
    return str(Path(__file__).resolve().parent.parent / relative)


def register_resolvers() -> None:
    """Register the config files' resolvers (``${repo_path:...}``, ``${package_model_path:...}``,
    ``${launcher_nproc:...}``) in OmegaConf; idempotent. Run when this module is imported, so that every process that
    reads a config (a launcher's job, a rank) can resolve it."""
    for name, resolver in (
        ("package_model_path", package_model_path),
        ("repo_path", repo_path),
        ("launcher_nproc", launcher_nproc),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()


def register_configs() -> None:
    """Store the schemas (the run's, the estimator's, each method's) in Hydra's ConfigStore;
    idempotent. Called by the app layer before any config is composed."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="estimate_schema", node=EstimateConfig)
    cs.store(name="tune_schema", node=TuneConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    for name, cls in methods.REGISTRY.items():
        cs.store(group="method", name=f"{name}_schema", node=cls.config_class)


MAX_SEED = 2**63 - 1  # seeds go to torch.manual_seed and random.Random, offset by a few


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` for ``device=``; ConfigError for a device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name}: CUDA is not available on this machine; allowed here: auto, cpu")
        index = torch.device(name).index
        count = torch.cuda.device_count()
        require(
            index is None or index < count,
            "device",
            name,
            f"this machine has {count} CUDA device(s); allowed: cuda, cuda:0..cuda:{count - 1}, cpu, auto",
        )
    return torch.device(name)


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a one-line ConfigError naming the key, the value and what is allowed, unless ok."""
    if not ok:
        raise ConfigError(f"{key}={value}: {allowed}")


# ------------------------------------------------------------------------------ the levers
@dataclass(frozen=True)
class Levers:
    """What the cost levers decide for every optimizer step, built once from a run's or an
    estimate's config (``levers``) and read by the training loop, the run and the estimator.

    precision: ``train.precision`` (the estimator also takes bf16-master). grad_accum:
    micro-batches per optimizer step. batch_size: examples per micro-batch across all ranks
    (the global micro-batch); world_size: ranks it is split across (``world_size``). lr: the
    learning rate, ``train.lr`` or else the method's default ``method.lr``. grad_clip: max
    gradient norm (0: no clipping). weight_decay: AdamW's. warmup_steps: linear warm-up steps
    of the schedule. gradient_checkpointing: recompute each layer's activations in backward.
    """

    precision: str
    grad_accum: int
    batch_size: int
    world_size: int
    lr: float
    grad_clip: float
    weight_decay: float
    warmup_steps: int
    gradient_checkpointing: bool

    @property
    def rank_batch(self) -> int:
        """Examples per micro-batch on one rank (the global micro-batch split evenly)."""
        return self.batch_size // self.world_size


def learning_rate(cfg: DictConfig) -> Optional[float]:
    """``train.lr``, or the method's default learning rate when it is null (None if neither)."""
    return cfg.train.lr if cfg.train.get("lr") is not None else cfg.method.get("lr")


def levers(cfg: DictConfig) -> Levers:
    """The ``Levers`` of a run's or an estimate's config (both spell them ``train.*``)."""
    t = cfg.train
    return Levers(
        precision=t.precision,
        grad_accum=t.grad_accum,
        batch_size=t.batch_size,
        world_size=world_size(cfg.parallel),
        lr=float(learning_rate(cfg) or 0.0),
        grad_clip=t.grad_clip,
        weight_decay=t.weight_decay,
        warmup_steps=t.get("warmup_steps", 0),
        gradient_checkpointing=t.gradient_checkpointing,
    )


def world_size(par: Any) -> int:
    """Ranks of a run of ``parallel`` settings ``par`` (a config node, or a record's plain dict):
    ``nnodes x nproc``, 1 with strategy none."""
    if par.get("strategy", "none") == "none":
        return 1
    return int(par.get("nproc", 1)) * int(par.get("nnodes", 1))


def model_label(model: Any) -> str:
    """The name a record gives the model of ``model`` settings: the preset's name, or, when
    ``model.name_or_path`` replaces the weights the preset names (its ``conf/model/<name>.yaml``),
    where the weights came from and the preset they run as (``<path> (as llama2-7b)``)."""
    preset = Path(__file__).resolve().parent.parent / "conf" / "model" / f"{model.name}.yaml"
    given = model.get("name_or_path")
    try:
        own = OmegaConf.create({"p": cast(DictConfig, OmegaConf.load(preset)).get("name_or_path")}).p
    except Exception:  # no such preset file (a name set on the command line), or one that cannot be read
        return str(model.name)
    return str(model.name) if given is None or str(given) == str(own) else f"{given} (as {model.name})"


def split_across(par: DictConfig) -> str:
    """What a global batch must be a multiple of under ``par``, as error messages say it."""
    if par.nnodes == 1:
        return f"parallel.nproc={par.nproc}"
    return f"the world size {world_size(par)} (nnodes x nproc)"


# ------------------------------------------------------------------------------ the checks
def check_method(cfg: DictConfig) -> None:
    """The method exists and accepts its settings (each method checks its own keys)."""
    require(
        cfg.method.name in methods.REGISTRY,
        "method",
        cfg.method.name,
        f"allowed: {', '.join(sorted(methods.REGISTRY))}",
    )
    methods.REGISTRY[cfg.method.name](cfg.method)
    check_quantize(cfg)


def check_quantize(cfg: DictConfig) -> None:
    """``model.quantize`` names a scheme, and the method leaves the base frozen (a method class
    that trains the base weights says so with ``trains_base = True``)."""
    scheme = cfg.model.get("quantize")
    if scheme is None:
        return
    require(scheme in QUANTIZE_SCHEMES, "model.quantize", scheme, f"allowed: {', '.join(QUANTIZE_SCHEMES)}, null")
    frozen = sorted(n for n, cls in methods.REGISTRY.items() if not getattr(cls, "trains_base", False))
    require(
        not getattr(methods.REGISTRY[cfg.method.name], "trains_base", False),
        "model.quantize",
        scheme,
        f"method={cfg.method.name} trains the base weights, which a quantized base cannot; "
        f"allowed with methods that freeze the base: {', '.join(frozen)}",
    )


def check_world(cfg: DictConfig, batch_key: str) -> None:
    """The ``parallel`` settings a run and an estimate share: a known strategy, ranks that split
    the global batch (``batch_key``, a key of ``train``) evenly, FSDP on a dense base. Returns
    early for strategy none."""
    par = cfg.parallel
    require(par.strategy in STRATEGIES, "parallel.strategy", par.strategy, f"allowed: {', '.join(STRATEGIES)}")
    require(par.nproc >= 1, "parallel.nproc", par.nproc, "must be an integer >= 1")
    require(par.nnodes >= 1, "parallel.nnodes", par.nnodes, "must be an integer >= 1")
    if par.strategy == "none":
        require(par.nproc == 1, "parallel.nproc", par.nproc, "must be 1 with parallel=none (choose ddp or fsdp)")
        require(par.nnodes == 1, "parallel.nnodes", par.nnodes, "must be 1 with parallel=none (choose ddp or fsdp)")
        return
    batch = cfg.train[batch_key.rsplit(".", 1)[-1]]
    require(
        batch % world_size(par) == 0,
        batch_key,
        batch,
        f"must be a multiple of {split_across(par)} (the global batch is split evenly)",
    )
    require(
        par.strategy != "fsdp" or cfg.model.quantize is None,
        "model.quantize",
        cfg.model.quantize,
        "parallel=fsdp shards dense weights only; allowed with fsdp: null (or use parallel=ddp)",
    )


def check_parallel(cfg: DictConfig) -> None:
    """A run's ``parallel`` settings (``check_launcher`` against an external launcher,
    ``check_world``, then where the ranks run: backend, node and device count). Whether this
    process can find its node is the launcher's check
    (``peftbench.launch.check_topology``)."""
    par = cfg.parallel
    check_launcher(par, external_launcher())
    require(par.backend in BACKENDS, "parallel.backend", par.backend, f"allowed: {', '.join(BACKENDS)}")
    require(par.timeout_s > 0, "parallel.timeout_s", par.timeout_s, "must be > 0 seconds")
    if par.strategy in STRATEGIES and par.strategy != "none":
        require(
            par.node_rank is None or 0 <= par.node_rank < par.nnodes,
            "parallel.node_rank",
            par.node_rank,
            f"allowed: 0 to {par.nnodes - 1} (parallel.nnodes={par.nnodes}), or null",
        )
        require(
            par.master is None or re.fullmatch(r"[^:\s]+:\d{1,5}", str(par.master)) is not None,
            "parallel.master",
            par.master,
            "allowed: HOST:PORT of node 0's rendezvous, or null",
        )
    check_world(cfg, "train.batch_size")
    if par.strategy == "none":
        return
    device = resolve_device(cfg.device)
    require(
        par.backend != "nccl" or device.type == "cuda",
        "parallel.backend",
        par.backend,
        f"nccl needs a CUDA device (the run's device is {device.type}); allowed here: auto, gloo",
    )
    cores = os.cpu_count() or 1
    require(
        device.type != "cpu" or par.nproc <= cores or par.oversubscribe,
        "parallel.nproc",
        par.nproc,
        f"more CPU ranks than the {cores} cores here (they would contend for them, and many ranks run out of "
        f"memory); allowed: at most {cores}, or parallel.oversubscribe=true",
    )
    if device.type == "cuda":
        require(
            par.nproc <= torch.cuda.device_count(),
            "parallel.nproc",
            par.nproc,
            f"one CUDA device per rank: at most {torch.cuda.device_count()} here",
        )


def check_precision(precision: str, device_type: str, model_dtype: str) -> None:
    """One-line ConfigError for a ``train.precision`` that cannot run here or with these weights."""
    require(precision in PRECISIONS, "train.precision", precision, f"allowed: {', '.join(PRECISIONS)}")
    require(
        precision != "fp16-mixed" or device_type == "cuda",
        "train.precision",
        precision,
        f"needs a CUDA device (the run's device is {device_type}); allowed here: fp32, bf16-mixed, bf16",
    )
    require(
        precision not in MIXED_PRECISIONS or model_dtype == "float32",
        "model.dtype",
        model_dtype,
        f"train.precision={precision} keeps float32 master weights; "
        "allowed: model.dtype=float32 (or train.precision=bf16 for bfloat16 weights)",
    )
    require(
        precision != "bf16" or model_dtype != "float16",
        "model.dtype",
        model_dtype,
        "train.precision=bf16 casts the weights to bfloat16; allowed: float32, bfloat16",
    )


def check(cfg: DictConfig) -> None:
    """Reject a composed run config whose values cannot work (one-line ``ConfigError``)."""
    check_method(cfg)
    lr = learning_rate(cfg)
    require(lr is not None and lr > 0, "train.lr", lr, "must be > 0 (or set method.lr)")
    require(
        cfg.device in DEVICES or re.fullmatch(r"cuda:\d+", str(cfg.device)) is not None,
        "device",
        cfg.device,
        f"allowed: {', '.join(DEVICES)} or cuda:N",
    )
    resolve_device(cfg.device)
    check_numbers(cfg)
    require(cfg.train.steps >= 0, "train.steps", cfg.train.steps, "must be >= 0 (0 measures latency only)")
    check_parallel(cfg)
    check_train(cfg.train)
    check_measure(cfg.measure)
    require(
        cfg.measure.curve_every == 0 or cfg.parallel.strategy == "none",
        "measure.curve_every",
        cfg.measure.curve_every,
        f"a learning curve is taken in a one-process run; with parallel={cfg.parallel.strategy} allowed: 0",
    )
    check_task(cfg.task)
    require(cfg.model.dtype in DTYPES, "model.dtype", cfg.model.dtype, f"allowed: {', '.join(DTYPES)}")
    check_precision(cfg.train.precision, resolve_device(cfg.device).type, cfg.model.dtype)
    check_output_and_model(cfg, "a random-init model needs model.arch (or set model.name_or_path)")
    objective = cfg.get("objective")
    require(
        objective is None or objective in TUNE_OBJECTIVES,
        "objective",
        objective,
        f"allowed: null or {', '.join(TUNE_OBJECTIVES)}",
    )


def check_output_and_model(cfg: DictConfig, no_model: str) -> None:
    """A results folder is named, and the model is either built from ``model.arch`` or loaded
    from ``model.name_or_path`` (``no_model``: what the error says when neither is set)."""
    require(bool(str(cfg.results_dir).strip()), "results_dir", repr(cfg.results_dir), "must be a folder path")
    require(cfg.model.name_or_path is not None or bool(cfg.model.arch), "model.arch", "{}", no_model)


def check_train(t: DictConfig) -> None:
    """``train``'s sizes and rates."""
    require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be an integer >= 1")
    require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    require(t.timing_warmup >= 0, "train.timing_warmup", t.timing_warmup, "must be >= 0")
    require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables)")
    require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")


# measure's keys that count something at least once (``check_measure``)
AT_LEAST_ONE = (
    "eval_batch",
    "memory_steps",
    "latency_batch",
    "latency_length",
    "latency_repeats",
    "forgetting_tokens",
    "skill_examples",
    "decode_repeats",
    "curve_examples",
)


def check_measure(m: DictConfig) -> None:
    """``measure``'s counts: each at least one, or at least zero where 0 means skip."""
    for key in AT_LEAST_ONE:
        require(m[key] >= 1, f"measure.{key}", m[key], "must be >= 1")
    require(m.profile in PROFILES, "measure.profile", m.profile, f"allowed: {', '.join(PROFILES)}")
    require(m.latency_warmup >= 0, "measure.latency_warmup", m.latency_warmup, "must be >= 0")
    for key in ("latency_grid_batches", "latency_grid_lengths"):
        values = list(m[key])
        require(
            bool(values) and all(v >= 1 for v in values),
            f"measure.{key}",
            values,
            "must be a non-empty list of integers >= 1",
        )
    require(
        m.decode_tokens >= 0, "measure.decode_tokens", m.decode_tokens, "must be >= 0 (0 skips the decode measurement)"
    )
    require(m.curve_every >= 0, "measure.curve_every", m.curve_every, "must be >= 0 (0: no learning curve)")


def check_task(task: DictConfig) -> None:
    """The task's kind and sizes (what its data allows is ``peftbench.tasks.check``'s)."""
    require(task.kind in TASK_KINDS, "task.kind", task.kind, f"allowed: {', '.join(TASK_KINDS)}")
    require(task.max_length >= 8, "task.max_length", task.max_length, "must be >= 8 tokens")
    require(task.num_train is None or task.num_train >= 1, "task.num_train", task.num_train, "must be >= 1 or null")
    require(task.num_eval is None or task.num_eval >= 1, "task.num_eval", task.num_eval, "must be >= 1 or null")


# layer counts of a model's architecture (transformers' names), bounded in an estimate
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
MAX_ESTIMATE_LAYERS = 1024


def check_estimate(cfg: DictConfig) -> None:
    """Reject an estimate config whose values cannot work (one-line ``ConfigError``)."""
    check_method(cfg)
    t = cfg.train
    require(
        t.precision in ESTIMATE_PRECISIONS,
        "train.precision",
        t.precision,
        f"allowed: {', '.join(ESTIMATE_PRECISIONS)}",
    )
    require(cfg.attention in ATTENTION, "attention", cfg.attention, f"allowed: {', '.join(ATTENTION)}")
    require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be an integer >= 1")
    require(cfg.seq_length >= 1, "seq_length", cfg.seq_length, "must be >= 1 token")
    require(
        t.batch_size * cfg.seq_length <= MAX_ESTIMATE_TOKENS,
        "train.batch_size",
        t.batch_size,
        f"train.batch_size x seq_length must be <= {MAX_ESTIMATE_TOKENS:,} tokens per step",
    )
    require(cfg.vocab_size >= 1, "vocab_size", cfg.vocab_size, "must be >= 1")
    check_world(cfg, "train.batch_size")
    check_output_and_model(cfg, "needs model.arch (or set model.name_or_path to a folder with a config.json)")
    arch = cfg.model.get("arch") or {}
    for key in LAYER_KEYS:
        layers = arch.get(key)
        require(
            not isinstance(layers, int) or layers <= MAX_ESTIMATE_LAYERS,
            f"model.arch.{key}",
            layers,
            "the estimate builds every layer on the meta device, in host memory and time in proportion; "
            f"allowed: at most {MAX_ESTIMATE_LAYERS:,} (the deepest published models have under 200)",
        )


def check_numbers(cfg: DictConfig) -> None:
    """Every float of the config is finite, and every seed fits the random generators."""
    for key, value in flat_items(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(value, float):
            require(math.isfinite(value), key, value, "must be a finite number")
        if key.rsplit(".", 1)[-1] in ("seed", "init_seed", "data_seed") and isinstance(value, int):
            require(0 <= value <= MAX_SEED, key, value, f"must be an integer from 0 to {MAX_SEED}")


def flat_items(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of nested dicts."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        out.extend(flat_items(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)])
    return out


def context_needs(cfg: DictConfig) -> dict[str, int]:
    """Input lengths (tokens) a run feeds the model, by the config key that sets each."""
    m = cfg.measure
    needs = {
        "task.max_length": cfg.task.max_length,
        "measure.latency_length": m.latency_length,
        "measure.latency_grid_lengths": max(m.latency_grid_lengths),
    }
    if cfg.task.kind == "causal-lm" and m.decode_tokens:  # the prompt plus every generated token
        needs["measure.decode_tokens"] = m.latency_length + m.decode_tokens + 1
    return needs


def check_context(cfg: DictConfig, method: Any, model_config: Any) -> None:
    """Inputs plus the positions a method takes itself (prefix tuning's virtual tokens) must fit
    in the model's context; otherwise the run would fail half-way (``methods.check_context``)."""
    methods.check_context(
        model_config, context_needs(cfg), getattr(method, "context_tokens", 0), f"method={cfg.method.name}"
    )


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python data (for the run record)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return cast(dict[str, Any], out)
