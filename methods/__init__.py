"""Parameter-efficient fine-tuning methods, implemented in-house, one file per method.

A method is a small class registered under its config name (``method=lora`` is
``methods/lora.py`` is the row ``lora`` in the results). It changes the model, never the
training loop. The protocol every method satisfies (``Method`` below names all of it)::

    method = methods.build(cfg)        # cfg: the resolved ``method`` config group
    model = method.apply(model)        # inject modules, freeze what the method does not train;
                                       # may return a wrapper (prefix and prompt tuning do)
    method.adapter_names(model)        # names of the parameters the method trains
    method.merge(model) / unmerge(model)   # fold into the base weights where possible
    method.describe(model)             # resolved settings for the run record
    method.context_tokens              # context positions the method takes itself (tokens)

Optional: ``param_groups(model, lr)`` (optimizer groups, e.g. LoRA+; read through
``methods.param_groups``), ``trainable_closed_form(model)`` (the trainable count from the
model's sizes, which the conformance test holds the real count to) and ``label_keys`` (the
settings that name a run, e.g. ``("rank",)``, read by ``compare.run_name``).

``apply`` leaves exactly the method's own parameters with ``requires_grad=True``; the harness
then also unfreezes a task head it created (a fresh classifier), which every method trains.
``apply`` must work on a model on the meta device (the dry run and the estimator build one):
no reading of weight values there. Per-architecture knowledge (target presets, insertion
points, head names, GPT-2's transposed linear) lives in ``methods/arch.py``.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch import nn

from peftbench.errors import ConfigError  # noqa: F401 (the harness's error type, raised by every method)


class Method(Protocol):
    """What the harness, the estimator and the tests read of a method.

    ``config_class``: a dataclass with at least ``name`` and ``lr`` (the method's default
    learning rate, used when ``train.lr`` is null); its defaults equal ``conf/method/<name>.yaml``
    and it is stored in Hydra's ConfigStore as ``<name>_schema``. ``mergeable``: ``merge`` folds
    the method into the base weights, so merged outputs equal unmerged ones. ``identity_at_init``:
    right after ``apply`` the model computes exactly what the base model computes.
    ``context_tokens``: positions of the model's context the method occupies (prefix and prompt
    tuning's virtual tokens; 0 for the rest), which ``check_context`` adds to the inputs.
    ``trains_base`` (optional, default False): the method trains the base weights themselves
    (``full``), so ``model.quantize`` refuses it. On a quantized base a linear layer is a
    ``peftbench.quantize.QuantizedLinear``: read its weight through ``dense_weight()`` and fold
    into it with ``merge_delta`` / ``unmerge_delta`` (as LoRA, DoRA and (IA)^3 do).
    """

    name: str
    config_class: type
    mergeable: bool
    identity_at_init: bool
    context_tokens: int

    def apply(self, model: nn.Module) -> nn.Module: ...

    def adapter_names(self, model: nn.Module) -> set[str]: ...

    def merge(self, model: nn.Module) -> bool: ...

    def unmerge(self, model: nn.Module) -> bool: ...

    def describe(self, model: nn.Module) -> dict[str, Any]: ...


class QuantizedBase(Protocol):
    """What a method reads of a frozen linear layer stored quantized (``peftbench.quantize``'s
    ``QuantizedLinear``, found by ``hasattr(layer, "dense_weight")``): its dense weight (out,
    in), and a dense delta folded into it and taken back out bit for bit. Declared here so that
    the methods need nothing of the layer that stores the base."""

    def dense_weight(self) -> torch.Tensor: ...

    def merge_delta(self, delta: torch.Tensor) -> None: ...

    def unmerge_delta(self) -> None: ...


REGISTRY: dict[str, type[Any]] = {}


def register(cls: type[Any]) -> type[Any]:
    """Class decorator: make ``cls`` available as ``method=<cls.name>``."""
    if cls.name in REGISTRY:
        raise RuntimeError(f"method name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def build(cfg: Any) -> Method:
    """Instantiate the method named ``cfg.name`` from its resolved config."""
    name = cfg.name
    if name not in REGISTRY:
        raise ConfigError(f"method={name}: unknown method; allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](cfg)


def param_groups(method: Any, model: nn.Module, lr: float) -> Optional[list[dict[str, Any]]]:
    """The optimizer parameter groups ``method`` asks for (its optional ``param_groups(model,
    lr)``), or None for the loop's default: one group of every trainable parameter at ``lr``
    (also when the method's own answer is None). A method's groups must cover every trainable
    parameter exactly once (a task head included)."""
    ask = getattr(method, "param_groups", None)
    groups = ask(model, lr) if ask is not None else None
    if groups is None:
        return None
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    given = [id(p) for g in groups for p in g["params"]]
    if len(given) != len(set(given)) or set(given) != trainable:
        raise RuntimeError(f"method {method.name}: param_groups must hold every trainable parameter exactly once")
    return groups


def freeze_all_but(model: nn.Module, names: set[str]) -> None:
    """Train exactly the parameters in ``names`` (dotted names from ``named_parameters``)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)


def trainable_parameters(model: nn.Module) -> int:
    """Number of scalar parameters that receive gradients (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def total_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in the model, trained or frozen (shared tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def match_modules(model: nn.Module, patterns: list[str], types: tuple[type, ...]) -> list[str]:
    """Names of submodules of one of ``types`` whose name matches any pattern.

    A pattern matches a module whose last name component equals it (``q_proj``), or, if it
    contains a dot or regex characters, whose full dotted name matches it as a regular
    expression (``model.layers.0.self_attn.q_proj``, ``.*\\.attn\\.c_attn``).
    """
    import re

    for pat in patterns:
        try:
            re.compile(pat)
        except re.error as e:
            raise ConfigError(
                f"method.target_modules={pat}: not a valid regular expression ({e}); allowed: module "
                "names (q_proj) or regular expressions over dotted names"
            ) from None
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        leaf = name.rsplit(".", 1)[-1]
        for pat in patterns:
            if pat == leaf or (any(c in pat for c in ".*[]()|+?\\") and re.fullmatch(pat, name)):
                out.append(name)
                break
    return out


def module_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute under which it holds it."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def context_length(config: Any) -> Optional[int]:
    """Positions the model can address (tokens), or None if its config names no limit."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(config: Any, needs: dict[str, int], taken: int = 0, taker: str = "") -> None:
    """The one context-length rule: every input length in ``needs`` (config key -> tokens), plus
    the ``taken`` positions a method occupies itself (prefix tuning's virtual tokens), must fit in
    the model's context. Raises a one-line ConfigError naming the longest key that does not fit."""
    context = context_length(config)
    if context is None or not needs:
        return
    if taken >= context:
        raise ConfigError(f"{taker or 'method'}={taken}: must be < the model's context length ({context} tokens)")
    key, longest = max(needs.items(), key=lambda kv: kv[1])
    if taken + longest > context:
        extra = f" plus the {taken} positions that {taker} takes" if taken else ""
        raise ConfigError(
            f"{key}={longest}: {longest} tokens{extra} exceed the model's context of {context}; "
            f"allowed: at most {context - taken}"
        )


def _import_all() -> None:
    """Import every module of this package; each registers its method."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        importlib.import_module(f"{__name__}.{info.name}")


_import_all()
