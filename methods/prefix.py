"""Prefix tuning: learned key/value vectors prepended in every attention layer (Li & Liang, 2021).

The base model stays frozen. For ``n`` virtual tokens, every attention layer ``l`` attends to
``n`` learned keys and values P_k[l], P_v[l] (each n x kv_dim) before the real tokens::

    attention(Q, [P_k[l]; K], [P_v[l]; V])

kv_dim = key/value heads x head_dim, so under grouped-query attention (LLaMA with
``num_key_value_heads < num_attention_heads``) the prefix has the width of the key/value
projections, not of the hidden state. The prefix reaches the model through the transformers
cache interface: a ``DynamicCache`` holding the prefix is passed as the KV cache argument
(``past_key_values``, or ``cache`` from transformers 5.24: ``virtual.cache_keyword``), so no
attention code is replaced. The model then places the real tokens at positions n..n+L-1 (it
counts the cached tokens as seen), exactly as Hugging Face peft does.

Parameters (trainable count, closed form; L layers):

- flat (``projection=false``): one matrix of n x (L * 2 * kv_dim), the prefix itself;
  n * L * 2 * kv_dim scalars.
- projected (``projection=true``, the paper's reparameterisation, which it found to stabilise
  training): Embedding(n, kv_dim) -> Linear(kv_dim, h) -> tanh -> Linear(h, L * 2 * kv_dim);
  n*kv_dim + (kv_dim*h + h) + (h*L*2*kv_dim + L*2*kv_dim) scalars, h = ``projection_hidden``.
  Only the MLP's output is used; after training it could be computed once and stored as a flat
  prefix (not done here: ``merge`` returns False, the prefix never folds into the weights).

The flat vector of one virtual token is laid out as [layer][key, value][kv head][head_dim],
peft's layout, so weights copy one-to-one between the two implementations.

Parity with peft 0.21 (``PrefixTuningConfig``): same parameter shapes and layout (peft also sets
its ``token_dim`` to kv_dim when the config has ``num_key_value_heads``, so the embedding of the
projected form is n x kv_dim under GQA as here), same initialisation (embedding N(0, 1), linear
layers as ``nn.Linear``), same positions, same attention mask (ones for the virtual tokens), and
labels passed unchanged (the loss covers the real tokens only). One default differs: peft's MLP
width ``encoder_hidden_size`` defaults to token_dim; ours, ``projection_hidden``, to 512 (the
width of the paper's released code). Prefix parameters are kept in float32 and cast to the base
model's dtype when the cache is built, as peft does.

Encoders (BERT sequence classification) work too: transformers 5 BERT self-attention still
reads ``past_key_values`` in encoder mode, and its bidirectional mask takes its key length from
the 2D attention mask, which the wrapper extends by the n virtual tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import nn

from methods import ConfigError, check_context, context_length, freeze_all_but, register
from methods.virtual import VirtualTokenModel, cache_keyword, given_cache

ENCODER_NAME = "prefix_encoder"


@dataclass
class PrefixConfig:
    """Settings of ``method=prefix``.

    num_virtual_tokens: n, prefix length in tokens (per layer). projection: train the
    reparameterisation MLP instead of the prefix itself. projection_hidden: width h of that MLP.
    lr: the method's default learning rate.
    """

    name: str = "prefix"
    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden: int = 512
    lr: Optional[float] = 1e-2


@dataclass(frozen=True)
class PrefixShape:
    """Sizes of the prefix for one model: layers, key/value heads, head_dim (scalars per head)."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """Scalars of one virtual token over all layers: L * 2 * kv_dim."""
        return self.layers * 2 * self.kv_dim


def prefix_shape(config: Any) -> PrefixShape:
    """The prefix sizes for a transformers config (GPT-2 names are mapped by its config)."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not layers or not heads or not hidden:
        raise ConfigError(
            f"method=prefix: model_type {getattr(config, 'model_type', None)!r} does not expose "
            "num_hidden_layers / num_attention_heads / hidden_size; allowed: decoder or encoder transformers"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return PrefixShape(layers, kv_heads, head_dim)


class PrefixEncoder(nn.Module):
    """Produces the prefix, (n, L * 2 * kv_dim), from its trainable parameters.

    Flat: ``embedding.weight`` is the prefix. Projected: ``transform(embedding.weight)``.
    Parameters are float32 on ``device`` (may be ``meta``).
    """

    def __init__(self, n: int, shape: PrefixShape, projection: bool, hidden: int, device: torch.device):
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": torch.float32}
        self.projection = projection
        self.embedding = nn.Embedding(n, shape.kv_dim if projection else shape.width, **kw)  # N(0, 1)
        if projection:
            self.transform = nn.Sequential(
                nn.Linear(shape.kv_dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, shape.width, **kw)
            )

    def forward(self) -> torch.Tensor:
        prefix = self.embedding.weight
        return self.transform(prefix) if self.projection else prefix


class PrefixModel(VirtualTokenModel):
    """A frozen model with a trainable prefix fed on every forward.

    Parameter names: ``base_model.<the model's own names>`` and ``prefix_encoder.*``.
    Attributes the wrapper lacks (``config``, ``device``, ``generation_config``, ...) are read
    from the wrapped model (``methods.virtual``).
    """

    def __init__(self, base: nn.Module, n: int, shape: PrefixShape, projection: bool, hidden: int):
        super().__init__(base, n)
        self.shape = shape
        device = next(base.parameters()).device
        self.prefix_encoder = PrefixEncoder(n, shape, projection, hidden, device)
        # A training forward reads the prefix without writing to the cache (``ReadOnlyLayer``),
        # so a layer that gradient checkpointing replays in backward sees the same keys and
        # values again: transformers may then keep the cache under checkpointing, which it
        # otherwise drops (and with it the prefix).
        for module in base.modules():
            if hasattr(type(module), "_can_checkpoint_with_cache"):
                # a plain flag: the stub of Module.__setattr__ takes tensors and modules only
                module._can_checkpoint_with_cache = True  # type: ignore[assignment]

    def prefix_key_values(self) -> torch.Tensor:
        """The prefix as (L, 2, kv_heads, n, head_dim) in the base model's dtype; [l, 0] are
        layer l's keys, [l, 1] its values."""
        s = self.shape
        flat = self.prefix_encoder()  # (n, L * 2 * kv_dim)
        kv = flat.view(self.num_virtual_tokens, s.layers, 2, s.kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)
        return kv.to(self.base_model.dtype)

    def prefix_cache(self, batch_size: int):
        """A ``DynamicCache`` holding the prefix of every layer, each (batch, kv_heads, n, head_dim)."""
        from transformers import DynamicCache

        kv = self.prefix_key_values()
        shape = (batch_size, *kv.shape[2:])
        cache = DynamicCache(
            [(kv[l, 0].unsqueeze(0).expand(shape), kv[l, 1].unsqueeze(0).expand(shape)) for l in range(kv.shape[0])]
        )
        if self.training:
            for layer in cache.layers:
                layer.__class__ = read_only_layer(cast(type, type(layer)))
        return cache

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Any = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward with the prefix in front of every layer's keys and values.

        ``attention_mask`` covers the real tokens only (past and present); the wrapper adds the
        virtual ones. ``past_key_values`` (or ``cache``, its name from transformers 5.24), when
        given, must come from an earlier output of this wrapper (it already holds the prefix).
        ``labels`` go to the base model unchanged.
        """
        past_key_values = given_cache(past_key_values, kwargs)
        # BUG?: with neither input_ids nor inputs_embeds, x is None and x.shape raises AttributeError
        x: torch.Tensor = input_ids if input_ids is not None else inputs_embeds  # type: ignore[assignment]
        batch, length = x.shape[:2]
        if past_key_values is None:
            self._check_length(length)
            past_key_values = self.prefix_cache(batch)
            if attention_mask is None:  # explicit, so that encoders size their mask to n + length
                attention_mask = torch.ones(batch, length, dtype=torch.long, device=x.device)
        if position_ids is not None:
            position_ids = position_ids + self.num_virtual_tokens
        return self.base_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=self._extend_mask(attention_mask, batch),
            position_ids=position_ids,
            labels=labels,
            **{self.cache_name: past_key_values},
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` (greedy or sampling, one sequence per prompt), starting from
        a KV cache that holds the prefix. Returns the prompt ids followed by the new ids."""
        self._check_generate(input_ids, kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.num_virtual_tokens
        # The mask (n + T) is longer than input_ids (T): generate then treats every id as new input
        # after the n cached positions, and derives positions n..n+T-1 from the mask.
        return self.base_model.generate(
            input_ids=input_ids,
            attention_mask=self._extend_mask(attention_mask, input_ids.shape[0]),
            **{self.cache_name: self.prefix_cache(input_ids.shape[0])},
            **kwargs,
        )


@functools.cache
def read_only_layer(layer_type: type) -> type:
    """``layer_type`` (a transformers cache layer) whose ``update`` returns the cached prefix
    followed by the new keys and values without storing the new ones: the cache is the same
    after a layer's forward as before, however often the forward runs."""

    class ReadOnlyLayer(layer_type):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:  # pragma: no cover - the prefix initialises every layer
                raise RuntimeError("the prefix cache has an empty layer")
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return ReadOnlyLayer


def accepts_cache(model: nn.Module) -> bool:
    """True if ``model``'s forward can hand a KV cache (by either name) to a backbone that reads it."""
    return cache_keyword(model) is not None


@register
class Prefix:
    name = "prefix"
    config_class = PrefixConfig
    mergeable = False  # the prefix lives in the KV cache, not in a weight
    identity_at_init = False  # a random prefix changes every attention layer
    label_keys = ("num_virtual_tokens",)  # the setting that names a run (compare.run_name)

    @property
    def context_tokens(self) -> int:
        """Positions of the model's context the method itself takes (the harness checks that
        inputs still fit)."""
        return self.cfg.num_virtual_tokens

    def __init__(self, cfg: PrefixConfig):
        check(cfg)
        self.cfg = cfg

    def check_model(self, model: nn.Module) -> PrefixShape:
        """The prefix sizes for ``model``; ConfigError if the model cannot take a prefix."""
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if config is None or getattr(config, "is_encoder_decoder", False):
            raise ConfigError(
                f"method=prefix: model_type {model_type!r} (encoder-decoder or no config) is not "
                "supported; allowed: decoder-only LMs and encoders with a single attention stack"
            )
        if not accepts_cache(model):
            raise ConfigError(
                f"method=prefix: {type(model).__name__} ({model_type}) does not accept a KV cache "
                "(past_key_values or cache), so a prefix cannot reach its attention; allowed: models "
                "whose forward takes a KV cache"
            )
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise ConfigError(
                "method=prefix: gradient checkpointing is on; a prefix in the KV cache does not "
                "survive recomputation; allowed: gradient checkpointing off"
            )
        check_context(
            config, {"method.num_virtual_tokens": 0}, self.cfg.num_virtual_tokens, "method.num_virtual_tokens"
        )
        return prefix_shape(config)

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        shape = self.check_model(model)
        wrapped = PrefixModel(model, cfg.num_virtual_tokens, shape, cfg.projection, cfg.projection_hidden)
        freeze_all_but(wrapped, self.adapter_names(wrapped))
        return wrapped

    def adapter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if ENCODER_NAME in n.split(".")}

    def trainable_closed_form(self, model: nn.Module) -> int:
        return prefix_parameters(self.cfg, prefix_shape(model.config))

    def merge(self, model: nn.Module) -> bool:
        return False

    def unmerge(self, model: nn.Module) -> bool:
        return False

    def describe(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        shape = prefix_shape(model.config)
        ctx = context_length(model.config)
        return {
            "name": self.name,
            "num_virtual_tokens": cfg.num_virtual_tokens,
            "projection": cfg.projection,
            "projection_hidden": cfg.projection_hidden if cfg.projection else None,
            "kv_dim": shape.kv_dim,
            "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "layers": shape.layers,
            "context_length": ctx,
            "context_fraction": cfg.num_virtual_tokens / ctx if ctx else None,
            "prefix_params": prefix_parameters(cfg, shape),
            "lr": cfg.lr,
        }


def prefix_parameters(cfg: PrefixConfig, shape: PrefixShape) -> int:
    """Trainable scalars of the prefix, closed form (see the module docstring)."""
    n, kv, w = cfg.num_virtual_tokens, shape.kv_dim, shape.width
    if not cfg.projection:
        return n * w
    h = cfg.projection_hidden
    return n * kv + (kv * h + h) + (h * w + w)


def check(cfg: PrefixConfig) -> None:
    """Reject values that cannot work, before any model is built."""
    n = cfg.num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"method.num_virtual_tokens={n}: must be an integer >= 1")
    if not isinstance(cfg.projection, bool):
        raise ConfigError(f"method.projection={cfg.projection}: allowed: true, false")
    h = cfg.projection_hidden
    if not isinstance(h, int) or isinstance(h, bool) or h < 1:
        raise ConfigError(f"method.projection_hidden={h}: must be an integer >= 1")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"method.lr={cfg.lr}: must be > 0 (or null to require train.lr)")
