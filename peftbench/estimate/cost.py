"""The estimator's cost model: a method's parameters, bytes and FLOPs on a model built on the
meta device (shapes only), for one training step of ``batch_size`` x ``seq_length`` tokens.

See the package docstring (``peftbench.estimate``) for what is counted and how, and
``docs/ESTIMATES.md`` for the assumptions and the measured error.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

import methods
from peftbench import config as config_mod

# precision -> (dtype of weights, gradients and activations; bytes per trained element of optimizer state)
#   fp32:  fp32 weights and gradients; AdamW exp_avg + exp_avg_sq in fp32 (8 B)
#   mixed: bf16 weights, gradients and activations; fp32 master copy of each TRAINED weight
#          plus fp32 exp_avg + exp_avg_sq (4 + 8 = 12 B): the usual mixed-precision AdamW
#          (Micikevicius et al. 2018; ZeRO's 2 + 2 + 12 = 16 B per parameter for full fine-tuning)
#   bf16:  pure bf16: weights, gradients and both AdamW moments in bf16 (2 + 2 B), no master copy
PRECISIONS = {"fp32": (torch.float32, 8), "mixed": (torch.bfloat16, 12), "bf16": (torch.bfloat16, 4)}
ATTENTION = ("flash", "eager")
STEP_BYTES = 4  # torch AdamW keeps one float32 step counter per trained tensor


def model_spec(cfg: Any) -> tuple[Any, int]:
    """The model config to build (dtype from ``precision``, ``arch.vocab_size`` taken out) and
    the vocabulary size: the preset's own ``arch.vocab_size`` when it has one, else
    ``cfg.vocab_size``. (``models.build_meta`` passes vocab_size itself.)"""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    arch = dict(spec.get("arch") or {})
    vocab = int(arch.pop("vocab_size", cfg.vocab_size))
    spec["arch"] = arch
    spec["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[PRECISIONS[cfg.precision][0]]
    return OmegaConf.create(spec), vocab


BUILT: dict[str, tuple[torch.nn.Module, Any]] = {}  # check phase -> job, same process


def build_key(cfg: Any) -> str:
    from peftbench.records import config_hash

    return config_hash(config_mod.to_container(cfg))


def build(cfg: Any, keep: bool = False) -> tuple[torch.nn.Module, Any]:
    """The base model on the meta device with the method applied; returns (model, method).

    keep: remember the result for the one ``build`` of the same config that follows (the
    check phase builds every job's model; the job then reuses it).
    """
    from peftbench import models

    key = build_key(cfg)
    if key in BUILT:
        return BUILT.pop(key)

    spec, vocab = model_spec(cfg)
    meta = models.build_meta(spec, "causal-lm", vocab, 0)
    method = methods.build(cfg.method)
    built = method.apply(meta), method
    methods.check_context(
        meta.config, {"seq_length": cfg.seq_length}, getattr(method, "context_tokens", 0), f"method={cfg.method.name}"
    )
    if keep:
        BUILT[key] = built
    return built


# ------------------------------------------------------------------------ counting


def unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor once (tied weights are one tensor)."""
    return list({id(t): t for t in tensors}.values())


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(model: torch.nn.Module, precision: str) -> dict[str, int]:
    """Weights (parameters and buffers), gradients and AdamW state, in bytes.

    Gradients have their parameter's dtype. Optimizer state per trained element: see
    ``PRECISIONS``; under ``mixed`` a parameter already kept in fp32 needs no master copy.
    """
    params = unique(model.parameters())
    trained = [p for p in params if p.requires_grad]
    per_elem = PRECISIONS[precision][1]
    optimizer = 0
    for p in trained:
        if precision == "bf16":
            per_elem = 2 * p.element_size()
        elif precision == "mixed":
            per_elem = 8 if p.dtype == torch.float32 else 12  # an fp32 parameter is its own master copy
        optimizer += p.numel() * per_elem + STEP_BYTES
    return {
        "memory_weights_bytes": sum(nbytes(t) for t in params + unique(model.buffers())),
        "memory_gradients_bytes": sum(nbytes(p) for p in trained),
        "memory_optimizer_bytes": optimizer,
        "checkpoint_bytes": sum(nbytes(p) for p in trained),
    }


class AttentionCounter:
    """Replaces ``torch.nn.functional.scaled_dot_product_attention`` while tracing on meta.

    Counts the score and value products, 2 * 2*b*a*s_q*s_kv*d FLOPs forward (the full
    s_q x s_kv square, as the literature counts it; a causal kernel skips about half), and
    twice that backward when q, k or v needs a gradient. Runs the CPU flash kernel, which
    saves what fused kernels save (q, k, v, output, log-sum-exp); under ``eager`` the
    probabilities an unfused implementation also keeps (fp32 softmax output, plus its copy
    in a 16-bit activation dtype) are added in closed form.
    """

    def __init__(self, attention: str):
        self.attention = attention
        self.flops = 0
        self.eager_bytes = 0

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        b, a, s_q, d = query.shape
        s_kv = key.shape[-2]
        grad = any(t.requires_grad for t in (query, key, value))
        self.flops += 4 * b * a * s_q * s_kv * d * (3 if grad else 1)
        if grad and self.attention == "eager":
            e = query.element_size()
            self.eager_bytes += b * a * s_q * s_kv * (4 + (e if e < 4 else 0) + (1 if dropout_p > 0 else 0))
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal and attn_mask is None, attn_mask=attn_mask, scale=scale
        )
        return out

    @contextlib.contextmanager
    def installed(self):
        original = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self
        try:
            yield self
        finally:
            torch.nn.functional.scaled_dot_product_attention = original


class MatmulFlops(TorchDispatchMode):
    """FLOPs of every ATen op that ``torch.utils.flop_counter`` has a formula for (mm, addmm,
    bmm, baddbmm, convolutions, fused attention), 2 per multiply-add, forward and backward.

    A lighter stand-in for ``FlopCounterMode``, whose per-op module tracking and
    decompositions cost seconds per pass on a 96-layer model.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def trace(model: torch.nn.Module, batch: int, seq: int, attention: str) -> dict[str, int]:
    """One forward and backward pass on meta: saved-activation bytes and FLOPs.

    Activations: every distinct storage autograd saves for backward that is not a parameter
    or buffer, plus the input batch (ids, labels, attention mask: int64) and the loss. Views
    of one storage count once.
    """
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    own = {t.untyped_storage()._cdata for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {ids.untyped_storage()._cdata: nbytes(ids)}
    labels = torch.zeros_like(ids)
    saved[labels.untyped_storage()._cdata] = nbytes(labels)
    mask_bytes = nbytes(ids)  # the harness passes an attention mask of ones; not given on meta

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in own:
            saved[storage._cdata] = storage.nbytes()
        return t

    attn = AttentionCounter(attention)
    was_training = model.training
    model.train()
    try:
        with attn.installed(), MatmulFlops() as flops:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=labels).loss
            saved[loss.untyped_storage()._cdata] = nbytes(loss)  # held until backward, not saved
            if loss.requires_grad:
                loss.backward()
    finally:
        model.train(was_training)
    return {
        "activations": sum(saved.values()) + mask_bytes + attn.eager_bytes,
        "matmul_flops": flops.flops,
        "attention_flops": attn.flops,
    }


def with_layers(model: torch.nn.Module, layers: int, cfg: Any) -> torch.nn.Module:
    """The same architecture with ``layers`` layers, on meta, with the method applied."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers  # GPT-2's n_layer through its attribute map
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(config, dtype=PRECISIONS[cfg.precision][0])
    return methods.build(cfg.method).apply(small)


def trace_model(model: torch.nn.Module, cfg: Any) -> dict[str, int]:
    """``trace`` of the whole model, from traces of its 2- and 3-layer versions.

    Every layer after the first is the same code on the same shapes, so each figure is
    c(2) + (L - 2) * (c(3) - c(2)) exactly (the first layer differs: nothing below it trains,
    so no input gradient); a 96-layer trace costs seconds, two small ones a fraction.
    """
    layers = model.config.num_hidden_layers
    if layers <= 3:
        return trace(model, cfg.batch_size, cfg.seq_length, cfg.attention)
    two, three = (trace(with_layers(model, n, cfg), cfg.batch_size, cfg.seq_length, cfg.attention) for n in (2, 3))
    return {k: two[k] + (layers - 2) * (three[k] - two[k]) for k in two}


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


def estimate(cfg: Any) -> dict[str, Any]:
    """The estimate's metrics (flat, the measured run's key names) and method description."""
    model, method = build(cfg)
    tokens = cfg.batch_size * cfg.seq_length
    states = state_bytes(model, cfg.precision)
    traced = trace_model(model, cfg)
    flops = traced["matmul_flops"] + (traced["attention_flops"] if cfg.flops_attention else 0)
    trainable = methods.trainable_parameters(model)
    total = methods.total_parameters(model)
    metrics: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        **states,
        "memory_activations_bytes": traced["activations"],
    }
    metrics["peak_memory_bytes"] = sum(
        metrics[f"memory_{c}_bytes"] for c in ("weights", "gradients", "optimizer", "activations")
    )
    metrics.update(
        {
            "memory_activations_korthikanti_bytes": korthikanti_bytes(
                model.config, cfg.batch_size, cfg.seq_length, cfg.attention == "eager"
            ),
            "train_flops_per_token": flops / tokens,
            "train_flops_per_step": flops,
            "train_attention_flops_per_token": traced["attention_flops"] / tokens,
            "train_tokens_per_step": tokens,
        }
    )
    return {"metrics": metrics, "method_config": method.describe(model), "model_config": model.config.to_dict()}
