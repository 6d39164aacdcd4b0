"""Instruction examples as token ids: the prompt (chat messages before the response) rendered by
the tokenizer's chat template, or by the plain template below when it has none, then the
response and an end-of-sequence token. The loss is taken on the response tokens only
(``Split.prompt_lengths``).

The plain template (used for tokenizers without a chat template, such as the word-level one)::

    ### System:
    <system prompt>

    ### User:
    <instruction>

    ### Assistant:
    <response><eos>
"""

from __future__ import annotations

from typing import Any

from peftbench.errors import ConfigError

TEMPLATES = ("auto", "chat", "plain")


def uses_chat_template(tokenizer: Any, template: str) -> bool:
    if template not in TEMPLATES:
        raise ConfigError(f"task.template={template}: allowed: {', '.join(TEMPLATES)}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ConfigError("task.template=chat: the tokenizer has no chat template; allowed: auto, plain")
    return has and template != "plain"


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """The plain template's text for ``messages``, ending where the response starts."""
    parts = [f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages]
    return "".join(parts) + "### Assistant:\n"


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], template: str) -> list[int]:
    """Token ids of the prompt, ready for the response (the assistant's turn opened)."""
    if uses_chat_template(tokenizer, template):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(plain_prompt(messages), add_special_tokens=False)["input_ids"])


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """The response's ids followed by end-of-sequence (the chat turn's end for chat models)."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def encode(
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    max_length: int,
    template: str,
    split: str,
) -> tuple[list[list[int]], list[int]]:
    """(ids, prompt lengths) of each example: the prompt and as much of the response as fits in
    ``max_length`` tokens. A prompt that leaves no room for a response token is an error."""
    ids, lengths = [], []
    for i, (messages, response) in enumerate(zip(prompts, responses)):
        p = prompt_ids(tokenizer, messages, template)
        if len(p) >= max_length:
            raise ConfigError(
                f"task.max_length={max_length}: the prompt of {split} example {i + 1} is {len(p)} tokens; "
                f"allowed: at least {len(p) + 1} (the prompt and one response token), or shorter prompts"
            )
        ids.append((p + response_ids(tokenizer, response))[:max_length])
        lengths.append(len(p))
    return ids, lengths
