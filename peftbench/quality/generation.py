"""Accuracy of a causal LM on instruction examples, measured two ways (both under
``torch.inference_mode``, ``batch_size`` examples per forward):

- by generation: greedy decoding of up to ``max_new_tokens`` tokens after the prompt, stopped at
  end-of-sequence; the answer is extracted from the text by the task's rule
  (``quality.answers``) and compared with the reference;
- by choice (for tasks with a fixed set of answers): the choices are compared token by token
  after the prompt, and the first token that tells them apart decides (``first_distinguishing``):
  a choice's length or a prefix it shares with another cannot, as they can with summed
  log-likelihoods (a token-prefix of another choice would always win). For one-token choices it
  is the summed log-likelihood, lm-evaluation-harness's ``acc``. Choices no token can tell apart
  (the same tokens, one the token-prefix of another, or an unknown token) are refused
  (``check_choices``). It needs no answer format, so it gives a meaningful zero-shot figure where
  a chat model answers in full sentences.

Batching changes no result: prompts are LEFT-padded for generation (the attention mask hides the
padding and ``generate`` derives each row's positions from the mask, so a row's real tokens sit
at the positions they have alone; prefix and prompt tuning extend that mask by their virtual
tokens, ``methods.virtual``), and prompt + choice rows are RIGHT-padded for scoring (padding
only ever follows the scored tokens). Generation's first step is the distribution of the token
after each prompt, so it also scores the choices' first tokens: one-token choices cost no
forward of their own. A row's tokens and scores therefore equal those of the
example run alone, up to float rounding of differently shaped matrix products
(``tests/test_batched_eval.py`` holds them equal). Examples are batched in order of length,
which keeps the padding short, and returned in the caller's order. ``batch_size=1`` is the
unpadded one-example-at-a-time evaluation.

Greedy decoding read from the eval-loss pass (``Draft``, ``settle``): that pass is a forward over
each prompt followed by its reference answer, so its logits at the prompt's last position are
generation's first step, and while the token greedy picks is the answer's next token, the logits
one position on are its next step (speculative decoding, with the reference answer as the draft).
A trained model mostly answers its answer and stops, so its decoding is decided there without a
forward of its own; where greedy leaves the answer, ``evaluate`` goes on decoding after the
prompt and the tokens decided so far. The tokens are those of decoding alone, up to float
rounding, as batching's are; ``plain_greedy`` keeps this to models whose generation config
changes no greedy step (a repetition penalty would).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar, cast

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.tasks.answers import accuracy

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Predictions:
    """Per-example outputs: the generated text and the chosen answer (None when not measured);
    ``settled``: how many examples' decoding their ``Draft`` decided, with no forward of its own."""

    generated: list[Optional[str]]
    chosen: list[Optional[str]]
    settled: int = 0


@dataclass
class Draft:
    """What a forward over a prompt followed by its reference answer says of greedy decoding
    after the prompt. ``answer``: the answer's token ids; ``greedy``: the most likely token
    after the prompt and ``answer[:j]``, for j = 0 .. len(answer) - 1; ``first``: the
    log-probability (nats, float32) of each kept token id (the choices' first tokens) following
    the prompt."""

    answer: list[int]
    greedy: list[int]
    first: dict[int, float]


def draft(at: torch.Tensor, answer: list[int], keep: Sequence[int]) -> Draft:
    """The ``Draft`` of one example from a forward over its prompt followed by ``answer`` (its
    token ids, at least one): ``at``, (len(answer), vocab), the logits at the prompt's last
    position and at every answer position but the last (each predicts the next token)."""
    kept = sorted(set(keep))
    first = torch.log_softmax(at[0].float(), dim=-1)[kept].tolist()  # as generate_scored's first step
    return Draft(list(answer), at.argmax(dim=-1).tolist(), dict(zip(kept, first)))


def settle(d: Draft, max_new_tokens: int, eos_id: Optional[int]) -> tuple[list[int], bool]:
    """Greedy decoding's new tokens as far as ``d`` decides them, and whether they are all of
    them (decoding stopped: end-of-sequence, or ``max_new_tokens`` tokens). ``d`` knows the step
    after each token only while greedy's token is the answer's: it stops deciding after the first
    token that differs, or at the answer's end."""
    new: list[int] = []
    if max_new_tokens < 1:
        return new, True
    for want, got in zip(d.answer, d.greedy):
        if got == eos_id:
            return new, True
        new.append(got)
        if len(new) == max_new_tokens:
            return new, True
        if got != want:
            break
    return new, False


# generation config entries that change a greedy step (their neutral values): where any is set,
# generate does more than take the most likely token, and a Draft cannot stand for it
ALTERING = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "stop_strings": None,
}


def plain_greedy(model: nn.Module) -> bool:
    """True if ``model``'s generation config leaves greedy decoding the most likely token at
    every step (no entry of ``ALTERING`` set), so that a ``Draft`` decides it."""
    gc = getattr(model, "generation_config", None)
    return gc is None or all(getattr(gc, k, None) in (neutral, None) for k, neutral in ALTERING.items())


def by_length(
    rows: Sequence[T], batch_size: int, size: Callable[[T], int], run: Callable[[list[T]], list[R]]
) -> list[R]:
    """``run`` over ``rows`` in batches of at most ``batch_size``, rows of similar ``size`` (tokens)
    together; the results in the order of ``rows``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    order = sorted(range(len(rows)), key=lambda i: size(rows[i]))  # stable: ties keep their order
    out: list[Optional[R]] = [None] * len(rows)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        for i, r in zip(chunk, run([rows[i] for i in chunk])):
            out[i] = r
    return cast(list[R], out)


def padded(rows: list[list[int]], pad_id: int, left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both (len(rows), longest row), padded with ``pad_id`` on the
    left (``left``) or on the right; the mask is 1 on real tokens, 0 on padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, at] = torch.tensor(r, dtype=torch.long)
        mask[i, at] = 1
    return ids.to(device), mask.to(device)


def until_eos(new: list[int], eos_id: Optional[int]) -> list[int]:
    """``new`` up to (without) its first end-of-sequence token."""
    return new[: new.index(eos_id)] if eos_id in new else new


@torch.inference_mode()
def generate_scored(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: Optional[int],
    pad_id: Optional[int],
    device: torch.device,
    keep: Sequence[int] = (),
) -> list[tuple[list[int], dict[int, float]]]:
    """Per prompt, the new token ids of greedy decoding (at most ``max_new_tokens``, stopped at
    end-of-sequence) and, for each token id of ``keep``, its log-probability (nats, float32) of
    following the prompt, from the first step's distribution; one left-padded batch with the KV
    cache."""
    fill = pad_id if pad_id is not None else eos_id
    ids, mask = padded(prompts, fill if fill is not None else 0, True, device)  # (batch, longest prompt)
    out = cast(Callable[..., Any], model.generate)(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=eos_id,
        pad_token_id=fill,
        return_dict_in_generate=True,
        output_logits=True,  # the raw logits of each step: the first is the prompt's next token
    )  # sequences: (batch, longest prompt + new tokens), rows that ended early padded after their EOS
    kept = sorted(set(keep))
    first = torch.log_softmax(out.logits[0].float(), dim=-1)[:, kept].tolist()  # (batch, len(kept))
    new = out.sequences[:, ids.shape[1] :].tolist()
    return [(until_eos(row, eos_id), dict(zip(kept, first[i]))) for i, row in enumerate(new)]


def generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: Optional[int],
    pad_id: Optional[int],
    device: torch.device,
) -> list[list[int]]:
    """The new token ids of greedy decoding after each prompt (at most ``max_new_tokens`` each),
    one left-padded batch with the KV cache; each row stops at its end-of-sequence."""
    return [new for new, _ in generate_scored(model, prompts, max_new_tokens, eos_id, pad_id, device)]


def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    eos_id: Optional[int],
    pad_id: Optional[int],
    device: torch.device,
) -> list[int]:
    """The new token ids of greedy decoding after ``prompt`` (at most ``max_new_tokens``)."""
    return generate_batch(model, [prompt], max_new_tokens, eos_id, pad_id, device)[0]


def generate_all(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: Optional[int],
    pad_id: Optional[int],
    device: torch.device,
    batch_size: int = 16,
) -> list[list[int]]:
    """``generate_batch`` over all prompts, ``batch_size`` at a time; per prompt, its new ids."""

    def run(chunk: list[list[int]]) -> list[list[int]]:
        return generate_batch(model, chunk, max_new_tokens, eos_id, pad_id, device)

    return by_length(prompts, batch_size, len, run)


@torch.inference_mode()
def choice_logprobs_batch(
    model: nn.Module,
    prompts: list[list[int]],
    choices: list[list[int]],
    device: torch.device,
    first: Optional[Sequence[dict[int, float]]] = None,
    per_token: bool = False,
) -> list[list[Any]]:
    """Per prompt, the summed log-probability (nats) of each choice's tokens following it (with
    ``per_token``, each token's log-probability, a list per choice).

    Choice ``c`` after prompt ``p`` is scored on the row ``p + c[:-1]``: its positions
    ``len(p)-1 .. len(p)+len(c)-2`` predict ``c[0] .. c[-1]``. Identical rows are run once (every
    one-token choice of a prompt shares the row ``p``), in one forward, right-padded (padding
    never precedes a scored token). ``first`` (per prompt, the log-probability of each choice's
    first token following it, such as ``generate_scored``'s) scores the first tokens, so that
    one-token choices need no forward at all."""
    keys: dict[tuple[int, tuple[int, ...]], int] = {}
    rows: list[list[int]] = []
    for i, p in enumerate(prompts):
        for c in choices:
            if (first is None or len(c) > 1) and (i, tuple(c[:-1])) not in keys:
                keys[(i, tuple(c[:-1]))] = len(rows)
                rows.append(p + c[:-1])
    logits = None
    if rows:
        ids, mask = padded(rows, 0, False, device)  # (rows, longest row)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (rows, longest row, vocab)
    out = []
    for i, p in enumerate(prompts):
        scores = []
        for c in choices:
            tokens: list[float] = []
            if first is not None:
                tokens.append(first[i][c[0]])
            start = len(tokens)
            if start < len(c):
                assert logits is not None
                row = logits[keys[(i, tuple(c[:-1]))], len(p) - 1 + start : len(p) - 1 + len(c)]
                logp = torch.log_softmax(row.float(), dim=-1)  # predicts c[start:]
                at = torch.arange(len(c) - start, device=logp.device)
                tokens += logp[at, torch.tensor(c[start:], device=logp.device)].tolist()
            scores.append(tokens if per_token else sum(tokens))
        out.append(scores)
    return out


def first_distinguishing(ids: list[list[int]], logps: list[list[float]]) -> int:
    """The index of the choice picked token by token: of the choices still in, those whose next
    token has the highest log-probability go on (choices that share a token share its
    log-probability: the same context), so the first token that tells choices apart decides,
    whatever their lengths; the first one on a tie. ``ids``: the choices' tokens, none a prefix
    of another (``check_choices``); ``logps``: each token's log-probability after the prompt."""
    alive, depth = list(range(len(ids))), 0
    while len(alive) > 1:
        best = max(alive, key=lambda i: logps[i][depth])  # the first of the highest
        alive = [i for i in alive if ids[i][depth] == ids[best][depth]]
        depth += 1
    return alive[0]


def check_choices(tokenizer: Any, choices: list[str]) -> None:
    """One-line ``ConfigError`` for choices no token can tell apart: one that tokenizes to
    nothing or to a token the tokenizer does not know, two with the same tokens, or one whose
    tokens begin another's (``first_distinguishing`` needs a token where each pair differs)."""
    ids = choice_ids(tokenizer, choices)
    unk = getattr(tokenizer, "unk_token_id", None)
    shown = f"task.choices={list(choices)}"
    for c, t in zip(choices, ids):
        if not t or (unk is not None and unk in t):
            raise ConfigError(
                f"{shown}: {c!r} tokenizes to {'nothing' if not t else 'an unknown token'}; "
                "allowed: choices the tokenizer knows"
            )
    for i, (a, ta) in enumerate(zip(choices, ids)):
        for b, tb in list(zip(choices, ids))[i + 1 :]:
            short, long_, s_text, l_text = (ta, tb, a, b) if len(ta) <= len(tb) else (tb, ta, b, a)
            if long_[: len(short)] == short:
                how = "tokenize alike" if len(short) == len(long_) else f"{s_text!r} is how {l_text!r} begins"
                raise ConfigError(
                    f"{shown}: {a!r} and {b!r} cannot be told apart ({how}, token by token); "
                    "allowed: choices whose tokens differ before either ends"
                )


def choice_logprobs(model: nn.Module, prompt: list[int], choices: list[list[int]], device: torch.device) -> list[float]:
    """Summed log-probability (nats) of each choice's tokens following ``prompt``; one forward
    pass over all choices, right-padded (padding never precedes a scored token)."""
    return choice_logprobs_batch(model, [prompt], choices, device)[0]


def choice_ids(tokenizer: Any, choices: list[str]) -> list[list[int]]:
    """Each choice's tokens as the response would start (no end-of-sequence)."""
    return [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]


def choose(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    choices: list[str],
    device: torch.device,
    batch_size: int,
) -> list[str]:
    """Per prompt, the choice its first distinguishing token picks (``first_distinguishing``)."""
    check_choices(tokenizer, choices)
    ids = choice_ids(tokenizer, choices)

    def run(chunk: list[list[int]]) -> list[list[Any]]:
        return choice_logprobs_batch(model, chunk, ids, device, per_token=True)

    scores = by_length(prompts, batch_size, len, run)
    return [choices[first_distinguishing(ids, s)] for s in scores]


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    references: list[str],
    extract: Callable[[str], str],
    max_new_tokens: int,
    choices: Optional[list[str]],
    device: torch.device,
    batch_size: int = 16,
    drafts: Optional[Sequence[Optional[Draft]]] = None,
) -> tuple[dict[str, float], Predictions]:
    """Accuracy by generation (and by choice when ``choices``) on the given prompts (token ids),
    ``batch_size`` prompts per forward; the model's train/eval mode is restored afterwards.

    Generation's first step is the distribution of the token after each prompt, so it scores
    every choice's first token: one-token choices (a label set such as ``negative``/``positive``)
    cost no forward pass beyond generation's, longer ones a forward over ``prompt + choice[:-1]``.
    ``drafts`` (per prompt, or None for one without): what the eval-loss pass read of each
    prompt's decoding (``Draft``, made with the choices' first tokens kept); decoding goes on
    where it left off, and not at all where it decided every token."""
    was_training = model.training
    model.eval()
    try:
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

        if choices:
            check_choices(tokenizer, choices)
        ids = choice_ids(tokenizer, choices) if choices else []
        keep = [c[0] for c in ids]
        if drafts is None or not plain_greedy(model):
            drafts = [None] * len(prompts)
        done: list[Optional[tuple[list[int], dict[int, float]]]] = [None] * len(prompts)
        heads: dict[int, list[int]] = {}  # prompt -> its tokens decided so far, where decoding goes on
        for i, d in enumerate(drafts):
            if d is None:
                heads[i] = []
                continue
            new, stopped = settle(d, max_new_tokens, eos)
            if stopped:
                done[i] = (new, d.first)
            else:
                heads[i] = new
        settled = len(prompts) - len(heads)
        for k in sorted({len(h) for h in heads.values()}):  # decoding goes on after prompt + k tokens

            def run(chunk: list[int], k: int = k) -> list[tuple[list[int], dict[int, float]]]:
                rows = [prompts[i] + heads[i] for i in chunk]
                return generate_scored(model, rows, max_new_tokens - k, eos, pad, device, keep)

            rows = [i for i, h in heads.items() if len(h) == k]
            for i, (new, first) in zip(rows, by_length(rows, batch_size, lambda i: len(prompts[i]), run)):
                d = drafts[i]
                done[i] = (heads[i] + new, first if d is None else d.first)  # k > 0: a draft's first step
        decoded = cast(list[tuple[list[int], dict[int, float]]], done)  # every prompt's, now
        generated: list[Optional[str]] = [tokenizer.decode(t, skip_special_tokens=True) for t, _ in decoded]
        metrics = {"generate_accuracy": accuracy(cast(list[str], generated), references, extract)}
        chosen: list[Optional[str]] = [None] * len(prompts)
        if choices:

            def score(chunk: list[tuple[list[int], dict[int, float]]]) -> list[list[Any]]:
                return choice_logprobs_batch(
                    model, [p for p, _ in chunk], ids, device, [f for _, f in chunk], per_token=True
                )

            scores = by_length([(p, f) for p, (_, f) in zip(prompts, decoded)], batch_size, lambda r: len(r[0]), score)
            chosen = [choices[first_distinguishing(ids, s)] for s in scores]
            metrics["choice_accuracy"] = accuracy(cast(list[str], chosen), references, extract)
    finally:
        model.train(was_training)
    return metrics, Predictions(generated, chosen, settled)
