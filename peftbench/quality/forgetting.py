"""Forgetting: what fine-tuning costs a model's general abilities, on data the task never trains.

Two figures, each taken on the model as the run starts (``*_initial``) and after training:

- ``forgetting_kl``: the mean per-token KL divergence KL(base || model), in nats, of the
  next-token distributions over a fixed set of general prompts (``GENERAL_PROMPTS``), each
  followed by the base model's own greedy response of ``measure.forgetting_tokens`` tokens.
  The base model's responses and distributions are computed once per base model, prompts and
  length, and cached (greedy decoding needs no seed). A method that starts as the base model
  (LoRA with B = 0, adapters with a zero up-projection) has exactly 0 at initialisation.
  ``forgetting_ce_delta``: the same tokens' mean cross-entropy under the model minus under the
  base model (nats per token), the cruder measure Hugging Face peft's method comparison uses.
- ``skill_accuracy``: accuracy by generation on ``measure.skill_examples`` seeded one-digit
  addition questions ("What is 7 + 5?"): the answer is the number after the first ``=`` of the
  greedy answer (``7 + 5 = 12``), else its last number; a skill with exact answers that no task
  here trains.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from peftbench.quality import generation
from peftbench.tasks import answers, chat
from peftbench.weights import cache_root, file_sha256

GENERAL_PROMPTS = (
    "Explain in two sentences why the sky looks blue.",
    "Write a short poem about the sea.",
    "Give three tips for staying focused while studying.",
    "What is the capital of France, and what is it known for?",
    "Describe how a bicycle works.",
    "Summarise the plot of a fairy tale you know.",
    "How do plants make their food?",
    "Write a polite email asking a colleague for a meeting.",
    "What are the benefits of regular exercise?",
    "Translate 'good morning' into Spanish and French.",
    "Why do we have seasons on Earth?",
    "Suggest a name for a friendly robot and explain it.",
)
SKILL_SEED = 2024


@dataclass
class Reference:
    """The base model's greedy responses to the general prompts and its next-token log-probs.

    sequences: prompt + response ids per prompt; starts: prompt lengths; logp: per prompt, a
    (response tokens, vocabulary) float32 tensor of the base model's log-probabilities at the
    positions that predict each response token."""

    sequences: list[list[int]]
    starts: list[int]
    logp: list[torch.Tensor]


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def skill_questions(n: int) -> tuple[list[str], list[str]]:
    """``n`` seeded addition questions and their answers (two numbers from 1 to 9)."""
    rng = random.Random(SKILL_SEED)
    pairs = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)]
    return [f"What is {a} + {b}? Answer with just the number." for a, b in pairs], [str(a + b) for a, b in pairs]


def skill_answer(text: str) -> str:
    """The number after the first ``=`` (``3 + 4 = 7``), else the last number of the text."""
    after = text.split("=", 1)[1] if "=" in text else text
    found = re.search(r"-?\d+", after) if "=" in text else None
    return found.group(0) if found else answers.rule("last_number")(text)


@torch.inference_mode()
def next_token_logp_batch(
    model: nn.Module, sequences: list[list[int]], starts: list[int], device: torch.device
) -> list[torch.Tensor]:
    """Per sequence, the (len(sequence) - start, vocabulary) float32 log-probabilities at the
    positions that predict ``sequence[start:]``; one forward over the right-padded sequences
    (padding only follows a sequence's last token, which predicts nothing here)."""
    ids, mask = generation.padded(sequences, 0, False, device)  # (sequences, longest)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (sequences, longest, vocabulary)
    return [
        torch.log_softmax(logits[i, start - 1 : len(seq) - 1].float(), dim=-1).cpu()
        for i, (seq, start) in enumerate(zip(sequences, starts))
    ]


def next_token_logp(model: nn.Module, sequence: list[int], start: int, device: torch.device) -> torch.Tensor:
    """(len(sequence) - start, vocabulary) log-probabilities at the positions that predict
    ``sequence[start:]``."""
    return next_token_logp_batch(model, [sequence], [start], device)[0]


def next_token_logps(
    model: nn.Module, sequences: list[list[int]], starts: list[int], device: torch.device, batch_size: int = 16
) -> list[torch.Tensor]:
    """``next_token_logp`` of every sequence, ``batch_size`` sequences per forward."""

    def run(chunk: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        return next_token_logp_batch(model, [q for q, _ in chunk], [s for _, s in chunk], device)

    return generation.by_length(list(zip(sequences, starts)), batch_size, lambda row: len(row[0]), run)


def cache_key(
    base_sha256: str,
    tokenizer: Any,
    template: str,
    tokens: int,
    quantize: Optional[str] = None,
    batch_size: int = 1,
) -> str:
    """Name of a cached reference. ``quantize``: the scheme the base's weights are stored in (the
    reference is then the quantized base's), so a quantized base never reuses a dense one's.
    ``batch_size``: sequences per forward, which ``divergence`` repeats so that a model equal to
    the base gives exactly 0 (one at a time keeps the key it had before batching existed)."""
    spec = {
        "base": base_sha256,
        "prompts": GENERAL_PROMPTS,
        "template": template,
        "tokens": tokens,
        "vocab": len(tokenizer),
        "tokenizer": type(tokenizer).__name__,
    }
    if quantize is not None:
        spec["quantize"] = quantize
    if batch_size != 1:
        spec["batch"] = batch_size
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def reference(
    model: nn.Module,
    tokenizer: Any,
    template: str,
    tokens: int,
    device: torch.device,
    base_sha256: str,
    quantize: Optional[str] = None,
    batch_size: int = 16,
) -> Reference:
    """The base model's reference (``model`` must be the base model, its weights stored as
    ``quantize`` says); cached on disk, and then read without touching ``model``. Responses and
    log-probabilities are computed ``batch_size`` prompts at a time; ``divergence`` with the same
    ``batch_size`` runs the same batches, so a model equal to the base gives exactly 0 (another
    batch size differs by float rounding only)."""
    key = cache_key(base_sha256, tokenizer, template, tokens, quantize, batch_size)
    path = cache_root() / "forgetting" / f"{key}.pt"
    cached = load_reference(path)
    if cached is not None:
        return cached
    was_training = model.training
    model.eval()
    try:
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        prompts = [chat.prompt_ids(tokenizer, messages(text), template) for text in GENERAL_PROMPTS]
        responses = generation.generate_all(model, prompts, tokens, eos, pad, device, batch_size)
        sequences = [p + (r or [eos]) for p, r in zip(prompts, responses)]
        starts = [len(p) for p in prompts]
        ref = Reference(sequences, starts, next_token_logps(model, sequences, starts, device, batch_size))
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{random.getrandbits(32):08x}")
    torch.save(ref.__dict__, tmp)
    digest_path(path).write_text(file_sha256(str(tmp)) + "\n")  # before the file it vouches for
    tmp.replace(path)
    return ref


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of the cached reference ``path`` is kept, written with it."""
    return path.with_name(path.name + ".sha256")


def load_reference(path: Path) -> Optional[Reference]:
    """The cached reference at ``path``, or None when there is none or it is damaged (its
    SHA-256 not the one written with it, or unreadable: one line on standard error; the caller
    computes it again and replaces it)."""
    if not path.is_file():
        return None
    try:
        ok = digest_path(path).read_text().strip() == file_sha256(str(path))
        ref = Reference(**torch.load(path)) if ok else None
    except Exception:  # whatever a damaged file raises while unpickling
        ref = None
    if ref is None:
        print(f"peftbench: forgetting cache entry {path} is damaged; computing it again", file=sys.stderr)
    return ref


@torch.inference_mode()
def divergence(model: nn.Module, ref: Reference, device: torch.device, batch_size: int = 16) -> dict[str, float]:
    """Mean per-token KL(base || model) and cross-entropy difference over the reference tokens
    (nats per token); the model's log-probabilities ``batch_size`` sequences per forward."""
    was_training = model.training
    model.eval()
    try:
        mine = next_token_logps(model, ref.sequences, ref.starts, device, batch_size)
    finally:
        model.train(was_training)
    kl_sum, ce_sum, count = 0.0, 0.0, 0
    for seq, start, base, ours in zip(ref.sequences, ref.starts, ref.logp, mine):
        kl_sum += float((base.exp() * (base - ours)).sum())
        target = torch.tensor(seq[start:]).unsqueeze(1)
        ce_sum += float((base.gather(1, target) - ours.gather(1, target)).sum())
        count += len(seq) - start
    return {"forgetting_kl": kl_sum / count, "forgetting_ce_delta": ce_sum / count}


def skill(
    model: nn.Module, tokenizer: Any, template: str, n: int, device: torch.device, batch_size: int = 16
) -> dict[str, float]:
    """Accuracy on ``n`` addition questions, by generation (last number of the answer),
    ``batch_size`` questions per forward."""
    questions, refs = skill_questions(n)
    prompts = [chat.prompt_ids(tokenizer, messages(q), template) for q in questions]
    metrics, _ = generation.evaluate(model, tokenizer, prompts, refs, skill_answer, 12, None, device, batch_size)
    return {"skill_accuracy": metrics["generate_accuracy"]}
