"""One run, top to bottom: setup -> train -> measure -> save.

``run(cfg)`` never raises for a failure inside the run: the record says ``status: failed``
with the reason, so one bad job never takes a sweep down. Configuration errors are caught
earlier, by the CLI, before any model is built.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import torch

import methods
from methods import ConfigError
from peftbench import config as config_mod
from peftbench import models, record, tasks
from peftbench.timing import repeat, stats
from peftbench.train import evaluate, train

ACCURACY_METRIC = Path(__file__).parent / "metrics" / "accuracy.py"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; allowed here: auto, cpu")
    return torch.device(name)


def latency_inputs(vocab_size: int, batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Seeded random token ids of shape (batch, length), no padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab_size, (batch, length), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def forward_latency(model: torch.nn.Module, inputs: dict, device: torch.device, measure: Any) -> dict[str, float]:
    """Median and IQR (ms) of one no-grad forward pass (prefill) over ``inputs``."""
    model.eval()
    with torch.no_grad():
        ms = repeat(lambda: model(**inputs), device, measure.latency_warmup, measure.latency_repeats)
    return stats(ms)


def execute(cfg: Any, rec: dict[str, Any]) -> None:
    """Set up, train and measure; fills ``rec`` in place as it goes."""
    config_mod.check(cfg)
    device = resolve_device(cfg.device)
    rec["provenance"] = record.provenance(device)
    kind = cfg.task.kind
    metrics: dict[str, Any] = rec["metrics"]

    # ---- setup: data, tokenizer, base model, method
    raw = tasks.load(cfg.task)
    if kind == "classification" and raw.num_labels < 2:
        raise ConfigError(f"task.label_column={cfg.task.label_column}: needs at least 2 classes, found {raw.num_labels}")
    tokenizer = models.load_tokenizer(cfg.model) or tasks.word_tokenizer(raw.train_text, cfg.task.vocab_size)
    model = models.build(cfg.model, kind, len(tokenizer), tokenizer.pad_token_id, raw.num_labels)
    rec["model_config"] = model.config.to_dict()
    rec["base_weights_sha256"] = models.weights_sha256(model)
    method = methods.build(cfg.method)
    torch.manual_seed(cfg.seed)  # the method's own initialisation
    model = method.apply(model)
    head = models.head_names(model)
    for name, p in model.named_parameters():
        if name in head:
            p.requires_grad_(True)
    model.to(device)
    rec["method_config"] = method.describe(model)
    rec["method_config"]["head_modules"] = sorted({n.rsplit(".", 1)[0] for n in head})
    metrics["trainable_params"] = methods.trainable_parameters(model)
    metrics["total_params"] = methods.total_parameters(model)
    metrics["trainable_percent"] = 100.0 * metrics["trainable_params"] / metrics["total_params"]

    train_split, eval_split = tasks.tokenize(raw, tokenizer, cfg.task.max_length)
    pad_id = tokenizer.pad_token_id
    bs = cfg.train.batch_size

    def run_eval() -> dict[str, Any]:
        return evaluate(model, tasks.eval_batches(eval_split, bs, pad_id, kind), kind, device)

    # ---- train
    lr = cfg.train.lr if cfg.train.lr is not None else cfg.method.lr
    rec["train_lr"] = lr
    if cfg.train.steps > 0:
        metrics["eval_loss_initial"] = run_eval()["eval_loss"]
        batches = tasks.train_batches(train_split, bs, cfg.seed, pad_id, kind)
        result = train(model, batches, cfg.train.steps, lr, cfg.train, cfg.measure.memory_steps, device)
        metrics.update(result["metrics"])
        metrics.update(result["memory"])
        if device.type == "cuda":
            metrics["peak_memory_tracked_bytes"] = metrics.pop("peak_memory_bytes")
        rec["train_losses"] = result["train_losses"]
        rec["train_step_ms"] = result["train_step_ms"]

    # ---- evaluate
    ev = run_eval()
    metrics["eval_loss"] = ev["eval_loss"]
    if kind == "classification":
        import evaluate as hf_evaluate

        acc = hf_evaluate.load(str(ACCURACY_METRIC))
        metrics["eval_accuracy"] = acc.compute(predictions=ev["predictions"], references=ev["references"])["accuracy"]

    # ---- inference latency (merged where the method can merge)
    m = cfg.measure
    inputs = latency_inputs(len(tokenizer), m.latency_batch, m.latency_length, device)
    metrics["inference_batch"], metrics["inference_length"] = m.latency_batch, m.latency_length
    unmerged = forward_latency(model, inputs, device, m)
    if method.merge(model):
        merged = forward_latency(model, inputs, device, m)
        method.unmerge(model)
        metrics["inference_latency_ms"], metrics["inference_latency_iqr_ms"] = merged["median"], merged["iqr"]
        metrics["inference_latency_unmerged_ms"] = unmerged["median"]
        metrics["inference_latency_unmerged_iqr_ms"] = unmerged["iqr"]
    else:
        metrics["inference_latency_ms"], metrics["inference_latency_iqr_ms"] = unmerged["median"], unmerged["iqr"]


def new_record(cfg: Any) -> dict[str, Any]:
    resolved = config_mod.to_container(cfg)
    chash = record.config_hash(resolved)
    return {
        "schema_version": record.SCHEMA_VERSION,
        "run_id": record.run_id(cfg.method.name, cfg.model.name, cfg.task.name, chash),
        "kind": "measured",
        "status": "running",
        "error": None,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "config_hash": chash,
        "config": resolved,
        "model_config": None,
        "method_config": None,
        "provenance": None,
        "metrics": {},
    }


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if not isinstance(e, ConfigError) else text


def run(cfg: Any) -> tuple[dict[str, Any], Path]:
    """Execute one run and write its record, ok or failed; returns the record and its path."""
    rec = new_record(cfg)
    t0 = time.perf_counter()
    try:
        execute(cfg, rec)
        rec["status"] = "ok"
    except Exception as e:  # recorded, not raised: a sweep goes on
        rec["status"] = "failed"
        rec["error"] = one_line(e)
        if not isinstance(e, ConfigError):
            rec["traceback"] = traceback.format_exc()
        if rec["provenance"] is None:
            rec["provenance"] = record.provenance(torch.device("cpu"))
    rec["wall_s"] = time.perf_counter() - t0
    path = record.write(rec, cfg.results_dir)
    return rec, path
