"""Paper-scale estimates: what a method costs on a 3B-175B model, from its config alone.

``python -m peftbench.estimate model=gpt3-175b method=lora rank=4`` builds the model on the
meta device (shapes only: no weight memory, no download), applies the REAL method code
(``methods.build(cfg.method).apply``), and derives, per training step of ``batch_size`` x
``seq_length`` tokens:

- trainable / total parameters, counted on the modified meta model (tied tensors once);
- checkpoint bytes: what the method trains, in its training dtype (full: the whole model);
- weight, gradient and optimizer-state bytes under ``precision`` (see ``PRECISIONS``);
- activation bytes: every tensor autograd saves for the backward pass, counted on the meta
  device by running the model's own forward (``trace``), with attention as a fused (flash)
  kernel saves it; an ESTIMATE (see ``docs/ESTIMATES.md`` for its assumptions and its measured
  error), plus the Korthikanti et al. (2022) closed form for comparison;
- training FLOPs per token and per step: every matrix product of the forward and backward
  pass, counted on the meta device (``torch.utils.flop_counter``), so frozen weights cost no
  weight gradient and layers below the first trainable parameter no input gradient; attention
  score/value products added in closed form.

Records have the measured-run format (``kind: "estimate"``) and go to ``results_dir``.
``python -m peftbench.estimate calibrate`` puts each estimated part beside the tensor-memory
tracker's measurement of a real fp32 training step on the small built-in models.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

import methods
from peftbench import config as config_mod
from peftbench import cli
from peftbench.cli import CONF_DIR
from peftbench.config import ModelConfig, require

CONFIG_NAME = "estimate"
PROG = "peftbench.estimate"
# precision -> (dtype of weights, gradients and activations; bytes per trained element of optimizer state)
#   fp32:  fp32 weights and gradients; AdamW exp_avg + exp_avg_sq in fp32 (8 B)
#   mixed: bf16 weights, gradients and activations; fp32 master copy of each TRAINED weight
#          plus fp32 exp_avg + exp_avg_sq (4 + 8 = 12 B): the usual mixed-precision AdamW
#          (Micikevicius et al. 2018; ZeRO's 2 + 2 + 12 = 16 B per parameter for full fine-tuning)
#   bf16:  pure bf16: weights, gradients and both AdamW moments in bf16 (2 + 2 B), no master copy
PRECISIONS = {"fp32": (torch.float32, 8), "mixed": (torch.bfloat16, 12), "bf16": (torch.bfloat16, 4)}
ATTENTION = ("flash", "eager")
STEP_BYTES = 4  # torch AdamW keeps one float32 step counter per trained tensor


@dataclass
class EstimateConfig:
    """Settings of one estimate.

    precision: fp32 | mixed | bf16 (bytes per element: see ``PRECISIONS``). batch_size /
    seq_length: examples and tokens per example of one training step. vocab_size: vocabulary
    of a preset whose ``arch`` does not fix one (the tiny models; the default task's word
    tokenizer size). attention: flash (a fused kernel saves q, k, v, output and log-sum-exp)
    or eager (the probabilities too, as in Korthikanti et al.). flops_attention: include the
    attention score/value products in ``train_flops_per_token``. rank: interpolated into
    methods that have one.
    """

    method: Any = MISSING
    model: ModelConfig = MISSING
    rank: int = 8
    precision: str = "mixed"
    batch_size: int = 1
    seq_length: int = 1024
    vocab_size: int = 1024
    attention: str = "flash"
    flops_attention: bool = True
    results_dir: str = "results/estimates"


config_mod.register_configs()
ConfigStore.instance().store(name="estimate_schema", node=EstimateConfig)


def check(cfg: Any) -> None:
    """Reject values that cannot work (one-line ``ConfigError``)."""
    require(cfg.method.name in methods.REGISTRY, "method", cfg.method.name,
             f"allowed: {', '.join(sorted(methods.REGISTRY))}")
    methods.REGISTRY[cfg.method.name](cfg.method)  # each method checks its own keys
    require(cfg.precision in PRECISIONS, "precision", cfg.precision, f"allowed: {', '.join(PRECISIONS)}")
    require(cfg.attention in ATTENTION, "attention", cfg.attention, f"allowed: {', '.join(ATTENTION)}")
    require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    require(cfg.seq_length >= 1, "seq_length", cfg.seq_length, "must be >= 1 token")
    require(cfg.vocab_size >= 1, "vocab_size", cfg.vocab_size, "must be >= 1")
    require(bool(str(cfg.results_dir).strip()), "results_dir", repr(cfg.results_dir), "must be a folder path")
    require(cfg.model.name_or_path is not None or bool(cfg.model.arch), "model.arch", "{}",
             "needs model.arch (or set model.name_or_path to a folder with a config.json)")


# ----------------------------------------------------------------------------- model


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
    from peftbench.records import writer as record

    return record.config_hash(config_mod.to_container(cfg))


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
    ctx = models.context_length(meta.config)
    require(ctx is None or cfg.seq_length <= ctx, "seq_length", cfg.seq_length,
             f"longer than the model's context of {ctx} tokens")
    method = methods.build(cfg.method)
    built = method.apply(meta), method
    taken = getattr(method, "context_tokens", 0)  # prefix tuning's positions
    require(ctx is None or cfg.seq_length + taken <= ctx, "seq_length", cfg.seq_length,
             f"with method={cfg.method.name}'s {taken} virtual tokens exceeds the model's context of {ctx} "
             f"tokens; allowed: at most {ctx - taken if ctx else None}")
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

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        b, a, s_q, d = query.shape
        s_kv = key.shape[-2]
        grad = any(t.requires_grad for t in (query, key, value))
        self.flops += 4 * b * a * s_q * s_kv * d * (3 if grad else 1)
        if grad and self.attention == "eager":
            e = query.element_size()
            self.eager_bytes += b * a * s_q * s_kv * (4 + (e if e < 4 else 0) + (1 if dropout_p > 0 else 0))
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal and attn_mask is None, attn_mask=attn_mask, scale=scale)
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
    metrics["peak_memory_bytes"] = sum(metrics[f"memory_{c}_bytes"] for c in ("weights", "gradients", "optimizer",
                                                                              "activations"))
    metrics.update({
        "memory_activations_korthikanti_bytes": korthikanti_bytes(model.config, cfg.batch_size, cfg.seq_length,
                                                                  cfg.attention == "eager"),
        "train_flops_per_token": flops / tokens,
        "train_flops_per_step": flops,
        "train_attention_flops_per_token": traced["attention_flops"] / tokens,
        "train_tokens_per_step": tokens,
    })
    return {"metrics": metrics, "method_config": method.describe(model), "model_config": model.config.to_dict()}


def new_record(cfg: Any) -> dict[str, Any]:
    """A record in the measured run's format, ``kind: "estimate"``; ``task`` is null."""
    from peftbench.records import writer as record

    resolved = config_mod.to_container(cfg)
    chash = record.config_hash(resolved)
    return {
        "schema_version": record.SCHEMA_VERSION,
        "run_id": record.run_id(cfg.method.name, cfg.model.name, "estimate", chash),
        "kind": "estimate",
        "status": "running",
        "error": None,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": None,
        "config_hash": chash,
        "config": resolved,
        "model_config": None,
        "method_config": None,
        "provenance": None,
        "assumptions": {"precision": cfg.precision, "optimizer": "AdamW", "batch_size": cfg.batch_size,
                        "seq_length": cfg.seq_length, "attention": cfg.attention,
                        "flops_attention": cfg.flops_attention, "recomputation": False,
                        "peak": "weights + gradients + optimizer + activations, all live at once"},
        "metrics": {},
    }


def run(cfg: Any) -> tuple[dict[str, Any], Any]:
    """Estimate one config and write its record, ok or failed; returns (record, path)."""
    from peftbench.records import writer as record
    from peftbench.run import one_line

    rec = new_record(cfg)
    t0 = time.perf_counter()
    try:
        check(cfg)
        rec.update(estimate(cfg))
        rec["status"] = "ok"
    except Exception as e:  # recorded, not raised: a sweep goes on
        rec["status"], rec["error"] = "failed", one_line(e)
    rec["provenance"] = record.provenance(torch.device("meta"))
    rec["wall_s"] = time.perf_counter() - t0
    return rec, record.write(rec, cfg.results_dir)


# --------------------------------------------------------------------------- output


def human(n: Optional[float], unit: str = "B") -> str:
    """1234567 -> '1.23 MB' (decimal prefixes, as the papers use)."""
    if n is None:
        return "-"
    for prefix in ("", "k", "M", "G", "T", "P", "E"):
        if abs(n) < 1000 or prefix == "E":
            return f"{n:.3g} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return str(n)


COLUMNS = (("model", None), ("method", None), ("precision", None), ("trainable", "trainable_params"), ("total", "total_params"),
           ("ckpt", "checkpoint_bytes"), ("weights", "memory_weights_bytes"), ("grads", "memory_gradients_bytes"),
           ("optim", "memory_optimizer_bytes"), ("activ*", "memory_activations_bytes"),
           ("peak*", "peak_memory_bytes"), ("FLOP/token", "train_flops_per_token"))


def table_row(rec: dict[str, Any]) -> list[str]:
    m = rec["metrics"]
    out = [rec["model"], rec["method"], rec["config"]["precision"]]
    for name, key in COLUMNS[3:]:
        unit = "" if key.endswith("params") or key.startswith("train_flops") else "B"
        out.append(human(m.get(key), unit).strip() if rec["status"] == "ok" else "-")
    return out


def print_table(recs: list[dict[str, Any]]) -> None:
    rows = [[c for c, _ in COLUMNS]] + [table_row(r) for r in recs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(v.rjust(w) if i > 2 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))



# ---------------------------------------------------------------------- calibration

CALIBRATE_MODELS = ("tiny-llama", "tiny-gpt2")
PARTS = ("weights", "gradients", "optimizer", "activations")


def compose_estimate(*overrides: str) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name=PROG):
        cfg = compose(CONFIG_NAME, overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def measure(cfg: Any) -> dict[str, int]:
    """The tensor-memory tracker's figures for one real fp32 AdamW step on CPU of the model and
    method of ``cfg`` (batch of ``batch_size`` x ``seq_length`` random ids, mask of ones).

    Two steps run (the first creates the optimizer state); in the second, the tracker gives:
    ``memory_activations_bytes``: live non-weight, non-state bytes right after the forward (the
    batch, what autograd saved, the loss); weights, gradients and optimizer bytes right after
    ``optimizer.step()``; and the step's peak with its breakdown (``peak_*``).
    """
    from peftbench import models
    from peftbench.memory import TensorMemoryTracker

    spec, vocab = model_spec(cfg)
    model = models.build(spec, "causal-lm", vocab, 0, 0)
    torch.manual_seed(0)
    model = methods.build(cfg.method).apply(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    out: dict[str, int] = {}
    tracker = TensorMemoryTracker(model, optimizer, "cpu", extra=batch.values())
    model.train()
    for step in range(2):
        with tracker:
            tracker.reset_peak()
            loss = model(**batch).loss
            if step == 1:
                tracker.reset_peak()
                out["memory_activations_bytes"] = tracker.summary()["memory_activations_bytes"]
            loss.backward()
            optimizer.step()
            if step == 1:
                out.update({f"peak_{k}": v for k, v in tracker.summary().items()})
                tracker.reset_peak()
                now = tracker.summary()
                out.update({f"memory_{c}_bytes": now[f"memory_{c}_bytes"] for c in PARTS[:3]})
            optimizer.zero_grad(set_to_none=True)
            del loss
    return out


def calibration_rows(model: str, method: str, batch: int, seq: int) -> list[tuple[str, str, str, int, int]]:
    """(model, method, part, estimated bytes, measured bytes) for one model and method."""
    cfg = compose_estimate(f"model={model}", f"method={method}", "precision=fp32", f"batch_size={batch}",
                           f"seq_length={seq}")
    est = estimate(cfg)["metrics"]
    got = measure(cfg)
    rows = [(model, method, c, est[f"memory_{c}_bytes"], got[f"memory_{c}_bytes"]) for c in PARTS]
    rows.append((model, method, "peak (sum)", est["peak_memory_bytes"], got["peak_peak_memory_bytes"]))
    return rows


def calibrate(argv: list[str]) -> int:
    """``python -m peftbench.estimate calibrate [batch_size=4] [seq_length=128]``: estimated vs
    measured bytes per part for every method on the small built-in models (fp32, CPU)."""
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    batch, seq = int(opts.get("batch_size", 4)), int(opts.get("seq_length", 128))
    print(f"CALIBRATION: estimate (precision=fp32) vs tensor-memory tracker, one real AdamW step on CPU, "
          f"batch {batch} x {seq} tokens")
    print(f"{'model':<11} {'method':<8} {'part':<12} {'estimated':>12} {'measured':>12} {'error':>8}")
    worst = 0.0
    for model in CALIBRATE_MODELS:
        for method in sorted(methods.REGISTRY):
            for m, meth, part, e, g in calibration_rows(model, method, batch, seq):
                err = (e - g) / g if g else math.inf
                worst = max(worst, abs(err)) if part in PARTS[:3] else worst
                print(f"{m:<11} {meth:<8} {part:<12} {e:>12,} {g:>12,} {100 * err:>+7.2f}%")
    print(f"largest error on weights, gradients and optimizer state: {100 * worst:.4f}%")
    return 0 if worst == 0 else 1


# ----------------------------------------------------------------------------- CLI


def check_all(argv: list[str]) -> int:
    """Compose every job, check its values and apply its method on meta; 0 or one line and 2."""

    def check_one(cfg: Any, job: list[str]) -> None:
        check(cfg)
        build(cfg, keep=True)

    checked = cli.check_jobs(argv, check_one, CONFIG_NAME, PROG)
    return checked if isinstance(checked, int) else 0


RECORDS: list[dict[str, Any]] = []


@hydra.main(config_path=CONF_DIR, config_name=CONFIG_NAME, version_base=None)
def hydra_entry(cfg: Any) -> None:
    rec, path = run(cfg)
    RECORDS.append(rec)
    if rec["status"] != "ok":
        print(f"{PROG}: {rec['model']} / {rec['method']} failed: {rec['error']}", file=sys.stderr)
    print(f"  record: {path}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        return calibrate(argv[1:])
    informational = any(a.startswith(("--help", "-h", "--cfg", "-c", "--info", "--hydra-help", "--shell-completion"))
                        for a in argv)
    if not informational:
        code = check_all(argv)
        if code:
            return code
    sys.argv = [sys.argv[0], *argv]
    RECORDS.clear()
    hydra_entry()
    if RECORDS:
        a = RECORDS[0]["config"]
        print(f"\nESTIMATES (AdamW, batch {a['batch_size']} x {a['seq_length']} tokens, "
              f"{a['attention']} attention; * activations and peak are estimates, see docs/ESTIMATES.md)")
        print_table(RECORDS)
    return 1 if any(r["status"] != "ok" for r in RECORDS) else 0


if __name__ == "__main__":
    sys.exit(main())
