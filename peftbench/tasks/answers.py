"""Answer extraction and normalisation: how a generated text is turned into an answer that can be
compared with a reference. Each rule first lower-cases the text and folds white space.

- ``exact``: the whole text, stripped of surrounding punctuation and white space;
- ``first_word``: the first word (letters, digits, apostrophes and hyphens);
- ``last_number``: the last number in the text (integer or decimal, optional sign; ``1,000``
  counts as 1000), written as a plain decimal without leading or trailing zeros (``3.50``,
  ``03.5`` -> ``3.5``; ``.5`` -> ``0.5``; ``-0`` -> ``0``);
- ``regex``: the first match of ``task.answer_regex`` (its first group if it has one).

The reference answer goes through the same rule, so ``Positive.`` and ``positive`` match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Optional

from peftbench.errors import ConfigError

RULES = ("exact", "first_word", "last_number", "regex")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_WORD = re.compile(r"[\w'-]+")


def _fold(text: str) -> str:
    return " ".join(str(text).lower().split())


def _exact(text: str) -> str:
    return _fold(text).strip(" .,;:!?\"'`()[]{}")


def _first_word(text: str) -> str:
    m = _WORD.search(_fold(text))
    return m.group(0).strip("'-") if m else ""


def _last_number(text: str) -> str:
    found = _NUMBER.findall(_fold(text))
    if not found:
        return ""
    value = found[-1].replace(",", "").lstrip("+")
    sign = "-" if value.startswith("-") else ""
    whole, _, frac = value.lstrip("-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    return "0" if number == "0" else sign + number


def rule(name: str, pattern: Optional[str] = None) -> Callable[[str], str]:
    """The extraction function for rule ``name``; ConfigError for an unknown rule or a bad regex."""
    if name not in RULES:
        raise ConfigError(f"task.answer_rule={name}: unknown rule; allowed: {', '.join(RULES)}")
    if name == "regex":
        if not pattern:
            raise ConfigError("task.answer_regex=null: answer_rule=regex needs a regular expression")
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise ConfigError(f"task.answer_regex={pattern}: not a valid regular expression ({e})") from None

        def by_regex(text: str) -> str:
            m = compiled.search(_fold(text))
            return "" if m is None else _fold((m.group(1) if compiled.groups else m.group(0)) or "")

        return by_regex
    return {"exact": _exact, "first_word": _first_word, "last_number": _last_number}[name]


def accuracy(predictions: list[str], references: list[str], extract: Callable[[str], str]) -> float:
    """Share of predictions whose extracted answer equals the reference's (0..1)."""
    if not references:
        return float("nan")
    hits = sum(extract(p) == extract(r) and extract(r) != "" for p, r in zip(predictions, references))
    return hits / len(references)
