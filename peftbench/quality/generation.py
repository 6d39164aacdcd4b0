"""Accuracy of a causal LM on instruction examples, measured two ways (both no-grad, one example
at a time, so that every method, prefix tuning included, sees unpadded inputs):

- by generation: greedy decoding of up to ``max_new_tokens`` tokens after the prompt, stopped at
  end-of-sequence; the answer is extracted from the text by the task's rule
  (``quality.answers``) and compared with the reference;
- by choice (for tasks with a fixed set of answers): the summed log-likelihood of each choice's
  tokens after the prompt, the highest one is the prediction (the lm-evaluation-harness
  convention for multiple choice; it needs no answer format, so it gives a meaningful zero-shot
  figure where a chat model answers in full sentences).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import nn

from peftbench.tasks.answers import accuracy


@dataclass
class Predictions:
    """Per-example outputs: the generated text and the chosen answer (None when not measured)."""

    generated: list[Optional[str]]
    chosen: list[Optional[str]]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    eos_id: Optional[int],
    pad_id: Optional[int],
    device: torch.device,
) -> list[int]:
    """The new token ids of greedy decoding after ``prompt`` (at most ``max_new_tokens``)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out = cast(Callable[..., torch.Tensor], model.generate)(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id if pad_id is not None else eos_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(eos_id)] if eos_id in new else new


@torch.no_grad()
def choice_logprobs(model: nn.Module, prompt: list[int], choices: list[list[int]], device: torch.device) -> list[float]:
    """Summed log-probability (nats) of each choice's tokens following ``prompt``; one forward
    pass over all choices, right-padded (padding never precedes a scored token)."""
    rows = [prompt + c for c in choices]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, device=device)
        mask[i, : len(r)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    out = []
    for i, c in enumerate(choices):
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=device)  # predict c[j]
        out.append(float(logp[i, positions, torch.tensor(c, device=device)].sum()))
    return out


def choice_ids(tokenizer: Any, choices: list[str]) -> list[list[int]]:
    """Each choice's tokens as the response would start (no end-of-sequence)."""
    return [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    references: list[str],
    extract: Callable[[str], str],
    max_new_tokens: int,
    choices: Optional[list[str]],
    device: torch.device,
) -> tuple[dict[str, float], Predictions]:
    """Accuracy by generation (and by choice when ``choices``) on the given prompts (token ids)."""
    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generated = [
        tokenizer.decode(generate(model, p, max_new_tokens, eos, pad, device), skip_special_tokens=True)
        for p in prompts
    ]
    metrics = {"generate_accuracy": accuracy(generated, references, extract)}
    chosen: list[Optional[str]] = [None] * len(prompts)
    if choices:
        ids = choice_ids(tokenizer, choices)
        chosen = []
        for p in prompts:
            scores = choice_logprobs(model, p, ids, device)
            chosen.append(choices[max(range(len(choices)), key=scores.__getitem__)])
        metrics["choice_accuracy"] = accuracy(cast(list[str], chosen), references, extract)  # every entry set above
    model.train(was_training)
    return metrics, Predictions(generated, chosen)
