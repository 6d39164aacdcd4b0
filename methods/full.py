"""Full fine-tuning: every parameter of the base model is trained.

The baseline every ratio in peftbench is taken against. Nothing is injected; the checkpoint
is the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from methods import register


@dataclass
class FullConfig:
    """Settings of ``method=full``; ``lr`` is the method's default learning rate."""

    name: str = "full"
    lr: Optional[float] = 5e-5


@register
class Full:
    name = "full"
    config_class = FullConfig
    mergeable = False  # nothing to fold: the weights are the model
    identity_at_init = True
    context_tokens = 0
    trains_base = True  # the base weights are trained: no quantized base (model.quantize)

    def __init__(self, cfg: FullConfig):
        self.cfg = cfg

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def adapter_names(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters()}

    def merge(self, model: nn.Module) -> bool:
        return False

    def unmerge(self, model: nn.Module) -> bool:
        return False

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return {"name": self.name, "lr": self.cfg.lr}
