"""One run, top to bottom: setup -> train -> evaluate -> measure (the record is saved by the
app layer, ``peftbench.app.run_job``, ok or failed).

``run(cfg)`` never raises for a failure inside the run: the record says ``status: failed``
with the reason, so one bad job never takes a sweep down. Configuration errors are caught
earlier, by the CLI, before any model is built. ``train.steps=0`` makes a latency-only run:
no training and no evaluation, but parameters, inference memory, FLOPs, latency and the
checkpoint size are still measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

import methods
from methods import ConfigError
from peftbench import config as config_mod
from peftbench import measure, models, parallel, precision, tasks, timing, weights
from peftbench.quality import answers, forgetting, generation
from peftbench.records import writer as record
from peftbench.train import evaluate, train

ACCURACY_METRIC = Path(__file__).parent / "metrics" / "accuracy.py"
# the record keys ``new_record`` sets from the job's config: rank 0's record (its config names the
# rank's own device) gives everything else
IDENTITY = ("schema_version", "run_id", "kind", "status", "error", "method", "model", "task", "config_hash", "config")


@dataclass
class Setup:
    """A run's pieces, ready to train or measure: the method applied, heads unfrozen, on device."""

    model: torch.nn.Module
    method: Any
    tokenizer: Any
    raw: tasks.RawTask
    base_config: Any
    head: set[str]
    device: torch.device
    reference: Optional[forgetting.Reference] = None


def measures_forgetting(cfg: Any) -> bool:
    """Forgetting is measured for pretrained causal LMs (a random-init model has no general
    ability to lose)."""
    return bool(cfg.measure.forgetting) and cfg.model.name_or_path is not None and cfg.task.kind == "causal-lm"


def tokenizer_text(raw: tasks.RawTask) -> list[str]:
    """The text a word-level tokenizer is fitted on: the training texts, and for an instruction
    task also its prompts as the plain template renders them (else every prompt word is [UNK])."""
    from peftbench.tasks import chat

    return raw.train_text + [chat.plain_prompt(p) for p in raw.train_prompts or []]


def setup(cfg: Any, rec: dict[str, Any]) -> Setup:
    """Data, tokenizer, base model and method; fills the record's model and parameter fields."""
    device = config_mod.resolve_device(cfg.device)
    kind = cfg.task.kind
    raw = tasks.load(cfg.task)
    if kind == "classification" and raw.num_labels < 2:
        raise ConfigError(
            f"task.label_column={cfg.task.label_column}: needs at least 2 classes, found {raw.num_labels}"
        )
    tokenizer = models.load_tokenizer(cfg.model) or tasks.word_tokenizer(tokenizer_text(raw), cfg.task.vocab_size)
    model = models.build(cfg.model, kind, len(tokenizer), tokenizer.pad_token_id, raw.num_labels)
    if precision.weight_dtype(cfg.train.precision) is not None:  # pure bf16: before the method exists
        model.to(precision.weight_dtype(cfg.train.precision))
    base_config = model.config
    rec["model_config"] = base_config.to_dict()
    if cfg.model.name_or_path is not None:
        rec["model_weights"] = weights.provenance(cfg.model.name_or_path, cfg.model.install)
    rec["base_weights_sha256"] = models.weights_sha256(model)
    if cfg.model.quantize is not None:  # the frozen base stored quantized (QLoRA), before the method
        from peftbench import quantize

        rec["quantization"] = quantize.quantize_base(model, cfg.model.quantize)
    reference = None
    if measures_forgetting(cfg):  # the base model's own responses, before the method changes it
        key = rec["base_weights_sha256"]  # the reference depends on the numerics too
        key = key if cfg.train.precision == "fp32" else f"{key}-{cfg.train.precision}"
        with precision.autocast(cfg.train.precision, device):
            reference = forgetting.reference(
                model.to(device),
                tokenizer,
                cfg.task.template,
                cfg.measure.forgetting_tokens,
                device,
                key,
                cfg.model.quantize,
            )
    method = methods.build(cfg.method)
    torch.manual_seed(cfg.seed)  # the method's own initialisation
    model = method.apply(model)
    if cfg.train.gradient_checkpointing:  # after the method: its modules are inside the layers
        models.set_gradient_checkpointing(model, True)
    head = models.head_names(model)
    for name, p in model.named_parameters():
        if name in head:
            p.requires_grad_(True)
    model.to(device)
    rec["method_config"] = method.describe(model)
    rec["method_config"]["head_modules"] = sorted({n.rsplit(".", 1)[0] for n in head})
    metrics = rec["metrics"]
    metrics["trainable_params"] = methods.trainable_parameters(model)
    metrics["total_params"] = methods.total_parameters(model)
    metrics["trainable_percent"] = 100.0 * metrics["trainable_params"] / metrics["total_params"]
    return Setup(model, method, tokenizer, raw, base_config, head, device, reference)


def execute(cfg: Any, rec: dict[str, Any]) -> None:
    """Set up, train, evaluate and measure; fills ``rec`` in place as it goes. The run's GPU is
    the current CUDA device throughout (``cuda:1``: its streams, events and kernels). With
    ``parallel`` other than none, this process starts the ranks and takes rank 0's record
    (``peftbench.parallel.launch``); in a rank, it is that rank's share of the run."""
    config_mod.check(cfg)
    if cfg.parallel.strategy != "none" and parallel.active() is None:
        found = parallel.launch(cfg)  # the job's identity (run id, config, hash) stays this process's
        rec.update({k: v for k, v in found.items() if k not in IDENTITY})
        return
    with timing.current_device(config_mod.resolve_device(cfg.device)):
        _execute(cfg, rec)


def _execute(cfg: Any, rec: dict[str, Any]) -> None:
    """``execute`` once the run's device is current."""
    rec["provenance"] = record.provenance(config_mod.resolve_device(cfg.device))
    s = setup(cfg, rec)
    model, device, kind = s.model, s.device, cfg.task.kind
    config_mod.check_context(cfg, s.method, s.base_config)  # before training
    metrics: dict[str, Any] = rec["metrics"]
    lr = cfg.train.lr if cfg.train.lr is not None else cfg.method.lr
    rec["train_lr"] = lr

    instruction = s.raw.eval_prompts is not None
    if cfg.train.steps > 0 or instruction:  # an instruction task is evaluated even untrained
        train_split, eval_split = tasks.tokenize(s.raw, s.tokenizer, cfg.task.max_length, cfg.task.template)
        pad_id, bs = s.tokenizer.pad_token_id, cfg.train.batch_size

        def run_eval() -> dict[str, Any]:
            with precision.autocast(cfg.train.precision, device):
                return evaluate(model, tasks.eval_batches(eval_split, bs, pad_id, kind), kind, device)

        def quality(suffix: str) -> None:
            """Accuracy and forgetting as the model is now (``_initial``: before training)."""
            with precision.autocast(cfg.train.precision, device):
                quality_now(suffix)

        def quality_now(suffix: str) -> None:
            if instruction:
                found, predictions = instruction_quality(cfg, s, eval_split)
                metrics.update({f"eval_{k}{suffix}": v for k, v in found.items()})
                rec.setdefault("predictions", {})[suffix.strip("_") or "final"] = predictions
            if s.reference is not None:
                found = {
                    **forgetting.divergence(model, s.reference, device),
                    **forgetting.skill(model, s.tokenizer, cfg.task.template, cfg.measure.skill_examples, device),
                }
                metrics.update({f"{k}{suffix}": v for k, v in found.items()})

        # ---- before training: loss, accuracy (zero-shot for an instruction task), forgetting
        metrics["eval_loss_initial"] = run_eval()["eval_loss"]
        quality("_initial")

        # ---- train (distributed: every rank, on its slice of each global batch)
        if cfg.train.steps > 0:
            batches = tasks.train_batches(train_split, bs, cfg.seed, pad_id, kind)
            ctx = parallel.active()
            trained = parallel.wrap(model, ctx, device) if ctx is not None else model
            groups = methods.param_groups(s.method, model, lr)  # after wrap: FSDP replaces parameters
            switch = (
                (lambda on: models.set_gradient_checkpointing(model, on)) if cfg.train.gradient_checkpointing else None
            )
            result = train(
                trained, batches, cfg.train.steps, lr, cfg.train, cfg.measure.memory_steps, device, groups, switch
            )
            metrics.update(result["metrics"])
            rec["train_losses"] = result["train_losses"]
            rec["train_step_ms"] = result["train_step_ms"]
            if ctx is not None:
                model = s.model = distributed_end(cfg, s, ctx, trained, result, rec)
                if ctx.rank != 0:
                    return  # rank 0 alone evaluates and measures inference

        # ---- evaluate, under the memory tracker (untimed)
        ev: dict[str, Any] = {}
        metrics.update(measure.phase_memory(model, device, "eval", lambda: ev.update(run_eval())))
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_examples"] = len(eval_split.ids)
        if kind == "causal-lm":
            metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 700.0))
        if kind == "classification":
            import evaluate as hf_evaluate

            acc = hf_evaluate.load(str(ACCURACY_METRIC))
            metrics["eval_accuracy"] = acc.compute(predictions=ev["predictions"], references=ev["references"])[
                "accuracy"
            ]
        quality("")
        if instruction:
            rec["predictions_file"] = save_predictions(cfg, rec)

    # ---- inference: memory, FLOPs, latency grid, decode (merged where the method merges)
    with precision.autocast(cfg.train.precision, device):
        inf, grid = measure.inference(
            model, s.method, len(s.tokenizer), s.tokenizer.pad_token_id, kind, device, cfg.measure
        )
    metrics.update(inf)
    rec["latency_grid"] = grid
    if "quantization" in rec:  # a merging method's deployed form is the dequantize-merged model
        merged = "inference_latency_unmerged_ms" in inf
        rec["quantization"]["inference_weights"] = "dequantize-merged (dense)" if merged else "quantized"
    metrics.update(measure.checkpoint_size(model, s.method.adapter_names(model) | s.head))
    compute = precision.compute_dtype(cfg.train.precision, models.torch_dtype(cfg.model.dtype))
    metrics.update(measure.mfu(metrics, device, compute))


def distributed_end(
    cfg: Any, s: Setup, ctx: parallel.Context, trained: torch.nn.Module, result: dict[str, Any], rec: dict[str, Any]
) -> torch.nn.Module:
    """After distributed training (every rank calls it): gather the ranks' figures into rank 0's
    record (``parallel.combine``), with the communication's closed form beside its measurement,
    and return the plain trained model rank 0 goes on with (DDP: the replica; FSDP: a fresh
    build with the gathered full weights loaded)."""
    metrics = rec["metrics"]
    mine = {k: v for k, v in metrics.items() if k.startswith(("peak_memory", "memory_"))}
    comm = ctx.comm.steps[-1] if ctx.comm.steps else {}
    local = {"rank": ctx.rank, **mine, "step_ms": result["train_step_ms"], "comm": comm, "comm_ms": ctx.comm.timed_ms}
    ranks = parallel.gather(local)
    if ctx.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.rank != 0:
        return s.model
    metrics.update(parallel.combine(ranks, result["step_tokens"], result["step_samples"]))
    plain = trained.module if ctx.strategy == "ddp" else None
    if plain is None:
        scratch: dict[str, Any] = {"metrics": {}}
        torch.manual_seed(cfg.seed)
        plain = setup(cfg, scratch).model
        plain.load_state_dict(full, strict=True)
    closed = parallel.comm_closed_form(plain, ctx.strategy, ctx.world, cfg.train.grad_accum)
    metrics.update({f"comm_{k}_per_step_closed_form": v for k, v in closed.items()})
    metrics["comm_ring_bytes_sent_per_rank_per_step"] = parallel.ring_bytes_sent(closed, ctx.world)
    metrics["world_size"] = ctx.world
    rec["parallel"] = {
        "strategy": ctx.strategy,
        "world_size": ctx.world,
        "backend": torch.distributed.get_backend(),
        "sharding": (
            "replicated (DDP): every rank holds the whole model, gradients all-reduced"
            if ctx.strategy == "ddp"
            else "FSDP2 fully_shard: each transformer layer, then the root, parameters sharded on dim 0"
        ),
        "ranks": ranks,
    }
    return plain


def instruction_quality(cfg: Any, s: Setup, eval_split: tasks.Split) -> tuple[dict[str, float], list[dict]]:
    """Accuracy by generation (and by choice) on the first ``task.num_generate`` eval examples,
    and the per-example predictions."""
    n = len(eval_split.ids) if cfg.task.num_generate is None else min(cfg.task.num_generate, len(eval_split.ids))
    if n == 0:
        return {}, []
    prompts = [eval_split.ids[i][: eval_split.prompt_lengths[i]] for i in range(n)]
    refs = s.raw.eval_answers[:n]
    extract = answers.rule(cfg.task.answer_rule, cfg.task.answer_regex)
    found, pred = generation.evaluate(
        s.model, s.tokenizer, prompts, refs, extract, cfg.task.max_new_tokens, s.raw.choices, s.device
    )
    rows = [
        {
            "index": i,
            "reference": refs[i],
            "generated": pred.generated[i],
            "answer": extract(pred.generated[i]),
            "chosen": pred.chosen[i],
        }
        for i in range(n)
    ]
    return {**found, "generate_examples": n}, rows


def save_predictions(cfg: Any, rec: dict[str, Any]) -> str:
    """Write the per-example predictions beside the record (``<run_id>.predictions.jsonl``, one
    line per eval example: before and after training); returns the file name."""
    found = rec.pop("predictions", {})
    before, after = found.get("initial", []), found.get("final", [])
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{rec['run_id']}.predictions.jsonl"
    tmp = out / f".tmp-{name}"
    with open(tmp, "w") as f:
        for b, a in zip(before, after):
            f.write(json.dumps({"index": a["index"], "reference": a["reference"], "initial": b, "final": a}) + "\n")
    tmp.replace(out / name)
    return name


def new_record(cfg: Any) -> dict[str, Any]:
    return record.new_record(cfg, kind="measured", task=cfg.task.name)


def run(cfg: Any, extra_provenance: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path]:
    """Execute one run and write its record, ok or failed; returns the record and its path."""
    from peftbench import app
    from peftbench.cli import APP

    return app.run_job(APP, cfg, extra_provenance)
