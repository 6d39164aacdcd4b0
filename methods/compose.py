"""A method made of methods: ``method=compose method.parts=[lora,prefix]``.

The parts apply in order, each to the model the previous one returned (a wrapper included), and
then the union of what they train is left trainable::

    model = part_k.apply(... part_1.apply(model))

What follows from that, each part unchanged:

- trainable parameters: the sum of the parts' counts, each as if applied alone (the parts must
  adapt different parameters; two parts that target the same layer see it already wrapped);
- context tokens: the sum of the parts' (prefix and prompt tuning's virtual tokens);
- merge: every part folds what it can (LoRA, DoRA, (IA)^3); a part that cannot (prefix, prompt,
  adapter) stays as it is, and ``describe`` names it under ``unmerged``;
- at init the model equals the base model only if every part's does (``identity_at_init``);
- optimizer groups: the groups a part asks for (LoRA+'s B) at their rates, everything else at
  the run's learning rate.

Each part's settings are its own config class's defaults (equal to ``conf/method/<part>.yaml``,
which a test checks) with per-part overrides: an item of ``parts`` is a method name or a mapping
with ``name`` and the settings to change, ``method.parts=[{name:lora,rank:4},prefix]``. One
learning rate trains every part: ``method.lr`` (or ``train.lr``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, cast

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

import methods
from methods import ConfigError, freeze_all_but, register

NOT_A_PART = ("compose", "full")  # full trains everything: nothing left to compose with


@dataclass
class ComposeConfig:
    """Settings of ``method=compose``.

    parts: the methods applied in order; each a method name or a mapping ``{name: ..., <key>:
    <value>}`` of settings that differ from that method's defaults. lr: the learning rate of
    every part (one optimizer group, except what a part such as LoRA+ asks for).
    """

    name: str = "compose"
    parts: list[Any] = field(default_factory=lambda: ["lora", "prefix"])
    lr: Optional[float] = 1e-3


def part_config(i: int, item: Any) -> Any:
    """The resolved config of ``parts[i]``: its method's defaults with the item's overrides."""
    key = f"method.parts[{i}]"
    if isinstance(item, str):
        name, overrides = item, {}
    elif OmegaConf.is_dict(item) or isinstance(item, dict):
        overrides = dict(cast(dict[str, Any], OmegaConf.to_container(item)) if OmegaConf.is_dict(item) else item)
        name = overrides.pop("name", None)
    else:
        raise ConfigError(f"{key}={item}: allowed: a method name or a mapping with a name, e.g. {{name:lora,rank:4}}")
    allowed = sorted(set(methods.REGISTRY) - set(NOT_A_PART))
    if name not in allowed:
        raise ConfigError(f"{key}.name={name}: allowed: {', '.join(allowed)}")
    schema = OmegaConf.structured(methods.REGISTRY[name].config_class)
    for k, v in overrides.items():
        if k not in schema:
            raise ConfigError(f"{key}.{k}={v}: not a setting of {name}; allowed: {', '.join(schema)}")
        try:
            schema[k] = v
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}.{k}={v}: {str(e).splitlines()[0]}") from None
    return schema


def build_part(i: int, cfg: Any) -> Any:
    """The part's method; its own config errors are named under ``method.parts[i]``."""
    try:
        return methods.build(cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace("method.", f"method.parts[{i}].", 1)) from None


@register
class Compose:
    name = "compose"
    config_class = ComposeConfig
    label_keys = ("parts",)  # the setting that names a run (compare.run_name)

    def __init__(self, cfg: ComposeConfig):
        if cfg.lr is not None and not cfg.lr > 0:
            raise ConfigError(f"method.lr={cfg.lr}: must be > 0 (or null to require train.lr)")
        if not cfg.parts:
            raise ConfigError(f"method.parts={list(cfg.parts or [])}: give at least one method, e.g. [lora,prefix]")
        self.cfg = cfg
        self.parts = [build_part(i, part_config(i, item)) for i, item in enumerate(cfg.parts)]
        names = [p.name for p in self.parts]
        if len(set(names)) < len(names):
            raise ConfigError(f"method.parts={names}: a method appears twice; allowed: each method once")
        self.mergeable = all(p.mergeable for p in self.parts)
        self.identity_at_init = all(p.identity_at_init for p in self.parts)

    @property
    def context_tokens(self) -> int:
        return sum(p.context_tokens for p in self.parts)

    def apply(self, model: nn.Module) -> nn.Module:
        for part in self.parts:
            model = part.apply(model)
        freeze_all_but(model, self.adapter_names(model))  # each part froze the others' parameters
        return model

    def adapter_names(self, model: nn.Module) -> set[str]:
        return set().union(*(p.adapter_names(model) for p in self.parts))

    def trainable_closed_form(self, model: nn.Module) -> Optional[int]:
        """The sum of the parts' closed forms, when every part declares one."""
        forms: list[Any] = [getattr(p, "trainable_closed_form", None) for p in self.parts]
        return sum(f(model) for f in forms) if all(forms) else None

    def merge(self, model: nn.Module) -> bool:
        return any([p.merge(model) for p in self.parts])

    def unmerge(self, model: nn.Module) -> bool:
        return any([p.unmerge(model) for p in reversed(self.parts)])

    def param_groups(self, model: nn.Module, lr: float) -> Optional[list[dict[str, Any]]]:
        """The parts' groups whose rate is not ``lr``; every other trainable parameter at ``lr``."""
        asked = [methods.param_groups(p, model, lr) for p in self.parts]
        special = [g for groups in asked if groups for g in groups if g["lr"] != lr]
        if not special:
            return None
        taken = {id(p) for g in special for p in g["params"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        return [{"params": rest, "lr": lr}, *special]

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return {
            "name": self.name,
            "parts": [p.describe(model) for p in self.parts],
            "unmerged": [p.name for p in self.parts if not p.mergeable],
            "context_tokens": self.context_tokens,
            "lr": self.cfg.lr,
        }
