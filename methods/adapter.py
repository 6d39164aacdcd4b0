"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021).

A small two-layer network with its own skip connection is inserted on the output h (..., d)
of a transformer sublayer, before that sublayer's residual add:

    a(h) = h + W_up act(W_down h + b_down) + b_up,   W_down: (m x d), W_up: (d x m)

with bottleneck m = d // reduction_factor (or ``bottleneck`` when given). Each insertion
trains 2dm + m + d parameters; there is no extra LayerNorm. W_up and b_up start at zero, so
at step 0 the model is exactly the base model; W_down starts like an ``nn.Linear`` weight
(Kaiming-uniform, drawn from the global torch RNG) and b_down at zero.

``variant=houlsby`` puts one adapter on the attention sublayer's output projection and one
on the feed-forward sublayer's output projection of every layer; ``variant=pfeiffer`` only
on the feed-forward one. The projection module is wrapped (``AdapterLayer``), so the
adapter sees exactly what the projection returns: for GPT-2 and BERT that is before their
residual dropout (and BERT's residual + LayerNorm). Unlike LoRA, an adapter is non-linear
and cannot be folded into the base weights: it costs extra inference time, which is part of
what peftbench measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import nn

from methods import ConfigError, freeze_all_but, match_modules, module_parent, register
from methods.arch import INSERTION_POINTS, LINEAR_TYPES

VARIANTS = ("houlsby", "pfeiffer")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class AdapterConfig:
    """Settings of ``method=adapter``.

    variant: houlsby (attention + feed-forward adapters) or pfeiffer (feed-forward only).
    reduction_factor: bottleneck m = d // reduction_factor, d the hidden size.
    bottleneck: explicit m; overrides reduction_factor. activation: relu, gelu, silu or tanh.
    attn_modules / ffn_modules: module-name patterns (``methods.match_modules`` semantics)
    that override the per-architecture insertion points. lr: the method's default
    learning rate.
    """

    name: str = "adapter"
    variant: str = "houlsby"
    reduction_factor: int = 16
    bottleneck: Optional[int] = None
    activation: str = "relu"
    attn_modules: Optional[list[str]] = None
    ffn_modules: Optional[list[str]] = None
    lr: Optional[float] = 1e-3


def output_features(module: nn.Module) -> int:
    """d: the size of the last dimension a Linear or GPT-2 Conv1D returns."""
    return module.out_features if isinstance(module, nn.Linear) else cast(torch.Tensor, module.weight).shape[1]


class BottleneckAdapter(nn.Module):
    """h -> h + up(act(down(h))) on (..., d) tensors; trainable, zero contribution at init."""

    def __init__(self, d: int, m: int, activation: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.down = nn.Linear(d, m, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(m, d, dtype=dtype, device=device)
        if device.type != "meta":  # meta tensors hold no values to initialise
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # as nn.Linear initialises
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # (..., d) -> (..., m) -> (..., d)
        return h + self.up(self.act(self.down(h)))


class AdapterLayer(nn.Module):
    """A frozen output projection followed by a bottleneck adapter on what it returns."""

    def __init__(self, base: nn.Module, m: int, activation: str):
        super().__init__()
        self.base = base
        w = cast(torch.Tensor, base.weight)
        self.adapter = BottleneckAdapter(output_features(base), m, activation, w.dtype, w.device)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.adapter(self.base(*args, **kwargs))


@register
class Adapter:
    name = "adapter"
    config_class = AdapterConfig
    mergeable = False  # non-linear
    identity_at_init = True  # W_up = 0, b_up = 0
    context_tokens = 0
    label_keys = ("variant",)  # the setting that names a run (compare.run_name)

    def __init__(self, cfg: AdapterConfig):
        check(cfg)
        self.cfg = cfg
        self.insertions: dict[str, list[str]] = {"attn": [], "ffn": []}

    def bottleneck_size(self, d: int) -> int:
        """m for hidden size d."""
        cfg = self.cfg
        m = cfg.bottleneck if cfg.bottleneck is not None else d // cfg.reduction_factor
        if m < 1:
            raise ConfigError(
                f"method.reduction_factor={cfg.reduction_factor}: gives bottleneck {d} // "
                f"{cfg.reduction_factor} = 0 for hidden size {d}; allowed: at most {d}, or set method.bottleneck"
            )
        return m

    def patterns(self, model: nn.Module) -> dict[str, list[str]]:
        """Module-name patterns for each insertion kind this variant uses."""
        cfg = self.cfg
        kinds = ("attn", "ffn") if cfg.variant == "houlsby" else ("ffn",)
        user: dict[str, Optional[list[str]]] = {"attn": cfg.attn_modules, "ffn": cfg.ffn_modules}
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        out = {}
        for kind in kinds:
            given = user[kind]
            if given:
                out[kind] = list(given)
            elif model_type in INSERTION_POINTS:
                out[kind] = [dict(zip(("attn", "ffn"), INSERTION_POINTS[model_type]))[kind]]
            else:
                needed = " and ".join(f"method.{k}_modules=[...]" for k in kinds if not user[k])
                raise ConfigError(
                    f"method=adapter: no insertion points known for model_type {model_type!r}; set {needed} "
                    f"(output projections of the sublayers; known: {', '.join(sorted(INSERTION_POINTS))})"
                )
        return out

    def resolve(self, model: nn.Module) -> dict[str, list[str]]:
        """Dotted names of the projections that get an adapter, per kind (attn, ffn)."""
        found: dict[str, list[str]] = {"attn": [], "ffn": []}
        for kind, pats in self.patterns(model).items():
            found[kind] = match_modules(model, pats, LINEAR_TYPES)
            if not found[kind]:
                raise ConfigError(
                    f"method.{kind}_modules={pats}: matches no linear layer of this model; allowed: "
                    f"module names or full-name regular expressions of Linear/Conv1D layers"
                )
        both = sorted(set(found["attn"]) & set(found["ffn"]))
        if both:
            raise ConfigError(
                f"method.ffn_modules: {both[0]} is also matched by method.attn_modules; allowed: disjoint module sets"
            )
        return found

    def apply(self, model: nn.Module) -> nn.Module:
        self.insertions = self.resolve(model)
        for name in self.insertions["attn"] + self.insertions["ffn"]:
            parent, attr = module_parent(model, name)
            base = getattr(parent, attr)
            setattr(parent, attr, AdapterLayer(base, self.bottleneck_size(output_features(base)), self.cfg.activation))
        freeze_all_but(model, self.adapter_names(model))
        return model

    def trainable_closed_form(self, model: nn.Module) -> int:
        """2 d m + m + d per insertion."""
        layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
        return sum(
            2 * a.adapter.down.in_features * a.adapter.down.out_features
            + a.adapter.down.out_features
            + a.adapter.down.in_features
            for a in layers
        )

    def adapter_names(self, model: nn.Module) -> set[str]:
        return {
            f"{mod_name}.{p_name}"
            for mod_name, mod in model.named_modules()
            if isinstance(mod, BottleneckAdapter)
            for p_name, _ in mod.named_parameters()
        }

    def merge(self, model: nn.Module) -> bool:
        return False  # non-linear: cannot be folded into the base weights

    def unmerge(self, model: nn.Module) -> bool:
        return False

    def describe(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
        hidden = sorted({layer.adapter.down.in_features for layer in layers})
        bottleneck = sorted({layer.adapter.down.out_features for layer in layers})
        paths = self.insertions["attn"] + self.insertions["ffn"]
        return {
            "name": self.name,
            "variant": cfg.variant,
            "reduction_factor": cfg.reduction_factor if cfg.bottleneck is None else None,
            "bottleneck": bottleneck[0] if len(bottleneck) == 1 else bottleneck,
            "hidden_size": hidden[0] if len(hidden) == 1 else hidden,
            "activation": cfg.activation,
            "num_insertions": len(paths),
            "insertion_modules": sorted({n.rsplit(".", 1)[-1] for n in paths}),
            "insertion_paths": {"attn": list(self.insertions["attn"]), "ffn": list(self.insertions["ffn"])},
            "lr": cfg.lr,
        }


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check(cfg: AdapterConfig) -> None:
    """Reject values that cannot work, before any model is built."""
    if cfg.variant not in VARIANTS:
        raise ConfigError(f"method.variant={cfg.variant}: allowed: {', '.join(VARIANTS)}")
    if not _positive_int(cfg.reduction_factor):
        raise ConfigError(f"method.reduction_factor={cfg.reduction_factor}: must be an integer >= 1")
    if cfg.bottleneck is not None and not _positive_int(cfg.bottleneck):
        raise ConfigError(
            f"method.bottleneck={cfg.bottleneck}: must be an integer >= 1, or null to use reduction_factor"
        )
    if cfg.activation not in ACTIVATIONS:
        raise ConfigError(f"method.activation={cfg.activation}: allowed: {', '.join(ACTIVATIONS)}")
    for key in ("attn_modules", "ffn_modules"):
        value = getattr(cfg, key)
        if value is not None and len(value) == 0:
            raise ConfigError(
                f"method.{key}=[]: give at least one module name, or null to use the architecture's table"
            )
    if cfg.variant == "pfeiffer" and cfg.attn_modules:
        raise ConfigError(
            f"method.attn_modules={list(cfg.attn_modules)}: the pfeiffer variant has no attention "
            f"adapter; allowed: null, or method.variant=houlsby"
        )
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"method.lr={cfg.lr}: must be > 0, or null to require train.lr")
