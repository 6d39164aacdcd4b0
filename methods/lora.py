"""LoRA: low-rank adaptation of frozen linear weights (Hu et al., 2021).

For a frozen weight W (out x in) the layer computes

    y = x W^T + s * dropout(x) A^T B^T,      A: (r x in), B: (out x r), s = alpha / r

(rsLoRA: s = alpha / sqrt(r)). B starts at zero, so at step 0 the model equals the base
model. After training, s * B A can be added into W ("merge"), and inference then costs
exactly what the base model costs. GPT-2's ``Conv1D`` stores W transposed (in x out), so
its merge adds (s * B A)^T.

Targets are chosen by module name, or by a per-architecture preset: ``attention`` (the
paper's choice: the query and value projections; GPT-2's fused ``c_attn``, which LoRA then
adapts for query, key and value at once, as peft does) or ``all-linear`` (every linear layer
but the output layer and the task head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import nn

from methods import ConfigError, QuantizedBase, freeze_all_but, match_modules, module_parent, register
from methods.arch import ATTENTION_TARGETS, LINEAR_TYPES, in_head, in_out_features, is_transposed, table_entry

PRESETS = ("attention", "all-linear")
# ``all-linear`` leaves the output layers and task heads alone (``arch.HEAD_NAMES``): a task
# head is freshly initialised and trained whole by the harness, so a low-rank update on it would
# only duplicate parameters. This matches peft's ``target_modules="all-linear"`` with
# ``task_type="SEQ_CLS"`` (classifier excluded, trained as modules_to_save) and for causal LMs
# (output embedding excluded); peft without a task type would also wrap the classifier.
# Pretrained layers next to the head, such as BERT's ``pooler.dense``, are targeted, as in peft
# (tests/test_lora.py checks the wrapped set against peft on LLaMA, GPT-2 and BERT).


@dataclass
class LoRAConfig:
    """Settings of ``method=lora``.

    rank: r, the inner dimension of B A. alpha: scale numerator. dropout: probability on the
    LoRA branch input. targets: preset used when ``target_modules`` is null. rslora: scale
    by alpha/sqrt(r). lr: the method's default learning rate. lr_ratio: LoRA+ (Hayou et al.,
    2024): B trains at lr_ratio x the learning rate of A (null: plain LoRA, one rate).
    """

    name: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attention"
    target_modules: Optional[list[str]] = None
    rslora: bool = False
    lr: Optional[float] = 1e-3
    lr_ratio: Optional[float] = None


class LoRALayer(nn.Module):
    """A frozen ``nn.Linear`` or ``Conv1D`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.base = base
        self.transposed = is_transposed(base)  # Conv1D: weight is (in, out)
        w = cast(torch.Tensor, base.weight)
        in_features, out_features = in_out_features(base)
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=w.dtype, device=w.device))
        if w.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """s * B A in the base weight's layout: (out, in) for Linear, (in, out) for Conv1D."""
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            if hasattr(self.base, "merge_delta"):  # a quantized base: dequantize-merge
                cast(QuantizedBase, self.base).merge_delta(self.delta_weight())
            else:
                weight = cast(torch.Tensor, self.base.weight)
                weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            if hasattr(self.base, "unmerge_delta"):  # the stored quantized weight, bit for bit
                cast(QuantizedBase, self.base).unmerge_delta()
            else:
                weight = cast(torch.Tensor, self.base.weight)
                weight -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # (..., in) -> (..., r) -> (..., out)
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


@register
class LoRA:
    name = "lora"
    config_class = LoRAConfig
    layer_class = LoRALayer
    mergeable = True
    identity_at_init = True  # B = 0
    context_tokens = 0
    label_keys = ("rank",)  # the setting that names a run (compare.run_name)

    def __init__(self, cfg: LoRAConfig):
        check(cfg)
        self.cfg = cfg
        self.targets: list[str] = []

    def resolve_targets(self, model: nn.Module) -> list[str]:
        """Dotted names of the modules this config wraps in ``model``."""
        cfg = self.cfg
        if cfg.target_modules:
            names = match_modules(model, list(cfg.target_modules), LINEAR_TYPES)
            if not names:
                leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})
                raise ConfigError(
                    f"method.target_modules={list(cfg.target_modules)}: matches no linear layer of this "
                    f"{getattr(getattr(model, 'config', None), 'model_type', None)} model; allowed: names among "
                    f"{', '.join(leaves)} or regular expressions"
                )
            return names
        if cfg.targets == "all-linear":
            return [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and not in_head(n)]
        fix = "method.target_modules=[...] or method.targets=all-linear"
        return match_modules(
            model, table_entry(ATTENTION_TARGETS, model, "method.targets=attention", fix), LINEAR_TYPES
        )

    def new_layer(self, base: nn.Module) -> LoRALayer:
        cfg = self.cfg
        return self.layer_class(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)

    def apply(self, model: nn.Module) -> nn.Module:
        self.targets = self.resolve_targets(model)
        for name in self.targets:
            parent, attr = module_parent(model, name)
            setattr(parent, attr, self.new_layer(getattr(parent, attr)))
        freeze_all_but(model, self.adapter_names(model))
        return model

    def adapter_names(self, model: nn.Module) -> set[str]:
        """The parameters of this method's own layers (not of the base layers they hold)."""
        return {
            f"{name}.{p}"
            for name, m in model.named_modules()
            if type(m) is self.layer_class
            for p, _ in m.named_parameters(recurse=False)
        }

    def trainable_closed_form(self, model: nn.Module) -> int:
        """r * (in + out) per wrapped layer."""
        return sum(self.cfg.rank * sum(in_out_features(layer.base)) for layer in self.layers(model))

    def layers(self, model: nn.Module) -> list[LoRALayer]:
        """This method's layers in ``model`` (exactly ``layer_class``: DoRA's are not LoRA's)."""
        return [m for m in model.modules() if type(m) is self.layer_class]

    def merge(self, model: nn.Module) -> bool:
        for layer in self.layers(model):
            layer.merge()
        return True

    def unmerge(self, model: nn.Module) -> bool:
        for layer in self.layers(model):
            layer.unmerge()
        return True

    def param_groups(self, model: nn.Module, lr: float) -> Optional[list[dict[str, Any]]]:
        """LoRA+ (``lr_ratio`` set): every B at lr_ratio x ``lr``; every other trainable
        parameter (A, a task head) at ``lr``. Plain LoRA: None, the loop's one group."""
        ratio = self.cfg.lr_ratio
        if ratio is None:
            return None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        fast = [p for n, p in named if n.endswith(".lora_B")]
        rest = [p for n, p in named if not n.endswith(".lora_B")]
        return [{"params": rest, "lr": lr}, {"params": fast, "lr": lr * ratio}]

    def describe(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "name": self.name,
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "scaling": cfg.alpha / math.sqrt(cfg.rank) if cfg.rslora else cfg.alpha / cfg.rank,
            "dropout": cfg.dropout,
            "rslora": cfg.rslora,
            "targets": cfg.targets if not cfg.target_modules else "explicit",
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in self.targets}),
            "target_module_paths": list(self.targets),
            "lr": cfg.lr,
            "lr_ratio": cfg.lr_ratio,
        }


def check(cfg: LoRAConfig) -> None:
    """Reject values that cannot work, before any model is built."""
    if not isinstance(cfg.rank, int) or isinstance(cfg.rank, bool) or cfg.rank < 1:
        raise ConfigError(f"method.rank={cfg.rank}: LoRA rank must be an integer >= 1")
    if not cfg.alpha > 0:
        raise ConfigError(f"method.alpha={cfg.alpha}: must be > 0")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"method.dropout={cfg.dropout}: must be in [0, 1)")
    if cfg.targets not in PRESETS:
        raise ConfigError(f"method.targets={cfg.targets}: allowed: {', '.join(PRESETS)}")
    if cfg.target_modules is not None and len(cfg.target_modules) == 0:
        raise ConfigError("method.target_modules=[]: give at least one module name, or null to use method.targets")
    if cfg.lr_ratio is not None and not (isinstance(cfg.lr_ratio, (int, float)) and cfg.lr_ratio > 0):
        raise ConfigError(f"method.lr_ratio={cfg.lr_ratio}: must be > 0 (LoRA+ uses 16), or null for plain LoRA")
