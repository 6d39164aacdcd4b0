"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022).

Learned vectors rescale activations elementwise; nothing else is added::

    keys, values:            k = l_k * (x W_k^T + b_k),   v = l_v * (x W_v^T + b_v)   (output side)
    feed-forward:            y = (l_ff * h) W_down^T + b_down                          (input side)

l_k, l_v: (kv_dim,), l_ff: (intermediate,), one scalar per feature, all initialised to 1, so at
step 0 the model equals the base model. A vector on the output side multiplies the layer's
whole output, bias included. Each layer trains out (output side) or in (input side) scalars.

Targets are ``arch.IA3_TARGETS`` (peft 0.21's defaults, so that runs compare like for like):
LLaMA-like models scale k_proj and v_proj outputs and the input of down_proj; GPT-2 the fused
c_attn output (queries too, as peft) and the input of mlp.c_proj; BERT the key and value outputs
and the input of every ``output.dense`` (the feed-forward output, and, as peft's pattern also
matches it, the attention output projection). ``target_modules`` / ``feedforward_modules``
override the table.

Mergeable: a vector on the output side scales the rows of W (and b), one on the input side the
columns of W; unmerge divides them back out (exact up to rounding while no scalar is 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import nn

from methods import ConfigError, QuantizedBase, freeze_all_but, match_modules, module_parent, register
from methods.arch import IA3_TARGETS, LINEAR_TYPES, in_out_features, is_transposed, table_entry


@dataclass
class IA3Config:
    """Settings of ``method=ia3``.

    target_modules: module patterns (``methods.match_modules``) whose output is scaled;
    feedforward_modules: those whose input is scaled; null takes the architecture's preset
    (``arch.IA3_TARGETS``). lr: the method's default learning rate.
    """

    name: str = "ia3"
    target_modules: Optional[list[str]] = None
    feedforward_modules: Optional[list[str]] = None
    lr: Optional[float] = 3e-3


class IA3Layer(nn.Module):
    """A frozen ``nn.Linear`` or ``Conv1D`` whose output (or input, ``feedforward``) is scaled
    elementwise by a trainable vector ``ia3_l``."""

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        w = cast(torch.Tensor, base.weight)
        size = in_out_features(base)[0 if feedforward else 1]
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=w.dtype, device=w.device))  # (in,) or (out,)
        self.merged = False

    def _weight_scale(self) -> torch.Tensor:
        """ia3_l shaped to scale the stored weight: rows or columns of (out, in), or of Conv1D's (in, out)."""
        along_rows = self.feedforward == is_transposed(self.base)  # the scaled dimension is dim 0
        return self.ia3_l[:, None] if along_rows else self.ia3_l[None, :]

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            if hasattr(self.base, "merge_delta"):  # a quantized base: dequantize-merge, W + W (l - 1)
                quantized = cast(QuantizedBase, self.base)
                w = quantized.dense_weight()
                quantized.merge_delta(w * (self._weight_scale().to(w.dtype) - 1))
            else:
                weight = cast(torch.Tensor, self.base.weight)
                weight.mul_(self._weight_scale().to(weight.dtype))
            if not self.feedforward and self.base.bias is not None:
                bias = cast(torch.Tensor, self.base.bias)
                bias.mul_(self.ia3_l.to(bias.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            if hasattr(self.base, "unmerge_delta"):  # the stored quantized weight, bit for bit
                cast(QuantizedBase, self.base).unmerge_delta()
            else:
                weight = cast(torch.Tensor, self.base.weight)
                weight.div_(self._weight_scale().to(weight.dtype))
            if not self.feedforward and self.base.bias is not None:
                bias = cast(torch.Tensor, self.base.bias)
                bias.div_(self.ia3_l.to(bias.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.ia3_l)  # (..., in)
        return self.base(x) * self.ia3_l  # (..., out)


@register
class IA3:
    name = "ia3"
    config_class = IA3Config
    mergeable = True
    identity_at_init = True  # every vector starts at 1
    context_tokens = 0

    def __init__(self, cfg: IA3Config):
        check(cfg)
        self.cfg = cfg
        self.targets: dict[str, list[str]] = {"output": [], "input": []}

    def patterns(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """(output-side, input-side) module patterns for ``model``."""
        cfg = self.cfg
        if cfg.target_modules is not None and cfg.feedforward_modules is not None:
            return list(cfg.target_modules), list(cfg.feedforward_modules)
        fix = "method.target_modules=[...] and method.feedforward_modules=[...]"
        out, inp = table_entry(IA3_TARGETS, model, "method=ia3", fix)
        return (
            list(cfg.target_modules) if cfg.target_modules is not None else out,
            list(cfg.feedforward_modules) if cfg.feedforward_modules is not None else inp,
        )

    def resolve(self, model: nn.Module) -> dict[str, list[str]]:
        """Dotted names of the layers scaled on their output and on their input."""
        out_pats, in_pats = self.patterns(model)
        inputs = match_modules(model, in_pats, LINEAR_TYPES) if in_pats else []
        outputs = [n for n in match_modules(model, out_pats, LINEAR_TYPES) if n not in inputs] if out_pats else []
        if not inputs and not outputs:
            raise ConfigError(
                f"method.target_modules={out_pats}: with method.feedforward_modules={in_pats} matches no "
                "linear layer of this model; allowed: module names or full-name regular expressions"
            )
        return {"output": outputs, "input": inputs}

    def apply(self, model: nn.Module) -> nn.Module:
        self.targets = self.resolve(model)
        for side in ("output", "input"):
            for name in self.targets[side]:
                parent, attr = module_parent(model, name)
                setattr(parent, attr, IA3Layer(getattr(parent, attr), feedforward=side == "input"))
        freeze_all_but(model, self.adapter_names(model))
        return model

    def adapter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if n.endswith(".ia3_l")}

    def layers(self, model: nn.Module) -> list[IA3Layer]:
        return [m for m in model.modules() if isinstance(m, IA3Layer)]

    def trainable_closed_form(self, model: nn.Module) -> int:
        """out per output-side layer + in per input-side layer."""
        return sum(in_out_features(m.base)[0 if m.feedforward else 1] for m in self.layers(model))

    def merge(self, model: nn.Module) -> bool:
        for layer in self.layers(model):
            layer.merge()
        return True

    def unmerge(self, model: nn.Module) -> bool:
        for layer in self.layers(model):
            layer.unmerge()
        return True

    def describe(self, model: nn.Module) -> dict[str, Any]:
        leaves = {side: sorted({n.rsplit(".", 1)[-1] for n in names}) for side, names in self.targets.items()}
        return {
            "name": self.name,
            "output_modules": leaves["output"],
            "input_modules": leaves["input"],
            "module_paths": {side: list(names) for side, names in self.targets.items()},
            "lr": self.cfg.lr,
        }


def check(cfg: IA3Config) -> None:
    """Reject values that cannot work, before any model is built."""
    given = [getattr(cfg, k) for k in ("target_modules", "feedforward_modules")]
    if all(v is not None and len(v) == 0 for v in given):
        raise ConfigError(
            "method.target_modules=[]: with method.feedforward_modules=[] nothing is scaled; allowed: at least "
            "one module on either side, or null to use the architecture's preset"
        )
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"method.lr={cfg.lr}: must be > 0, or null to require train.lr")
