"""Typed configuration: dataclass schemas in Hydra's ConfigStore, plus value checks.

The YAML files under ``conf/`` pick these schemas through their defaults lists, so a value of
the wrong type is rejected by OmegaConf, and ``check`` rejects values of the right type that
cannot work. Both end in a one-line error naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

import methods
from methods import ConfigError

DEVICES = ("auto", "cpu", "cuda")
TASK_KINDS = ("causal-lm", "classification")
DTYPES = ("float32", "bfloat16", "float16")


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


@dataclass
class ParallelConfig:
    """One job across several processes (``peftbench.parallel``, docs/SWEEPS.md).

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
    """

    strategy: str = "none"
    nproc: int = 1
    timeout_s: float = 600.0
    backend: str = "auto"
    nnodes: int = 1
    node_rank: Optional[int] = None
    master: Optional[str] = None


@dataclass
class Config:
    """Top-level run configuration. ``rank`` is interpolated into methods that have one."""

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


def package_model_path(package: str) -> str:
    """Directory of a model shipped inside a Python package (``get_model_path()``)."""
    import importlib

    return importlib.import_module(package).get_model_path()


def repo_path(relative: str) -> str:
    """A path inside the peftbench checkout (its shipped data, e.g. ``data/rt-polarity``), absolute."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent / relative)


for _name, _resolver in (("package_model_path", package_model_path), ("repo_path", repo_path)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    for name, cls in methods.REGISTRY.items():
        cs.store(group="method", name=f"{name}_schema", node=cls.config_class)


MAX_SEED = 2**63 - 1  # seeds go to torch.manual_seed and random.Random, offset by a few


def resolve_device(name: str) -> Any:
    """The ``torch.device`` for ``device=``; ConfigError for a device this machine lacks."""
    import torch

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


def check_method(cfg: Any) -> None:
    """The method exists and accepts its settings (each method checks its own keys)."""
    require(
        cfg.method.name in methods.REGISTRY,
        "method",
        cfg.method.name,
        f"allowed: {', '.join(sorted(methods.REGISTRY))}",
    )
    methods.REGISTRY[cfg.method.name](cfg.method)
    check_quantize(cfg)


def check_quantize(cfg: Any) -> None:
    """``model.quantize`` names a scheme, and the method leaves the base frozen (a method class
    that trains the base weights says so with ``trains_base = True``)."""
    from peftbench.quantize import SCHEMES

    scheme = cfg.model.get("quantize")
    if scheme is None:
        return
    require(scheme in SCHEMES, "model.quantize", scheme, f"allowed: {', '.join(SCHEMES)}, null")
    frozen = sorted(n for n, cls in methods.REGISTRY.items() if not getattr(cls, "trains_base", False))
    require(
        not getattr(methods.REGISTRY[cfg.method.name], "trains_base", False),
        "model.quantize",
        scheme,
        f"method={cfg.method.name} trains the base weights, which a quantized base cannot; "
        f"allowed with methods that freeze the base: {', '.join(frozen)}",
    )


def world_size(par: Any) -> int:
    """Ranks of a run of ``parallel`` settings ``par``: ``nnodes x nproc`` (1 with strategy none)."""
    return par.nproc * par.nnodes if par.strategy != "none" else 1


def split_across(par: Any) -> str:
    """What a global batch must be a multiple of under ``par``, as error messages say it."""
    if par.nnodes == 1:
        return f"parallel.nproc={par.nproc}"
    return f"the world size {world_size(par)} (nnodes x nproc)"


def check_parallel(cfg: Any) -> None:
    """The ``parallel`` settings: a known strategy and backend, ranks that split the batch."""
    from peftbench.parallel import BACKENDS, STRATEGIES

    par = cfg.parallel
    require(par.strategy in STRATEGIES, "parallel.strategy", par.strategy, f"allowed: {', '.join(STRATEGIES)}")
    require(par.backend in BACKENDS, "parallel.backend", par.backend, f"allowed: {', '.join(BACKENDS)}")
    require(par.nproc >= 1, "parallel.nproc", par.nproc, "must be an integer >= 1")
    require(par.timeout_s > 0, "parallel.timeout_s", par.timeout_s, "must be > 0 seconds")
    require(par.nnodes >= 1, "parallel.nnodes", par.nnodes, "must be an integer >= 1")
    if par.strategy == "none":
        require(par.nproc == 1, "parallel.nproc", par.nproc, "must be 1 with parallel=none (choose ddp or fsdp)")
        require(par.nnodes == 1, "parallel.nnodes", par.nnodes, "must be 1 with parallel=none (choose ddp or fsdp)")
        return
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
    from peftbench.parallel import knows_its_node

    require(
        knows_its_node(par),
        "parallel.nnodes",
        par.nnodes,
        "this process cannot tell which node it is; allowed: parallel.node_rank=K and parallel.master=HOST:PORT "
        "on every node, a SLURM job (srun, one task per node), or -m hydra/launcher=submitit_slurm",
    )
    require(
        cfg.train.batch_size % world_size(par) == 0,
        "train.batch_size",
        cfg.train.batch_size,
        f"must be a multiple of {split_across(par)} (the global batch is split evenly)",
    )
    device = resolve_device(cfg.device)
    require(
        par.backend != "nccl" or device.type == "cuda",
        "parallel.backend",
        par.backend,
        f"nccl needs a CUDA device (the run's device is {device.type}); allowed here: auto, gloo",
    )
    if device.type == "cuda":
        import torch

        require(
            par.nproc <= torch.cuda.device_count(),
            "parallel.nproc",
            par.nproc,
            f"one CUDA device per rank: at most {torch.cuda.device_count()} here",
        )
    require(
        par.strategy != "fsdp" or cfg.model.quantize is None,
        "model.quantize",
        cfg.model.quantize,
        "parallel=fsdp shards dense weights only; allowed with fsdp: null (or use parallel=ddp)",
    )


def check(cfg: Any) -> None:
    """Reject a composed config whose values cannot work (one-line ``ConfigError``)."""
    check_method(cfg)
    lr = cfg.train.lr if cfg.train.lr is not None else cfg.method.lr
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
    require(cfg.train.batch_size >= 1, "train.batch_size", cfg.train.batch_size, "must be >= 1")
    require(cfg.train.grad_accum >= 1, "train.grad_accum", cfg.train.grad_accum, "must be an integer >= 1")
    require(cfg.train.warmup_steps >= 0, "train.warmup_steps", cfg.train.warmup_steps, "must be >= 0")
    require(cfg.train.timing_warmup >= 0, "train.timing_warmup", cfg.train.timing_warmup, "must be >= 0")
    require(cfg.train.grad_clip >= 0, "train.grad_clip", cfg.train.grad_clip, "must be >= 0 (0 disables)")
    require(cfg.train.weight_decay >= 0, "train.weight_decay", cfg.train.weight_decay, "must be >= 0")
    require(cfg.measure.memory_steps >= 1, "measure.memory_steps", cfg.measure.memory_steps, "must be >= 1")
    require(cfg.measure.latency_batch >= 1, "measure.latency_batch", cfg.measure.latency_batch, "must be >= 1")
    require(cfg.measure.latency_length >= 1, "measure.latency_length", cfg.measure.latency_length, "must be >= 1")
    require(cfg.measure.latency_repeats >= 1, "measure.latency_repeats", cfg.measure.latency_repeats, "must be >= 1")
    require(cfg.measure.latency_warmup >= 0, "measure.latency_warmup", cfg.measure.latency_warmup, "must be >= 0")
    for key in ("latency_grid_batches", "latency_grid_lengths"):
        values = list(cfg.measure[key])
        require(
            bool(values) and all(v >= 1 for v in values),
            f"measure.{key}",
            values,
            "must be a non-empty list of integers >= 1",
        )
    require(
        cfg.measure.decode_tokens >= 0,
        "measure.decode_tokens",
        cfg.measure.decode_tokens,
        "must be >= 0 (0 skips the decode measurement)",
    )
    require(
        cfg.measure.forgetting_tokens >= 1, "measure.forgetting_tokens", cfg.measure.forgetting_tokens, "must be >= 1"
    )
    require(cfg.measure.skill_examples >= 1, "measure.skill_examples", cfg.measure.skill_examples, "must be >= 1")
    require(cfg.measure.decode_repeats >= 1, "measure.decode_repeats", cfg.measure.decode_repeats, "must be >= 1")
    require(cfg.task.kind in TASK_KINDS, "task.kind", cfg.task.kind, f"allowed: {', '.join(TASK_KINDS)}")
    require(cfg.task.max_length >= 8, "task.max_length", cfg.task.max_length, "must be >= 8 tokens")
    require(
        cfg.task.num_train is None or cfg.task.num_train >= 1,
        "task.num_train",
        cfg.task.num_train,
        "must be >= 1 or null",
    )
    require(
        cfg.task.num_eval is None or cfg.task.num_eval >= 1, "task.num_eval", cfg.task.num_eval, "must be >= 1 or null"
    )
    require(cfg.model.dtype in DTYPES, "model.dtype", cfg.model.dtype, f"allowed: {', '.join(DTYPES)}")
    from peftbench import precision

    precision.check(cfg.train.precision, resolve_device(cfg.device).type, cfg.model.dtype)
    require(bool(str(cfg.results_dir).strip()), "results_dir", repr(cfg.results_dir), "must be a folder path")
    require(
        cfg.model.name_or_path is not None or bool(cfg.model.arch),
        "model.arch",
        "{}",
        "a random-init model needs model.arch (or set model.name_or_path)",
    )


def check_numbers(cfg: Any) -> None:
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


def context_needs(cfg: Any) -> dict[str, int]:
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


def check_context(cfg: Any, method: Any, model_config: Any) -> None:
    """Inputs plus the positions a method takes itself (prefix tuning's virtual tokens) must fit
    in the model's context; otherwise the run would fail half-way (``methods.check_context``)."""
    methods.check_context(
        model_config, context_needs(cfg), getattr(method, "context_tokens", 0), f"method={cfg.method.name}"
    )


def to_container(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain Python data (for the run record)."""
    return OmegaConf.to_container(cfg, resolve=True)
