"""One run, top to bottom: setup -> train -> evaluate -> measure (the record is saved by the
app layer, ``peftbench.app.run_job``, ok or failed). In a distributed run this is one rank's
share, with its ``ranks.Rank`` passed in by the launcher (``peftbench.launch``), which sits above.

``run(cfg)`` never raises for a failure inside the run: the record says ``status: failed``
with the reason, so one bad job never takes a sweep down. Configuration errors are caught
earlier, by the CLI, before any model is built. ``train.steps=0`` makes a latency-only run:
no training and no evaluation, but parameters, inference memory, FLOPs, latency and the
checkpoint size are still measured.
"""

from __future__ import annotations

import functools
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Optional, cast

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from peftbench import config as config_mod
from peftbench import measure, models, precision, quantize, ranks, tasks, timing, weights
from peftbench.config import Levers
from peftbench.errors import ConfigError
from peftbench.quality import forgetting, generation, zero_shot
from peftbench.records import writer as record
from peftbench.tasks import answers, chat
from peftbench.train import evaluate, train

ACCURACY_METRIC = Path(__file__).parent / "metrics" / "accuracy.py"


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


def measures_forgetting(cfg: DictConfig) -> bool:
    """Forgetting is measured for pretrained causal LMs (a random-init model has no general
    ability to lose)."""
    return bool(cfg.measure.forgetting) and cfg.model.name_or_path is not None and cfg.task.kind == "causal-lm"


def cache_writes(cfg: DictConfig) -> str:
    """What a run of ``cfg`` may write to the cache folder (``weights.cache_root``), as the check
    of that folder says it; empty when nothing."""
    what = []
    where = cfg.model.name_or_path
    if where is not None and weights.is_gguf(weights.local_path(where, cfg.model.install)):
        what.append("the GGUF file dequantized once")
    if measures_forgetting(cfg):
        what.append("the base model's forgetting reference")
    if cfg.measure.reuse_zero_shot:
        what.append("the zero-shot figures")
    return ", ".join(what)


def tokenizer_text(raw: tasks.RawTask) -> list[str]:
    """The text a word-level tokenizer is fitted on: the training texts, and for an instruction
    task also its prompts as the plain template renders them (else every prompt word is [UNK])."""
    return raw.train_text + [chat.plain_prompt(p) for p in raw.train_prompts or []]


def setup(cfg: DictConfig, rec: dict[str, Any], clock: Optional[timing.PhaseClock] = None) -> Setup:
    """Data, tokenizer, base model and method; fills the record's model and parameter fields."""
    s = load_base(cfg, rec, clock)
    apply_method(cfg, s, rec)
    return s


def load_base(cfg: DictConfig, rec: dict[str, Any], clock: Optional[timing.PhaseClock] = None) -> Setup:
    """Data, tokenizer and the base model (cast for pure bf16, its sha256, stored quantized if
    asked) and, where forgetting is measured, the base model's reference responses (in the
    ``forgetting`` phase of ``clock``); no method yet (``Setup.method`` None)."""
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
    base_config: Any = model.config
    rec["model_config"] = base_config.to_dict()
    if cfg.model.name_or_path is not None:
        rec["model_weights"] = weights.provenance(cfg.model.name_or_path, cfg.model.install)
    rec["base_weights_sha256"] = models.weights_sha256(model)
    if cfg.model.quantize is not None:  # the frozen base stored quantized (QLoRA), before the method
        rec["quantization"] = quantize.quantize_base(model, cfg.model.quantize)
    reference = None
    if measures_forgetting(cfg):  # the base model's own responses, before the method changes it
        key = rec["base_weights_sha256"]  # the reference depends on the numerics too
        key = key if cfg.train.precision == "fp32" else f"{key}-{cfg.train.precision}"
        with clock.phase("forgetting") if clock else nullcontext(), precision.autocast(cfg.train.precision, device):
            reference = forgetting.reference(
                model.to(device),
                tokenizer,
                cfg.task.template,
                cfg.measure.forgetting_tokens,
                device,
                key,
                cfg.model.quantize,
                cfg.measure.eval_batch,
            )
    return Setup(model, None, tokenizer, raw, base_config, set(), device, reference)


def apply_method(cfg: DictConfig, s: Setup, rec: dict[str, Any]) -> None:
    """The method applied to ``s.model`` (seeded by ``seed``), gradient checkpointing, a fresh
    task head unfrozen, everything on the run's device; the method and parameter counts in the
    record."""
    method = methods.build(cfg.method)
    torch.manual_seed(cfg.seed)  # the method's own initialisation
    model = method.apply(s.model)
    if cfg.train.gradient_checkpointing:  # after the method: its modules are inside the layers
        models.set_gradient_checkpointing(model, True)
    head = models.unfreeze_head(model)
    model.to(s.device)
    rec["method_config"] = method.describe(model)
    rec["method_config"]["head_modules"] = sorted({n.rsplit(".", 1)[0] for n in head})
    metrics = rec["metrics"]
    metrics["trainable_params"] = methods.trainable_parameters(model)
    metrics["total_params"] = methods.total_parameters(model)
    metrics["trainable_percent"] = 100.0 * metrics["trainable_params"] / metrics["total_params"]
    s.model, s.method, s.head = model, method, head


def check_run(cfg: DictConfig) -> None:
    """Check a run's config before anything runs: the values (``config.check``), the task's
    data, the batch against the training examples, then the method applied to the model's
    structure on the meta device, so that a setting the model cannot take (a LoRA target it
    lacks, an input longer than the context) fails before any real work. The meta build is the
    real build's config builder."""
    config_mod.check(cfg)
    tasks.check(cfg.task)
    n = tasks.num_train_examples(cfg.task)
    config_mod.require(
        n is None or cfg.train.steps == 0 or cfg.train.batch_size <= n,
        "train.batch_size",
        cfg.train.batch_size,
        f"larger than the {n} training examples; allowed: at most {n}",
    )
    writes = cache_writes(cfg)
    if writes:
        weights.check_cache_writable(writes)
    meta = models.build_meta(cfg.model, cfg.task.kind, models.tokens_in_use(cfg.model, cfg.task.vocab_size))
    method = methods.build(cfg.method)
    method.apply(meta)
    config_mod.check_context(cfg, method, meta.config)
    check_data(cfg, meta.config, getattr(method, "context_tokens", 0))


@functools.lru_cache(maxsize=4)
def data_lengths(task_json: str, model_json: str) -> tuple[Optional[int], list[int]]:
    """The train split's packed blocks (None unless the task packs text) and the eval prompts'
    token lengths (empty unless it has prompts), the data tokenized as a run of these task and
    model settings (JSON) does; raises the tokenizer's one-line errors, and those of choices no
    token tells apart (``generation.check_choices``). Once per process for the
    jobs of a sweep that share them."""
    task, model = OmegaConf.create(json.loads(task_json)), OmegaConf.create(json.loads(model_json))
    raw = tasks.load(cast(Any, task))
    if raw.train_prompts is None and not raw.pack:
        return None, []
    tokenizer = models.load_tokenizer(cast(Any, model)) or tasks.word_tokenizer(tokenizer_text(raw), task.vocab_size)
    train, ev = tasks.tokenize(raw, tokenizer, task.max_length, task.template)
    if task.get("choices"):
        generation.check_choices(tokenizer, list(task.choices))
    return (len(train.ids) if raw.pack else None), list(ev.prompt_lengths or [])


# the most new tokens a generation may ask for where the model states no context length
MAX_NEW_TOKENS = 4096


def check_data(cfg: DictConfig, model_config: Any, taken: int) -> None:
    """The data as the run will tokenize it, checked before anything runs (``check_run``): every
    prompt fits ``task.max_length`` with a response token (``tasks.tokenize``'s error, now exit 2
    instead of a failed record); packed text makes at least a batch of blocks; and generation,
    the longest prompt it runs on plus ``task.max_new_tokens`` (plus a method's own positions,
    ``taken``), fits the model's context (else ``MAX_NEW_TOKENS``). Tokenizes the data once:
    seconds for tens of thousands of examples; a GGUF model's tokenizer comes from its cache."""
    if cfg.task.kind != "causal-lm" or cfg.train.steps == 0:
        return
    blocks, prompts = data_lengths(
        json.dumps(config_mod.to_container(cfg.task)), json.dumps(config_mod.to_container(cfg.model))
    )
    if blocks is not None:
        config_mod.require(
            blocks >= cfg.train.batch_size,
            "train.batch_size",
            cfg.train.batch_size,
            f"the train split packs into {blocks} block(s) of task.max_length={cfg.task.max_length} "
            f"tokens; allowed: at most {blocks}, or a smaller task.max_length (at least 8) or more text",
        )
    n = len(prompts) if cfg.task.num_generate is None else min(cfg.task.num_generate, len(prompts))
    if n == 0:
        return
    longest = max(prompts[:n]) + taken
    context = methods.context_length(model_config)
    bound = MAX_NEW_TOKENS if context is None else context - longest
    where = "the stated bound" if context is None else f"the model's {context}-token context"
    config_mod.require(
        cfg.task.max_new_tokens <= bound,
        "task.max_new_tokens",
        cfg.task.max_new_tokens,
        f"the longest prompt generated from is {longest} tokens"
        + (f" ({taken} of them the method's)" if taken else "")
        + f", and with the new tokens it must fit {where}; allowed: at most {max(bound, 0)}",
    )


def execute(cfg: DictConfig, rec: dict[str, Any], rank: Optional[ranks.Rank] = None) -> None:
    """Set up, train, evaluate and measure; fills ``rec`` in place as it goes. The run's GPU is
    the current CUDA device throughout (``cuda:1``: its streams, events and kernels). ``rank``:
    this process's rank of a distributed run (its share: training on its slice, rank 0 alone
    evaluating and measuring); a distributed config without one is refused, since only the
    launcher starts ranks."""
    config_mod.check(cfg)
    if cfg.parallel.strategy != "none" and rank is None:
        raise RuntimeError(f"parallel={cfg.parallel.strategy}: its ranks are started by peftbench.launch.execute")
    clock = timing.PhaseClock("load")
    try:
        with timing.current_device(config_mod.resolve_device(cfg.device)):
            _execute(cfg, rec, rank, clock)
    finally:
        rec["phase_s"] = clock.totals()  # the app layer adds what ran outside them (``other``)


@dataclass
class Evaluation:
    """A run's evaluation pieces: the tokenized splits, the levers, whether the task is an
    instruction task (accuracy by generation and choice), and the record's metrics to fill."""

    cfg: DictConfig
    s: Setup
    lev: Levers
    train_split: tasks.Split
    eval_split: tasks.Split
    metrics: dict[str, Any]
    rec: dict[str, Any]
    clock: timing.PhaseClock

    @property
    def instruction(self) -> bool:
        return self.s.raw.eval_prompts is not None

    def zero_shot(self, on_base: bool) -> None:
        """The figures before training (``eval_loss_initial`` and the ``*_initial`` accuracy and
        forgetting figures, the predictions before training), in the ``zero_shot`` phase. On the
        base model (``on_base``: the method is the identity at initialisation, so they are the
        base model's); else with the method applied (prefix and prompt tuning change every
        output), its state at initialisation in the key. Either way they are read from the
        zero-shot cache when an entry for the same model, data and settings exists, else
        computed and stored there; the record's ``zero_shot`` says which."""
        reuse = bool(self.cfg.measure.reuse_zero_shot)
        name = zero_shot.key(self.zero_shot_spec(on_base)) if reuse else None  # digests the eval data: only when used
        cached = zero_shot.load(name) if name is not None else None
        with self.clock.phase("zero_shot"):
            if cached is not None:
                self.metrics.update(cached["metrics"])
                if self.instruction:
                    self.rec.setdefault("predictions", {})["initial"] = cached["predictions"]
            else:
                before = dict(self.metrics)
                drafts: dict[int, generation.Draft] = {}
                self.metrics["eval_loss_initial"] = self.loss(drafts=drafts)["eval_loss"]
                self.quality("_initial", drafts)
                found = {k: v for k, v in self.metrics.items() if k not in before}
                if name is not None:
                    zero_shot.save(name, found, self.rec.get("predictions", {}).get("initial", []))
        on = "the base model" if on_base else "the model with the method applied"
        self.rec["zero_shot"] = {"source": "reused" if cached is not None else "computed", "on": on, "key": name}

    def zero_shot_spec(self, on_base: bool) -> dict[str, Any]:
        """What the zero-shot figures depend on (``quality.zero_shot.key``); off the base model,
        the method too: its name, the digest of its tensors as initialised (and of any trained
        head) and of the methods' source."""
        cfg, s, split = self.cfg, self.s, self.eval_split
        method = None
        if not on_base:
            assert s.method is not None  # applied
            names = s.method.adapter_names(s.model)
            state = [
                (n, t)
                for n, t in chain(s.model.named_parameters(), s.model.named_buffers())
                if n in names or (isinstance(t, torch.nn.Parameter) and t.requires_grad)
            ]
            method = {
                "name": cfg.method.name,
                "state": models.tensors_sha256(state),
                "code": zero_shot.methods_digest(),
            }
        task = {k: cfg.task[k] for k in ("kind", "template", "max_new_tokens", "num_generate", "answer_rule")}
        return {
            "weights": self.rec["base_weights_sha256"],
            "quantize": cfg.model.quantize,
            "dtype": cfg.model.dtype,
            "data": zero_shot.digest(
                [split.ids, split.labels, split.prompt_lengths, s.raw.eval_answers, s.raw.choices]
            ),
            "tokenizer": [type(s.tokenizer).__name__, len(s.tokenizer), getattr(s.tokenizer, "chat_template", None)],
            "task": {**task, "answer_regex": cfg.task.answer_regex},
            "eval_batch": [cfg.train.batch_size, cfg.measure.eval_batch],
            "loss_batches": "shortest first, labelled logits",  # Evaluation.loss unmeasured
            "generation": "drafted by the loss pass",  # generation.Draft: decoding the loss pass decides
            "forgetting": [cfg.measure.forgetting_tokens, cfg.measure.skill_examples] if s.reference else None,
            "precision": self.lev.precision,
            "device": s.device.type,
            "method": method,
        }

    def loss(
        self,
        split: Optional[tasks.Split] = None,
        measured: bool = False,
        drafts: Optional[dict[int, generation.Draft]] = None,
    ) -> dict[str, Any]:
        """Eval loss (and classification predictions, in the split's order) of the model as it
        is now, on ``split`` (default the eval split). Unless ``measured``, its examples are
        batched shortest first (``tasks.eval_order``) and a causal LM's logits are computed
        only where they predict a labelled token (``train.evaluate``'s ``labelled_only``): the
        same figures up to float rounding, with less to compute. ``measured``: the pass whose
        peak memory is measured (``final``), in the split's order with every position's logits,
        as in every record. ``drafts`` (an instruction task): filled with the
        ``generation.Draft`` of each example generation will decode (split index -> draft),
        read from this pass's logits."""
        split = self.eval_split if split is None else split
        kind, bs, pad_id = self.cfg.task.kind, self.cfg.train.batch_size, self.s.tokenizer.pad_token_id
        order = list(range(len(split.ids))) if measured else tasks.eval_order(split)
        look = None
        if drafts is not None and self.instruction and split.prompt_lengths is not None:
            lengths, ids = split.prompt_lengths, split.ids
            n = generate_count(self.cfg, split)
            keep = [c[0] for c in generation.choice_ids(self.s.tokenizer, self.s.raw.choices or [])]

            def look(b: int, logits: torch.Tensor, positions: Optional[list[int]]) -> None:
                for r, i in enumerate(order[b * bs : (b + 1) * bs]):
                    p, end = lengths[i], len(ids[i])
                    if i < n and 0 < p < end:  # an answer to read
                        # positions p-1 .. end-2 predict the answer; every one is labelled, so
                        # among the kept (sorted) positions they stand side by side
                        start = p - 1 if positions is None else positions.index(p - 1)
                        drafts[i] = generation.draft(logits[r, start : start + end - p], ids[i][p:], keep)

        with precision.autocast(self.lev.precision, self.s.device):
            batches = tasks.eval_batches(split, bs, pad_id, kind, order)
            found = evaluate(self.s.model, batches, kind, self.s.device, look, labelled_only=not measured)
        if "predictions" in found:  # back to the split's order
            for name in ("predictions", "references"):
                put: list[Any] = [None] * len(order)
                for at, value in zip(order, found[name]):
                    put[at] = value
                found[name] = put
        return found

    def quality(self, suffix: str, drafts: Optional[dict[int, generation.Draft]] = None) -> None:
        """Accuracy and forgetting as the model is now (``_initial``: before training); ``drafts``:
        the eval-loss pass's of the model as it is now (``loss``). The record's
        ``generation_settled`` says, per phase, how many examples' decoding they decided."""
        s, cfg = self.s, self.cfg
        with precision.autocast(self.lev.precision, s.device):
            if self.instruction:
                found, predictions, settled = instruction_quality(cfg, s, self.eval_split, drafts)
                self.metrics.update({f"eval_{k}{suffix}": v for k, v in found.items()})
                phase = suffix.strip("_") or "final"
                self.rec.setdefault("predictions", {})[phase] = predictions
                self.rec.setdefault("generation_settled", {})[phase] = settled
            if s.reference is not None:
                with self.clock.phase("forgetting"):
                    found = {
                        **forgetting.divergence(s.model, s.reference, s.device, cfg.measure.eval_batch),
                        **forgetting.skill(
                            s.model,
                            s.tokenizer,
                            cfg.task.template,
                            cfg.measure.skill_examples,
                            s.device,
                            cfg.measure.eval_batch,
                        ),
                    }
                self.metrics.update({f"{k}{suffix}": v for k, v in found.items()})

    def curve_loss(self) -> float:
        """The learning curve's point: the eval loss on the first ``measure.curve_examples``
        examples of the eval split, in the ``curve`` phase (between training steps)."""
        n = self.cfg.measure.curve_examples
        split = self.eval_split
        head = tasks.Split(
            split.ids[:n],
            None if split.labels is None else split.labels[:n],
            None if split.prompt_lengths is None else split.prompt_lengths[:n],
        )
        with self.clock.phase("curve"):
            return float(self.loss(head)["eval_loss"])

    def final(self) -> None:
        """After training: eval loss under the memory tracker (untimed), perplexity or accuracy,
        quality and forgetting, the predictions file."""
        ev: dict[str, Any] = {}
        model, device, kind, metrics = self.s.model, self.s.device, self.cfg.task.kind, self.metrics
        # In the split's order: the eval phase's peak memory is that arrangement's, as in every
        # record so far. Batched shortest first, SmolLM2's eval peak on +sweep=llm's LoRA job
        # measured 1,115,281,036 bytes instead of 1,106,431,116 (the widest batch is another one).
        # The drafts are read from each batch's logits after its forward, whose peak is higher.
        drafts: dict[int, generation.Draft] = {}
        measured = lambda: ev.update(self.loss(measured=True, drafts=drafts))  # noqa: E731
        metrics.update(measure.phase_memory(model, device, "eval", measured))
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_examples"] = len(self.eval_split.ids)
        if kind == "causal-lm":
            metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 700.0))
        if kind == "classification":
            import evaluate as hf_evaluate  # heavy (3.5 s: transformers' pipelines); classification only

            acc = hf_evaluate.load(str(ACCURACY_METRIC))
            found = acc.compute(predictions=ev["predictions"], references=ev["references"])
            metrics["eval_accuracy"] = found["accuracy"]
            self.rec["predictions"] = {  # per example, for paired comparisons of methods
                "final": [
                    {"index": i, "reference": r, "predicted": p}
                    for i, (p, r) in enumerate(zip(ev["predictions"], ev["references"]))
                ]
            }
        self.quality("", drafts)
        if self.instruction or kind == "classification":
            with self.clock.phase("writing"):
                self.rec["predictions_file"] = save_predictions(self.cfg, self.rec)


def _execute(cfg: DictConfig, rec: dict[str, Any], rank: Optional[ranks.Rank], clock: timing.PhaseClock) -> None:
    """``execute`` once the run's device is current, phase by phase (``clock``: load, zero_shot,
    train, curve, eval, forgetting, latency, decode, checkpoint, writing)."""
    rec["provenance"] = record.provenance(config_mod.resolve_device(cfg.device))
    s = load_base(cfg, rec, clock)
    lev = config_mod.levers(cfg)
    rec["train_lr"] = lev.lr
    ev = None
    identity = bool(methods.build(cfg.method).identity_at_init)
    if cfg.train.steps > 0 or s.raw.eval_prompts is not None:  # an instruction task is evaluated even untrained
        train_split, eval_split = tasks.tokenize(s.raw, s.tokenizer, cfg.task.max_length, cfg.task.template)
        ev = Evaluation(cfg, s, lev, train_split, eval_split, rec["metrics"], rec, clock)
        if identity:  # the base model's figures are the method's at initialisation
            on_device(s.model, s.device, ev.zero_shot, True)
    apply_method(cfg, s, rec)
    config_mod.check_context(cfg, s.method, s.base_config)  # before training
    if ev is not None:
        if not identity:
            ev.zero_shot(on_base=False)
        if cfg.train.steps > 0:
            clock.enter("train")
            if not train_model(ev, rank):
                return  # a rank other than 0: rank 0 alone evaluates and measures inference
        clock.enter("eval")
        ev.final()
    measure_inference(cfg, s, lev, rec, clock)


def on_device(model: torch.nn.Module, device: torch.device, fn: Any, *args: Any) -> None:
    """``fn(*args)`` with ``model`` on ``device``, then back where it was: the base model moves
    to the run's device with the method applied, so that a method's parameters are made on the
    device they always were (its initialisation draws the same random numbers)."""
    where = next(model.parameters()).device
    model.to(device)
    try:
        fn(*args)
    finally:
        model.to(where)


def train_model(ev: Evaluation, rank: Optional[ranks.Rank]) -> bool:
    """Train (distributed: every rank, on its slice of each global batch) and put the loop's
    figures in the record; distributed, gather the ranks' figures (``distributed_end``). Returns
    whether this process goes on to evaluate and measure (a plain run, or rank 0)."""
    cfg, s, lev, rec = ev.cfg, ev.s, ev.lev, ev.rec
    batches = tasks.train_batches(
        ev.train_split, cfg.train.batch_size, cfg.seed, s.tokenizer.pad_token_id, cfg.task.kind
    )
    trained = rank.wrap(s.model, s.device) if rank is not None else s.model
    groups = methods.param_groups(s.method, s.model, lev.lr)  # after wrap: FSDP replaces parameters
    switch = None
    if cfg.train.gradient_checkpointing:
        switch = functools.partial(models.set_gradient_checkpointing, s.model)
    every = cfg.measure.curve_every if rank is None else 0  # a distributed run is refused one (config.check)
    result = train(
        trained, batches, cfg.train.steps, lev, cfg.train.timing_warmup, cfg.measure.memory_steps, s.device,
        groups, switch, rank, ev.curve_loss if every else None, every,
    )  # fmt: skip
    ev.metrics.update(result["metrics"])
    rec["train_losses"] = result["train_losses"]
    rec["train_step_ms"] = result["train_step_ms"]
    if result["curve"]:
        rec["learning_curve"] = learning_curve(ev, result["curve"])
    if rank is None:
        return True
    s.model = distributed_end(cfg, s, rank, trained, result, rec)
    return rank.rank == 0


def learning_curve(ev: Evaluation, points: list[dict[str, Any]]) -> dict[str, Any]:
    """The record's ``learning_curve``: where it was evaluated and, per point, the step, the
    padded tokens trained so far, the training FLOPs so far (``train_flops_per_token`` x those
    tokens; None without a FLOP step) and the training seconds so far (median step time x
    steps, the basis of the report's training time), and the eval loss."""
    m = ev.metrics
    per_token, median_ms = m.get("train_flops_per_token"), m.get("train_step_ms_median")
    return {
        "split": ev.cfg.task.eval_split,
        "examples": min(ev.cfg.measure.curve_examples, len(ev.eval_split.ids)),
        "every": ev.cfg.measure.curve_every,
        "points": [
            {
                **p,
                "train_flops": None if per_token is None else per_token * p["padded_tokens"],
                "train_s": None if median_ms is None else median_ms * p["step"] / 1000,
            }
            for p in points
        ],
    }


def measure_inference(cfg: DictConfig, s: Setup, lev: Levers, rec: dict[str, Any], clock: timing.PhaseClock) -> None:
    """Inference memory, FLOPs, latency grid and decode (merged where the method merges), the
    checkpoint's size and MFU, into the record (phases latency, decode, checkpoint). The
    ``quality`` profile (``measure.profile``) measures none of them: their figures are absent."""
    if cfg.measure.profile == "quality":
        clock.enter("other")
        return
    metrics, device = rec["metrics"], s.device
    clock.enter("latency")
    with precision.autocast(lev.precision, device):
        inf, grid = measure.inference(
            s.model, s.method, len(s.tokenizer), s.tokenizer.pad_token_id, cfg.task.kind, device, cfg.measure, clock
        )
    metrics.update(inf)
    rec["latency_grid"] = grid
    if "quantization" in rec:  # a merging method's deployed form is the dequantize-merged model
        merged = "inference_latency_unmerged_ms" in inf
        rec["quantization"]["inference_weights"] = "dequantize-merged (dense)" if merged else "quantized"
    clock.enter("checkpoint")
    metrics.update(measure.checkpoint_size(s.model, s.method.adapter_names(s.model) | s.head))
    compute = precision.compute_dtype(lev.precision, models.torch_dtype(cfg.model.dtype))
    metrics.update(measure.mfu(metrics, device, compute))
    clock.enter("other")


def distributed_end(
    cfg: DictConfig,
    s: Setup,
    rank: ranks.Rank,
    trained: torch.nn.Module,
    result: dict[str, Any],
    rec: dict[str, Any],
) -> torch.nn.Module:
    """After distributed training (every rank calls it): gather the ranks' figures into rank 0's
    record (``ranks.combine``), with the communication's closed form beside its measurement,
    and return the plain trained model rank 0 goes on with (DDP: the replica; FSDP: a fresh
    build with the gathered full weights loaded)."""
    metrics = rec["metrics"]
    mine = {k: v for k, v in metrics.items() if k.startswith(("peak_memory", "memory_"))}
    comm = rank.comm.steps[-1] if rank.comm.steps else {}
    local = {"rank": rank.rank, **mine, "step_ms": result["train_step_ms"], "comm": comm, "comm_ms": rank.comm.timed_ms}
    gathered = ranks.gather(local)
    if rank.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # FSDP only: heavy

        full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank.rank != 0:
        return s.model
    metrics.update(ranks.combine(gathered, result["steps"]))
    plain = cast(torch.nn.Module, trained.module) if rank.strategy == "ddp" else None
    if plain is None:
        scratch: dict[str, Any] = {"metrics": {}}
        torch.manual_seed(cfg.seed)
        plain = setup(cfg, scratch).model
        plain.load_state_dict(full, strict=True)
    closed = ranks.comm_closed_form(plain, rank.strategy, rank.world, cfg.train.grad_accum)
    metrics.update({f"comm_{k}_per_step_closed_form": v for k, v in closed.items()})
    metrics["comm_ring_bytes_sent_per_rank_per_step"] = ranks.ring_bytes_sent(closed, rank.world)
    metrics["world_size"] = rank.world
    rec["parallel"] = {
        "strategy": rank.strategy,
        "world_size": rank.world,
        "backend": torch.distributed.get_backend(),
        "sharding": (
            "replicated (DDP): every rank holds the whole model, gradients all-reduced"
            if rank.strategy == "ddp"
            else "FSDP2 fully_shard: each transformer layer, then the root, parameters sharded on dim 0"
        ),
        "ranks": gathered,
    }
    return plain


def generate_count(cfg: DictConfig, split: tasks.Split) -> int:
    """How many eval examples are generated: the first ``task.num_generate`` (all if None)."""
    return len(split.ids) if cfg.task.num_generate is None else min(cfg.task.num_generate, len(split.ids))


def instruction_quality(
    cfg: DictConfig, s: Setup, eval_split: tasks.Split, drafts: Optional[dict[int, generation.Draft]] = None
) -> tuple[dict[str, float], list[dict], int]:
    """Accuracy by generation (and by choice) on the first ``task.num_generate`` eval examples,
    the per-example predictions, and how many examples' decoding ``drafts`` (split index ->
    the eval-loss pass's ``generation.Draft``) decided."""
    n = generate_count(cfg, eval_split)
    if n == 0:
        return {}, [], 0
    assert s.raw.eval_answers is not None and eval_split.prompt_lengths is not None  # an instruction task
    prompts = [eval_split.ids[i][: eval_split.prompt_lengths[i]] for i in range(n)]
    refs = s.raw.eval_answers[:n]
    extract = answers.rule(cfg.task.answer_rule, cfg.task.answer_regex)
    found, pred = generation.evaluate(
        s.model,
        s.tokenizer,
        prompts,
        refs,
        extract,
        cfg.task.max_new_tokens,
        s.raw.choices,
        s.device,
        cfg.measure.eval_batch,
        None if drafts is None else [drafts.get(i) for i in range(n)],
    )
    rows = [
        {
            "index": i,
            "reference": refs[i],
            "generated": pred.generated[i],
            "answer": extract(cast(str, pred.generated[i])),  # every example was generated
            "chosen": pred.chosen[i],
        }
        for i in range(n)
    ]
    return {**found, "generate_examples": n}, rows, pred.settled


def save_predictions(cfg: DictConfig, rec: dict[str, Any]) -> str:
    """Write the per-example predictions beside the record (``<run_id>.predictions.jsonl``, one
    line per eval example: before and after training); returns the file name."""
    found = rec.pop("predictions", {})
    after = found.get("final", [])
    before = found.get("initial") or [None] * len(after)  # none before training for classification
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{rec['run_id']}.predictions.jsonl"
    tmp = out / f".tmp-{name}"
    with open(tmp, "w") as f:
        for b, a in zip(before, after):
            f.write(json.dumps({"index": a["index"], "reference": a["reference"], "initial": b, "final": a}) + "\n")
    tmp.replace(out / name)
    return name


def new_record(cfg: DictConfig) -> dict[str, Any]:
    return record.new_record(cfg, kind="measured", task=cfg.task.name, model=config_mod.model_label(cfg.model))
