"""Prompt tuning: n learned vectors prepended to the input embeddings (Lester et al., 2021).

The base model stays frozen, and nothing inside it changes: for input embeddings E (T x d),
the model sees [P; E], P (n x d) trained, d the hidden size (token embedding width). The
method trains n * d scalars, and takes n positions of the model's context (``context_tokens``),
like prefix tuning (``methods/prefix.py``), with whose wrapper (``methods.virtual``) it shares
the attention-mask, attribute and context handling. Unlike a prefix, the prompt enters at the
first layer only; every later layer sees it through attention.

P starts as N(0, 1) (random initialisation, as peft's ``PromptTuningInit.RANDOM``); parameters
are float32 and cast to the embeddings' dtype on use, as the prefix's are.

What the wrapper does around the base model, matching peft 0.21's prompt tuning:

- attention mask: n ones in front; BERT's ``token_type_ids``: n zeros in front;
- labels of a causal LM (batch x T): n ignored labels (-100) in front, so the loss covers the
  real tokens (and the first real token, predicted from the prompt); class labels unchanged;
- positions: the real tokens sit at n..n+T-1; explicit ``position_ids`` (0..T-1) are shifted
  by n and preceded by 0..n-1;
- outputs: per-token logits are returned for the real tokens only ((batch, T, vocab), aligned
  with the inputs as the base model's are; peft returns the n virtual positions too);
- ``generate``: the base model's, started from [P; E] with the extended mask; returns the
  prompt ids followed by the new ids.

Nothing folds into the weights: ``merge`` returns False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from methods import ConfigError, check_context, context_length, freeze_all_but, register
from methods.virtual import VirtualTokenModel, given_cache

ENCODER_NAME = "prompt_encoder"


@dataclass
class PromptConfig:
    """Settings of ``method=prompt``.

    num_virtual_tokens: n, the prompt length in tokens. lr: the method's default learning rate.
    """

    name: str = "prompt"
    num_virtual_tokens: int = 20
    lr: Optional[float] = 3e-2


class PromptEncoder(nn.Module):
    """The soft prompt: ``embedding.weight`` (n, d), float32, N(0, 1)."""

    def __init__(self, n: int, d: int, device: torch.device):
        super().__init__()
        self.embedding = nn.Embedding(n, d, device=device, dtype=torch.float32)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptModel(VirtualTokenModel):
    """A frozen model whose input embeddings are preceded by a trainable soft prompt.

    Parameter names: ``base_model.<the model's own names>`` and ``prompt_encoder.*``.
    """

    def __init__(self, base: nn.Module, n: int, d: int):
        super().__init__(base, n)
        self.prompt_encoder = PromptEncoder(n, d, next(base.parameters()).device)

    def embed(self, input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """[P; E]: (batch, n + T, d) in the embeddings' dtype."""
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        batch = inputs_embeds.shape[0]
        prompt = self.prompt_encoder().to(inputs_embeds.dtype)  # (n, d)
        return torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), inputs_embeds], dim=1)

    def _extend_front(self, t: Optional[torch.Tensor], value: int) -> Optional[torch.Tensor]:
        """(batch, T) -> (batch, n + T) with ``value`` in front."""
        if t is None:
            return None
        return torch.cat([t.new_full((t.shape[0], self.num_virtual_tokens), value), t], dim=1)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Any = None,
        labels: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward on [P; E]; ``attention_mask``, ``labels``, ``position_ids``
        and ``token_type_ids`` cover the real tokens only (the wrapper extends them), and so do
        the logits returned. ``logits_to_keep`` as a tensor of positions counts real tokens too;
        as a number k > 0, the last k positions (real tokens where k <= the input's length)."""
        past_key_values = given_cache(past_key_values, kwargs)  # ``cache`` from transformers 5.24
        n = self.num_virtual_tokens
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):
            kwargs["logits_to_keep"] = keep + n  # the real tokens' positions, behind the soft prompt
        every = keep is None or (isinstance(keep, int) and keep == 0)  # logits of every position
        # BUG?: with neither input_ids nor inputs_embeds, x is None and x.shape raises AttributeError
        x: torch.Tensor = input_ids if input_ids is not None else inputs_embeds  # type: ignore[assignment]
        batch, length = x.shape[:2]
        self._check_length(length)
        if labels is not None and labels.dim() == 2 and labels.shape[:2] == (batch, length):  # per-token labels
            labels = self._extend_front(labels, -100)
        if position_ids is not None:
            front = torch.arange(n, device=position_ids.device).expand(position_ids.shape[0], n)
            position_ids = torch.cat([front, position_ids + n], dim=1)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = self._extend_front(token_type_ids, 0)
        out = self.base_model(
            inputs_embeds=self.embed(input_ids, inputs_embeds),
            attention_mask=self._extend_mask(attention_mask, batch),
            position_ids=position_ids,
            labels=labels,
            **{self.cache_name: past_key_values},
            **kwargs,
        )
        if every and getattr(out, "logits", None) is not None and out.logits.dim() == 3:
            out.logits = out.logits[:, n:]  # (batch, T, vocab): aligned with the real tokens
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` (greedy or sampling, one sequence per prompt) from
        [P; E]. Returns the prompt ids followed by the new ids (as ``sequences`` of the output
        with ``return_dict_in_generate=True``)."""
        self._check_generate(input_ids, kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if kwargs.get("position_ids") is not None:
            raise ValueError("position_ids: generation with a soft prompt derives positions from the mask")
        out = self.base_model.generate(
            inputs_embeds=self.embed(input_ids, None),
            attention_mask=self._extend_mask(attention_mask, input_ids.shape[0]),
            **kwargs,
        )  # from embeddings alone, transformers returns the new ids only
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences], dim=1)  # return_dict_in_generate=True
        return out


@register
class Prompt:
    name = "prompt"
    config_class = PromptConfig
    mergeable = False  # the prompt is an input, not a weight
    identity_at_init = False  # a random prompt changes every output
    label_keys = ("num_virtual_tokens",)  # the setting that names a run (compare.run_name)

    def __init__(self, cfg: PromptConfig):
        check(cfg)
        self.cfg = cfg

    @property
    def context_tokens(self) -> int:
        """Positions of the model's context the prompt takes (the harness checks that inputs still fit)."""
        return self.cfg.num_virtual_tokens

    def hidden_size(self, model: nn.Module) -> int:
        """d, the width of the input embeddings; ConfigError if the model has none."""
        config = getattr(model, "config", None)
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if get is not None else None
        if config is None or getattr(config, "is_encoder_decoder", False) or emb is None:
            raise ConfigError(
                f"method=prompt: model_type {getattr(config, 'model_type', None)!r} (encoder-decoder, or no "
                "input embeddings) is not supported; allowed: decoder-only LMs and encoders"
            )
        return emb.weight.shape[1]

    def apply(self, model: nn.Module) -> nn.Module:
        n = self.cfg.num_virtual_tokens
        d = self.hidden_size(model)
        check_context(model.config, {"method.num_virtual_tokens": 0}, n, "method.num_virtual_tokens")
        wrapped = PromptModel(model, n, d)
        freeze_all_but(wrapped, self.adapter_names(wrapped))
        return wrapped

    def adapter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if ENCODER_NAME in n.split(".")}

    def trainable_closed_form(self, model: nn.Module) -> int:
        """n * d."""
        return self.cfg.num_virtual_tokens * self.hidden_size(model)

    def merge(self, model: nn.Module) -> bool:
        return False

    def unmerge(self, model: nn.Module) -> bool:
        return False

    def describe(self, model: nn.Module) -> dict[str, Any]:
        n = self.cfg.num_virtual_tokens
        ctx = context_length(model.config)
        return {
            "name": self.name,
            "num_virtual_tokens": n,
            "hidden_size": self.hidden_size(model),
            "init": "random",
            "context_length": ctx,
            "context_fraction": n / ctx if ctx else None,
            "lr": self.cfg.lr,
        }


def check(cfg: PromptConfig) -> None:
    """Reject values that cannot work, before any model is built."""
    n = cfg.num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"method.num_virtual_tokens={n}: must be an integer >= 1")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"method.lr={cfg.lr}: must be > 0 (or null to require train.lr)")
