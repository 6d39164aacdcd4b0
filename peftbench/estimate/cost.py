"""The estimator's cost model: a method's parameters, bytes and FLOPs on a model built on the
meta device (shapes only), for one optimizer step of ``grad_accum`` micro-batches of
``batch_size`` x ``seq_length`` tokens, under the run's precision, checkpointing and quantization.

See the package docstring (``peftbench.estimate``) for what is counted and how, and
``docs/ESTIMATES.md`` for the assumptions and the measured error.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Optional, cast

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

import methods
from peftbench import config as config_mod
from peftbench import models, quantize, ranks, train
from peftbench import precision as precision_mod
from peftbench.config import ESTIMATE_PRECISIONS as PRECISIONS  # noqa: F401 (re-exported)
from peftbench.config import MASTER, Levers
from peftbench.measure import flop_counter
from peftbench.memory import TensorMemoryTracker

# MASTER, bf16-master: bf16 weights, gradients and activations with an fp32 master copy of each
# TRAINED weight plus fp32 AdamW moments (4 + 8 = 12 B per trained element): the mixed precision
# of Megatron and DeepSpeed (Micikevicius et al. 2018; ZeRO's 2 + 2 + 12 = 16 B per parameter for
# full fine-tuning). The training loop has no such lever: it is traced as pure bf16, its
# optimizer state counted in closed form.
STEP_BYTES = 4  # torch AdamW keeps one float32 step counter per trained tensor


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the base weights before the method is applied (``precision.weight_dtype``)."""
    return torch.bfloat16 if precision == MASTER else precision_mod.weight_dtype(precision) or torch.float32


def model_spec(cfg: DictConfig) -> tuple[Any, int]:
    """The model config to build (float32, as a run builds it before any cast; ``arch.vocab_size``
    taken out) and the vocabulary size: the preset's own ``arch.vocab_size`` when it has one,
    else ``cfg.vocab_size``. (``models.build_meta`` passes vocab_size itself.)"""
    spec = cast(dict[str, Any], OmegaConf.to_container(cfg.model, resolve=True))
    arch = dict(spec.get("arch") or {})
    vocab = int(arch.pop("vocab_size", cfg.vocab_size))
    spec["arch"] = arch
    spec["dtype"] = "float32"
    return OmegaConf.create(spec), vocab


def prepare_base(model: nn.Module, cfg: DictConfig, lev: Levers, quantized: bool = True) -> Optional[dict[str, Any]]:
    """What ``run.setup`` does to a float32 base model before the method, in its order: the
    pure-bf16 cast, then the quantized base (``model.quantize``, unless ``quantized`` is False).
    Returns ``quantize.quantize_base``'s account, or None."""
    dtype = weight_dtype(lev.precision)
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model.to(dtype)
    if not quantized or cfg.model.get("quantize") is None:
        return None
    return quantize.quantize_base(model, cfg.model.quantize)


def task_kind(cfg: DictConfig) -> str:
    """What the estimated model does: a causal LM, or, for an encoder preset whose default task
    is classification (``model=minilm``), sequence classification with a fresh head."""
    task = cfg.get("task")
    return str(task.kind) if task is not None else "causal-lm"


def prepare_method(model: nn.Module, cfg: DictConfig, lev: Levers) -> tuple[nn.Module, Any]:
    """What ``run.setup`` does next: the method, gradient checkpointing, then a fresh task head
    trained (sequence classification). Returns (model, method)."""
    method = methods.build(cfg.method)
    model = method.apply(model)
    if lev.gradient_checkpointing:
        models.set_gradient_checkpointing(model, True)
    models.unfreeze_head(model)
    return model, method


def prepare(model: nn.Module, cfg: DictConfig, lev: Levers) -> nn.Module:
    """A float32 base model made what a run trains (``prepare_base``, ``prepare_method``)."""
    prepare_base(model, cfg, lev)
    return prepare_method(model, cfg, lev)[0]


def build(cfg: DictConfig, lev: Optional[Levers] = None) -> tuple[nn.Module, Any]:
    """The whole base model on the meta device, cast and with the method applied (not quantized:
    the quantized bytes come from the traced small models); returns (model, method). Raises a
    one-line ``ConfigError`` when ``seq_length`` plus the method's own positions exceed the
    model's context. ``lev``: the config's levers (default ``config.levers(cfg)``)."""
    lev = lev or config_mod.levers(cfg)
    spec, vocab = model_spec(cfg)
    meta = models.build_meta(spec, task_kind(cfg), vocab)  # two classes for a classification head
    config = meta.config
    prepare_base(meta, cfg, lev, quantized=False)
    model, method = prepare_method(meta, cfg, lev)
    methods.check_context(
        config, {"seq_length": cfg.seq_length}, getattr(method, "context_tokens", 0), f"method={cfg.method.name}"
    )
    return model, method


# ------------------------------------------------------------------------ counting


def unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor once (tied weights are one tensor)."""
    return list({id(t): t for t in tensors}.values())


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_bytes(trained: list[torch.Tensor], precision: str) -> int:
    """AdamW state: two moments per trained element in its parameter's dtype (``exp_avg``,
    ``exp_avg_sq``) and a 4 B step per tensor; under bf16-master, a 16-bit parameter's moments
    are fp32 and it has an fp32 master copy (12 B; an fp32 parameter, e.g. a prefix, is its own)."""
    total = 0
    for p in trained:
        per_elem = 12 if precision == MASTER and p.element_size() < 4 else 2 * p.element_size()
        total += p.numel() * per_elem + STEP_BYTES
    return total


def state_bytes(model: nn.Module, precision: str) -> dict[str, int]:
    """Weights (parameters and buffers), gradients (one per trained parameter, in its dtype) and
    AdamW state (``optimizer_bytes``), in bytes, of a dense (not quantized) model."""
    params = unique(model.parameters())
    trained = [p for p in params if p.requires_grad]
    return {
        "memory_weights_bytes": sum(nbytes(t) for t in params + unique(model.buffers())),
        "memory_gradients_bytes": sum(nbytes(p) for p in trained),
        "memory_optimizer_bytes": optimizer_bytes(trained, precision),
        "checkpoint_bytes": sum(nbytes(p) for p in trained),
    }


class AttentionKernel:
    """Wraps ``torch.nn.functional.scaled_dot_product_attention`` while tracing.

    The call goes through unchanged: on fake CPU tensors PyTorch picks the kernel it picks on
    the CPU (the fused flash kernel, which saves q, k, v, output and log-sum-exp, as fused
    kernels on a GPU do), under the same autocast. Under ``eager`` it also notes, per call
    that will have a backward, the bytes of the probabilities an unfused implementation keeps
    (fp32 softmax output, plus its copy in a 16-bit activation dtype, plus a dropout mask).
    """

    def __init__(self, attention: str):
        self.attention = attention
        self.eager_bytes: list[int] = []
        self.original = torch.nn.functional.scaled_dot_product_attention

    def __call__(self, query, key, value, *args, **kwargs):
        b, a, s_q, _ = query.shape
        s_kv = key.shape[-2]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if grad and self.attention == "eager":
            dropout = kwargs.get("dropout_p", args[1] if len(args) > 1 else 0.0)
            e = 2 if torch.is_autocast_enabled("cpu") else query.element_size()
            self.eager_bytes.append(b * a * s_q * s_kv * (4 + (e if e < 4 else 0) + (1 if dropout > 0 else 0)))
        return self.original(query, key, value, *args, **kwargs)

    @contextlib.contextmanager
    def installed(self):
        torch.nn.functional.scaled_dot_product_attention = self
        try:
            yield self
        finally:
            torch.nn.functional.scaled_dot_product_attention = self.original


class MatmulFlops(TorchDispatchMode):
    """FLOPs of every ATen op that ``peftbench.measure.flop_counter`` has a formula for (mm,
    addmm, bmm, convolutions, fused attention with the CPU kernel counted as the CUDA ones),
    2 per multiply-add, forward and backward: the run's count, without ``FlopCounterMode``'s
    per-module tracking, which costs seconds per pass on a large model.

    ``attention``: the attention kernels' share. ``recomputed``: products run in the backward
    pass with gradients enabled, which is a checkpointed layer's forward run again (the engine
    runs backward formulas with gradients disabled); the model FLOPs leave them out.
    """

    def __init__(self):
        super().__init__()
        self.registry = flop_counter().flop_registry
        self.attention_ops = {
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
        }
        self.flops = self.attention = self.recomputed = self.recomputed_attention = 0
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            f = formula(*args, **kwargs, out_val=out)
            self.flops += f
            attention = func._overloadpacket in self.attention_ops
            recomputed = self.backward and torch.is_grad_enabled()
            self.attention += f if attention else 0
            self.recomputed += f if recomputed else 0
            self.recomputed_attention += f if attention and recomputed else 0
        return out


def micro_batches(lev: Levers, seq_length: int, vocab: int, kind: str = "causal-lm") -> list[dict[str, torch.Tensor]]:
    """``lev.grad_accum`` micro-batches of one rank's ``lev.rank_batch`` x ``seq_length`` random
    ids, a mask of ones and labels (the harness's batch; ids from a fixed seed): the ids
    themselves for a causal LM, one of two classes per example for classification."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(lev.grad_accum):
        ids = torch.randint(0, vocab, (lev.rank_batch, seq_length), generator=g)
        labels = ids.clone() if kind == "causal-lm" else torch.randint(0, 2, (lev.rank_batch,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


class TraceProbe(train.StepProbe):
    """What the estimator watches of the run's step (``train.OptimizerStep``): the forwards,
    backwards and clipping under the fake-tensor ``mode`` (a no-op on real tensors), the
    ``tracker`` and the FLOP counter, the optimizer's update under the tracker alone; the
    tracker's peak kept per stretch (``cut``) at the end of each forward and after the update."""

    def __init__(self, tracker: TensorMemoryTracker, flops: MatmulFlops, mode: Any) -> None:
        self.tracker, self.flops, self.mode = tracker, flops, mode
        self.segments: list[dict[str, int]] = []
        self.out: dict[str, int] = {}

    def cut(self) -> dict[str, int]:
        """Close a stretch of the step: keep its peak and breakdown; the live bytes now."""
        self.segments.append(self.tracker.summary())
        self.tracker.reset_peak()
        return self.tracker.summary()

    def accumulating(self) -> AbstractContextManager:
        stack = contextlib.ExitStack()
        for ctx in (self.mode, self.tracker, self.flops):
            stack.enter_context(ctx)
        return stack

    def updating(self) -> AbstractContextManager:
        return self.tracker

    def before_forward(self) -> None:
        self.flops.backward = False

    def after_forward(self) -> None:
        self.out["memory_activations_bytes"] = self.cut()["memory_activations_bytes"]
        self.flops.backward = True

    def after_update(self) -> None:
        now = self.cut()
        self.out.update({f"memory_{c}_bytes": now[f"memory_{c}_bytes"] for c in ("weights", "gradients", "optimizer")})


def tracked_step(
    model: nn.Module, lev: Levers, micro: list[dict[str, torch.Tensor]], mode: Any = None, pass_mask: bool = True
) -> dict[str, int]:
    """One optimizer step as the run takes it (``train.OptimizerStep``, the same function: each
    micro-batch's forward under the precision's autocast, its loss weighted by its share,
    backward; clipping at ``lev.grad_clip``; AdamW), under the tensor-memory tracker on CPU and
    the FLOP counter (``TraceProbe``), after a first AdamW step on zero gradients that creates
    the optimizer state. The model's tensors are real, or fake (``mode``: the ``FakeTensorMode``
    they belong to; then the mask is not passed, since the mask-is-all-ones check cannot read
    fake values, and is only kept alive). No loss scaler and no schedule: a few scalars.

    Returns: ``memory_activations_bytes``, the live non-weight, non-state bytes right after the
    (last) forward; ``peak_memory_bytes`` and the breakdown at the peak (``peak_<category>``);
    weights, gradients and optimizer bytes right after the optimizer's step; FLOPs executed
    (``flops``, ``attention_flops``) and ``recomputed_flops``.
    """
    mode = mode or contextlib.nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.Optimizer(torch.optim.AdamW(params, lr=lev.lr, weight_decay=lev.weight_decay), params)
    with mode:
        for p in params:
            p.grad = torch.zeros_like(p)
    opt.optimizer.step()  # the state, as after a first step (its float32 step counters are real)
    opt.optimizer.zero_grad(set_to_none=True)
    tracker = TensorMemoryTracker(model, opt.optimizer, "cpu", extra=[t for b in micro for t in b.values()])
    probe = TraceProbe(tracker, MatmulFlops(), mode)
    inputs = [b if pass_mask else {k: v for k, v in b.items() if k != "attention_mask"} for b in micro]
    # each micro-batch's loss weighted by its share of the step, none for a single one: the
    # micro-batches are of one size with every label predicted, so ``train.loss_shares`` would
    # give 1/n each (counted from the shapes: a fake tensor has no values to count)
    shares: list[Optional[float]] = [1.0 / len(micro)] * len(micro) if len(micro) > 1 else [None]
    model.train()
    train.OptimizerStep(model, opt, lev, torch.device("cpu"), probe=probe)(inputs, shares)
    out = probe.out
    peak = max(probe.segments, key=lambda s: s["peak_memory_bytes"])
    out.update({k.replace("memory_", "peak_", 1) if k != "peak_memory_bytes" else k: v for k, v in peak.items()})
    flops = probe.flops
    out.update(flops=flops.flops, attention_flops=flops.attention, recomputed_flops=flops.recomputed)
    out["recomputed_attention_flops"] = flops.recomputed_attention
    tracker.close()
    return out


def on_device(meta: Any, device: torch.device) -> Any:
    """A wrapper subclass's flattened metadata with any device it records set to ``device``
    (torchao's NF4Tensor keeps its device in a dataclass there)."""
    if isinstance(meta, torch.device):
        return device
    if isinstance(meta, dict):
        return {k: on_device(v, device) for k, v in meta.items()}
    if dataclasses.is_dataclass(meta) and hasattr(meta, "device"):
        return dataclasses.replace(cast(Any, meta), device=device)
    return meta


def rebuilt(t: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``t`` with each plain tensor in it replaced by ``make(tensor)``: a wrapper subclass (a
    quantized weight) is rebuilt around its replaced inner tensors, on their device."""
    if not is_traceable_wrapper_subclass(t):
        return make(t)
    names, meta = t.__tensor_flatten__()
    inner = {n: rebuilt(getattr(t, n), make) for n in names}
    device = next(iter(inner.values())).device
    return type(t).__tensor_unflatten__(inner, on_device(meta, device), t.size(), t.stride())


@contextlib.contextmanager
def quantized_once_per_shape() -> Iterator[None]:
    """On meta, ``quantize.quantize_weight`` runs once per weight shape and its result is
    copied (new, empty inner tensors) for the other weights of that shape: meta holds no
    values, and torchao's NF4 packing costs about a second per large weight even there."""
    original = quantize.quantize_weight
    done: dict[tuple, torch.Tensor] = {}

    def once(w: torch.Tensor, scheme: str) -> torch.Tensor:
        key = (tuple(w.shape), w.dtype, w.device, scheme)
        if key not in done:
            done[key] = original(w, scheme)
        return rebuilt(done[key], torch.empty_like)

    quantize.quantize_weight = once
    try:
        yield
    finally:
        quantize.quantize_weight = original


def to_fake(model: nn.Module, mode: Any) -> None:
    """Replace every parameter and buffer of a meta ``model`` by a fake CPU tensor of ``mode``
    (a quantized weight: the same wrapper around fake inner tensors); tied tensors stay tied."""
    done: dict[int, torch.Tensor] = {}

    def empty_cpu(t: torch.Tensor) -> torch.Tensor:
        with mode:
            return torch.empty_like(t, device="cpu")

    def fake(t: torch.Tensor) -> Any:
        if id(t) not in done:
            new = rebuilt(t, empty_cpu)
            done[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return done[id(t)]

    for module in model.modules():
        for kind in (module._parameters, module._buffers):
            for name, t in kind.items():
                if t is not None:
                    kind[name] = fake(t)


def fake_model(config: Any, cfg: DictConfig, lev: Levers) -> tuple[nn.Module, Any, Optional[dict[str, Any]]]:
    """The model of ``config`` as fake CPU tensors (``FakeTensorMode``: shapes, dtypes and
    storages without bytes, and CPU's autocast applies), prepared as a run prepares it (the
    base cast and quantized on meta, where quantizing costs no arithmetic). Returns (model,
    its fake mode, the quantization account)."""
    # heavy third-party modules (fake tensors load torch._dynamo: about 1.3 s) are imported where
    # a trace needs them, so a config error is told at once
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.device("meta"):
        model = models.auto_class(task_kind(cfg)).from_config(config, dtype=torch.float32)
    with quantized_once_per_shape():
        quantized = prepare_base(model, cfg, lev)
    to_fake(model, mode)
    with mode:
        model = prepare_method(model, cfg, lev)[0]
    return model, mode, quantized


@contextlib.contextmanager
def unpacked() -> Iterator[None]:
    """transformers' masks as for the harness's batches (a mask of ones: no padding, no packed
    sequences). Without a mask transformers looks for packed sequences in the position ids,
    which it cannot read in fake tensors, and then builds a full mask that the real run
    (all-ones mask: causal attention, no mask) never has."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def trace(config: Any, cfg: DictConfig, lev: Optional[Levers] = None) -> dict[str, int]:
    """One training step of the model of ``config`` (with ``cfg``'s precision, quantization,
    method, checkpointing and micro-batches) run on fake tensors under the tracker: what the
    same step would show the tracker on CPU, with no bytes allocated and no arithmetic done.

    Attention runs as the fused CPU kernel (``AttentionKernel``); under ``attention=eager``
    the probabilities are added in closed form to the activations and the peak (under
    checkpointing only one layer's, to the peak). ``quantized_saving``: the bytes the
    quantized base saves (``quantize_base``'s own account). Under ``parallel=fsdp`` the model is
    sharded as a run shards it (``ranks.shard``) over a fake group of the world size
    (``fake_group``), and the step is rank 0's: its shards, and the unsharded parameters,
    all-gather and reduce-scatter buffers FSDP2 allocates and frees around each layer."""
    lev = lev or config_mod.levers(cfg)
    model, mode, quantized = fake_model(config, cfg, lev)
    with mode:
        micro = [
            {k: torch.empty_like(v) for k, v in b.items()}
            for b in micro_batches(lev, cfg.seq_length, 2, task_kind(cfg))
        ]
    kernel = AttentionKernel(cfg.attention)
    sharded = fsdp_sharded(cfg, lev)
    group = fake_group(lev.world_size) if sharded else contextlib.nullcontext()
    with kernel.installed(), unpacked(), group as mesh:
        if sharded:
            ranks.shard(model, mesh)
        got = tracked_step(model, lev, micro, mode, pass_mask=False)
    eager = kernel.eager_bytes
    if lev.gradient_checkpointing:
        got["peak_memory_bytes"] += max(eager, default=0)
    else:
        got["memory_activations_bytes"] += sum(eager)
        got["peak_memory_bytes"] += sum(eager)
    got["quantized_saving"] = quantized["dense_weight_bytes"] - quantized["quantized_weight_bytes"] if quantized else 0
    return got


@contextlib.contextmanager
def fake_group(world: int) -> Iterator[Any]:
    """A default process group of ``world`` ranks held by this one process as rank 0, whose
    collectives move nothing (torch's ``fake`` backend, the one torchtitan's memory estimation
    runs FSDP2 on): FSDP2 pads, allocates and frees on it exactly as on a real group, so a
    traced step shows one rank's memory. Yields its one-dimensional CPU device mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("an FSDP estimate runs on a fake process group of its own; this process is in a group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def with_layers(config: Any, layers: int) -> Any:
    """A copy of the transformers ``config`` with ``layers`` layers."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers  # GPT-2's n_layer through its attribute map
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    return config


def trace_model(config: Any, cfg: DictConfig, lev: Optional[Levers] = None) -> dict[str, int]:
    """``trace`` of the whole model, from traces of its 2- and 3-layer versions.

    Every layer after the first is the same code on the same shapes, so each figure is
    c(2) + (L - 2) * (c(3) - c(2)) (the first layer differs: nothing below it trains, so no
    input gradient; under FSDP2, c(3) + (L - 3) * (c(4) - c(3))); exact for bytes held and
    FLOPs; for the peak, exact as long as the peak falls in the same part of the step for every
    depth (``tests/test_estimate.py`` and, for FSDP2, ``tests/test_parallel.py`` compare whole
    traces). A 96-layer trace costs far more than two small ones.
    """
    lev = lev or config_mod.levers(cfg)
    layers = config.num_hidden_layers
    # FSDP2: the root's unsharding and the first prefetches overlap the first layers differently,
    # so depth adds the same bytes only from 3 layers on (tests/test_parallel.py)
    low = 3 if fsdp_sharded(cfg, lev) else 2
    if layers <= low + 1:
        return trace(config, cfg, lev)
    a, b = (trace(with_layers(config, n), cfg, lev) for n in (low, low + 1))
    return {k: a[k] + (layers - low) * (b[k] - a[k]) for k in a}


def korthikanti_bytes(config: Any, batch: int, seq: int, eager: bool) -> Optional[int]:
    """Korthikanti et al. (2022), eq. 2, per layer s*b*h*(34 + 5*a*s/h) bytes for a GPT layer in
    16-bit without recomputation (its flash form drops the 5*a*s/h softmax/dropout term), times
    the layers; for comparison with the traced figure. None if the config lacks the sizes."""
    h = getattr(config, "hidden_size", None)
    a = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not (h and a and layers):
        return None
    per_layer = seq * batch * h * 34 + (5 * a * seq * seq * batch if eager else 0)
    return layers * per_layer


# ------------------------------------------------------------------------ estimate


def fsdp_sharded(cfg: DictConfig, lev: Levers) -> bool:
    """Whether the traced step is one FSDP2 rank's (``parallel=fsdp`` on more than one rank).
    Ring bytes are those of one flat ring over every rank, whatever the nodes."""
    return cfg.parallel.strategy == "fsdp" and lev.world_size > 1


def sharded_state_bytes(model: nn.Module, precision: str, world: int) -> dict[str, int]:
    """``state_bytes`` of the shard one FSDP rank holds (rank 0, the largest): each parameter's
    ``ceil(rows / world)`` rows (FSDP2 pads the first dimension to a multiple of ``world``), of
    its weight, gradient and AdamW state; buffers are not sharded."""
    params = unique(model.parameters())

    def shard(p: torch.Tensor) -> int:
        return ranks.padded_numel(p, world) // world

    optimizer = 0
    for p in params:
        if p.requires_grad:
            per_elem = 12 if precision == MASTER and p.element_size() < 4 else 2 * p.element_size()
            optimizer += shard(p) * per_elem + STEP_BYTES
    return {
        "memory_weights_bytes": sum(shard(p) * p.element_size() for p in params)
        + sum(nbytes(b) for b in unique(model.buffers())),
        "memory_gradients_bytes": sum(shard(p) * p.element_size() for p in params if p.requires_grad),
        "memory_optimizer_bytes": optimizer,
    }


def distributed(model: nn.Module, cfg: DictConfig, lev: Levers, metrics: dict[str, Any]) -> None:
    """One rank's figures of a distributed step (``metrics``, updated in place; the step was
    traced at one rank's share of the batch): DDP adds the gradient buckets (a flat copy of the
    trainable gradients, live throughout) to the activations and the peak; under FSDP2 the
    traced step was already one rank's (``trace``), and its weights, gradients and optimizer
    state are the shards in closed form (``sharded_state_bytes``). Communication: the closed
    form of the measured run (``ranks.comm_closed_form``)."""
    world, strategy = lev.world_size, cfg.parallel.strategy
    metrics["world_size"] = world
    if strategy == "ddp":
        buckets = metrics["memory_gradients_bytes"]
        metrics["memory_activations_bytes"] += buckets
        metrics["peak_memory_bytes"] += buckets
    else:
        metrics.update(sharded_state_bytes(model, lev.precision, world))
    closed = ranks.comm_closed_form(model, strategy, world, lev.grad_accum)
    metrics.update({f"comm_{k}_per_step_closed_form": v for k, v in closed.items()})
    metrics["comm_ring_bytes_sent_per_rank_per_step"] = ranks.ring_bytes_sent(closed, world)


def estimate(cfg: DictConfig) -> dict[str, Any]:
    """The estimate's metrics (flat, the measured run's key names) and method description.

    Weights, gradients and optimizer state: closed form on the whole meta model (the bytes the
    quantized base saves from the traced small models). Activations, the peak and FLOPs: the
    traced step (``trace_model``, one rank's share of each micro-batch); under bf16-master the
    peak also holds the master copies and fp32 moments that the traced pure-bf16 step lacks.
    """
    lev = config_mod.levers(cfg)
    model, method = build(cfg, lev)
    tokens = lev.batch_size * cfg.seq_length * lev.grad_accum  # the global step's
    rank_tokens = tokens // lev.world_size
    states = state_bytes(model, lev.precision)
    traced = trace_model(model.config, cfg, lev)
    states["memory_weights_bytes"] -= traced["quantized_saving"]
    metrics: dict[str, Any] = {
        **parameters(model),
        **states,
        "memory_activations_bytes": traced["memory_activations_bytes"],
        "peak_memory_bytes": traced["peak_memory_bytes"] + master_bytes(model, cfg, lev),
        "memory_activations_korthikanti_bytes": korthikanti_bytes(
            model.config, lev.batch_size, cfg.seq_length, cfg.attention == "eager"
        ),
        **flops(traced, cfg, lev, rank_tokens),
        "train_tokens_per_step": tokens,
    }
    if lev.world_size > 1 or cfg.parallel.strategy != "none":
        distributed(model, cfg, lev, metrics)
    config: Any = model.config
    return {"metrics": metrics, "method_config": method.describe(model), "model_config": config.to_dict()}


def parameters(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameters (tied tensors once) and the trainable share (%)."""
    trainable, total = methods.trainable_parameters(model), methods.total_parameters(model)
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total}


def master_bytes(model: nn.Module, cfg: DictConfig, lev: Levers) -> int:
    """Under bf16-master, the fp32 master copies and moments (FSDP: their shards) that the
    traced pure-bf16 step lacks at its peak; 0 otherwise."""
    if lev.precision != MASTER:
        return 0
    world = lev.world_size if cfg.parallel.strategy == "fsdp" else 1
    opt = "memory_optimizer_bytes"
    return sharded_state_bytes(model, MASTER, world)[opt] - sharded_state_bytes(model, "bf16", world)[opt]


def flops(traced: dict[str, int], cfg: DictConfig, lev: Levers, rank_tokens: int) -> dict[str, Any]:
    """The traced step's FLOPs per rank token and per step (one rank's), the attention's share,
    and under checkpointing the model FLOPs without the recomputed forward (behind MFU)."""
    attention = traced["attention_flops"]
    executed = traced["flops"] - (0 if cfg.flops_attention else attention)
    out = {
        "train_flops_per_token": executed / rank_tokens,
        "train_flops_per_step": executed,  # one rank's (all of them at world size 1)
        "train_attention_flops_per_token": attention / rank_tokens,
    }
    if lev.gradient_checkpointing:
        recomputed = traced["recomputed_flops"] - (0 if cfg.flops_attention else traced["recomputed_attention_flops"])
        out["train_model_flops_per_token"] = (executed - recomputed) / rank_tokens
    return out
