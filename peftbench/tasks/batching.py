"""Tokenizing and batching, the same for every task: a word-level tokenizer for models that
bring none, and padded batches of token ids the one training loop consumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from peftbench.errors import ConfigError
from peftbench.tasks import chat

if TYPE_CHECKING:
    from peftbench.tasks import RawTask

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def word_tokenizer(texts: list[str], vocab_size: int):
    """A word-level tokenizer fitted on ``texts`` (no download): the ``vocab_size`` - 4 most
    frequent lower-cased words and punctuation marks, plus [PAD] [UNK] [BOS] [EOS]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


@dataclass
class Split:
    """Tokenized examples: ``ids`` lists of token ids, ``labels`` class ids or None.
    ``prompt_lengths``: per example, the leading tokens that are prompt, not response (the
    loss skips them); None when every token is trained on."""

    ids: list[list[int]]
    labels: Optional[list[int]]
    prompt_lengths: Optional[list[int]] = None


def tokenize(raw: RawTask, tokenizer: Any, max_length: int, template: str = "auto") -> tuple[Split, Split]:
    """The train and eval splits as token ids, each text truncated to ``max_length`` tokens
    (packed into blocks of ``max_length`` tokens instead when ``raw.pack``: ``pack_split``;
    instruction examples as prompt plus response, rendered with ``template``: ``chat.encode``)."""
    if raw.train_prompts is not None:
        assert raw.eval_prompts is not None  # instruction tasks set both splits' prompts
        train = chat.encode(tokenizer, raw.train_prompts, raw.train_text, max_length, template, "train")
        ev = chat.encode(tokenizer, raw.eval_prompts, raw.eval_text, max_length, template, "eval")
        return Split(train[0], None, train[1]), Split(ev[0], None, ev[1])
    if raw.pack:
        packed = pack_split(raw.train_text, tokenizer, max_length, "train")
        return packed, pack_split(raw.eval_text, tokenizer, max_length, "eval")

    def enc(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    return Split(enc(raw.train_text), raw.train_labels), Split(enc(raw.eval_text), raw.eval_labels)


MIN_BLOCK = 8  # the shortest task.max_length (``config.check``'s rule)


def pack_split(texts: list[str], tokenizer: Any, max_length: int, name: str) -> Split:
    """The texts as one stream of token ids, cut into blocks of exactly ``max_length`` tokens,
    each block one example.

    Each text is tokenized whole (no truncation, no special tokens); the tokenizer's EOS id (if
    it has one) goes between consecutive texts. The incomplete last block (fewer than
    ``max_length`` tokens) is dropped. ``name``: the split, for the error when the stream is
    shorter than one block.
    """
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream: list[int] = []
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        stream += (eos if i else []) + ids
    if len(stream) < max_length:
        raise ConfigError(
            f"task.max_length={max_length}: the {name} split packs into {len(stream)} tokens, "
            + (
                f"fewer than one block; allowed: at most {len(stream)}"
                if len(stream) >= MIN_BLOCK
                else f"fewer than one block of the shortest allowed ({MIN_BLOCK}); allowed: more text in that split"
            )
        )
    return Split([stream[i : i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)], None)


def collate(split: Split, index: list[int], pad_id: int, kind: str) -> dict[str, torch.Tensor]:
    """Pad the examples at ``index`` to the longest among them (right padding).

    Causal LM: ``labels`` are the input ids with padding (and the prompt of an instruction
    example) set to -100 (the model shifts them).
    Classification: ``labels`` are the class ids.
    """
    rows = [split.ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    if kind == "causal-lm":
        labels = ids.masked_fill(mask == 0, -100)
        if split.prompt_lengths is not None:
            for j, i in enumerate(index):
                labels[j, : split.prompt_lengths[i]] = -100  # the prompt: no loss

    else:
        assert split.labels is not None  # a classification split has class ids
        labels = torch.tensor([split.labels[i] for i in index], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_batches(split: Split, batch_size: int, seed: int, pad_id: int, kind: str) -> Iterator[dict]:
    """Endless shuffled batches, the same order for every method with the same seed."""
    g = torch.Generator().manual_seed(seed)
    n = len(split.ids)
    if n < batch_size:
        raise ConfigError(f"train.batch_size={batch_size}: larger than the {n} training examples")
    while True:
        order = torch.randperm(n, generator=g).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield collate(split, order[start : start + batch_size], pad_id, kind)


def eval_order(split: Split) -> list[int]:
    """The indices of ``split``'s examples, shortest first (ties in the split's order): batches
    of similar lengths carry little padding. On the 200 sentiment examples of ``+sweep=llm``
    (SmolLM2's chat template, batches of 8) it pads to 15,032 tokens instead of 18,480 in the
    split's order, for 14,821 real ones: SmolLM2's eval loss there took 28.0 s instead of 33.9 s
    (medians of 2, interleaved; ``benchmarks/eval_order.py``, 2-vCPU AMD EPYC VM, 2026-12-07)."""
    return sorted(range(len(split.ids)), key=lambda i: len(split.ids[i]))


def eval_batches(
    split: Split, batch_size: int, pad_id: int, kind: str, order: Optional[list[int]] = None
) -> Iterator[dict]:
    """The evaluation split in batches of ``batch_size`` (the last may be smaller), taking the
    examples in ``order`` (indices; default the split's own order)."""
    index = list(range(len(split.ids))) if order is None else order
    for start in range(0, len(index), batch_size):
        yield collate(split, index[start : start + batch_size], pad_id, kind)
