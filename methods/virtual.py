"""The wrapper that methods with virtual tokens share (prefix tuning, prompt tuning).

Such a method puts ``n`` learned positions in front of the real tokens, so it wraps the model:
the wrapper holds the frozen model as ``base_model`` (parameter names ``base_model.<the model's
own names>``), reads every attribute it lacks (``config``, ``device``, ``generation_config``)
from it, extends the caller's attention mask by ``n`` ones (the virtual tokens are seen by every
token; padding stays hidden), and checks that the real tokens still fit the context with the
one rule, ``methods.check_context``.

The KV cache argument is named ``past_key_values`` up to transformers 5.23 and ``cache`` from
5.24 (the old name still accepted there, with a deprecation warning, until 5.40). The wrappers
take either name and hand the cache on under the name the wrapped model's forward declares
(``cache_keyword``), so they run on both.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from methods import check_context

CACHE_KEYWORDS = ("cache", "past_key_values")  # transformers >= 5.24, then before


def cache_keyword(model: nn.Module) -> Optional[str]:
    """The name ``model``'s forward takes its KV cache by (``CACHE_KEYWORDS``), looking through
    a wrapper that passes ``**kwargs`` on to its ``base_model``; None if it takes none."""
    return first_keyword(model, CACHE_KEYWORDS)


def first_keyword(model: nn.Module, names: tuple[str, ...]) -> Optional[str]:
    """The first of ``names`` that ``model``'s forward takes, looking through a wrapper that
    passes ``**kwargs`` on to its ``base_model``; None if it takes none of them."""

    def params(m: nn.Module) -> Mapping[str, inspect.Parameter]:
        return inspect.signature(m.forward).parameters

    top = params(model)
    found = next((k for k in names if k in top), None)
    if found is not None:
        return found
    backbone = getattr(model, "base_model", model)
    if backbone is model or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in top.values()):
        return None
    inner = params(backbone)
    return next((k for k in names if k in inner), None)


def given_cache(past_key_values: Any, kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed by either name (``cache`` taken out of ``kwargs``); both at
    once is an error."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise TypeError("past_key_values and cache: the same argument under two names; pass one")
    return cache if cache is not None else past_key_values


class VirtualTokenModel(nn.Module):
    """A frozen model with ``num_virtual_tokens`` learned positions in front of its inputs.

    ``taker``: the config key that sets n, named in errors (``method.num_virtual_tokens``).
    """

    def __init__(self, base: nn.Module, n: int, taker: str = "method.num_virtual_tokens"):
        super().__init__()
        self.base_model: Any = base  # a transformers model, read duck-typed (generate, get_input_embeddings, dtype)
        self.num_virtual_tokens = n
        self.taker = taker
        # the base model's name for its KV cache argument (transformers 5.24 renamed it)
        self.cache_name = cache_keyword(base) or "past_key_values"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base_model, name)

    def _extend_mask(self, attention_mask: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
        """(batch, T) -> (batch, n + T): ones for the virtual tokens, which every token sees."""
        if attention_mask is None:
            return None
        ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)

    def _check_length(self, length: int) -> None:
        """The real tokens sit at positions n..n+length-1; past the context they would index
        outside a learned position table (GPT-2, BERT) or leave the trained range (RoPE)."""
        check_context(self.base_model.config, {"input length": length}, self.num_virtual_tokens, self.taker)

    def _check_generate(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """What generation with virtual tokens supports: one sequence per prompt, its own cache."""
        if not hasattr(self.base_model, "generate"):
            raise TypeError(f"{type(self.base_model).__name__} cannot generate")
        for key in ("num_beams", "num_return_sequences"):
            if kwargs.get(key, 1) != 1:
                raise ValueError(f"{key}={kwargs[key]}: generation with virtual tokens supports 1 only")
        for key in CACHE_KEYWORDS:
            if key in kwargs:
                raise ValueError(f"{key}: generate builds its own cache")
        self._check_length(input_ids.shape[1] + (kwargs.get("max_new_tokens") or 0))
