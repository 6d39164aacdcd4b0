"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

The frozen weight W (out x in) is split into a magnitude and a direction, and LoRA adapts the
direction only::

    W' = m * (W + s B A) / ||W + s B A||_c        m: (out,), trainable
    y  = x W'^T + b

||.||_c is the L2 norm of each output feature's row (over the ``in`` inputs), one number per
output feature, as peft computes it. m starts at ||W||_c and B at zero, so at step 0 W' = W
and the model equals the base model. A, B, s, the targets and the presets are LoRA's
(``methods/lora.py``); DoRA trains r * (in + out) + out scalars per wrapped layer.

The norm is treated as a constant in backward (detached), as the paper suggests (section 4.3:
"we suggest treating ||V + dV||_c as a constant ... it won't receive any gradient") and as peft
0.21 does; the forward value still follows B A. Computed as peft does, without forming W'::

    y = base(x) + (m / n - 1) * (x W^T) + (m / n) * s * x A^T B^T,   n = ||W + s B A||_c

Merging writes W' into the base weight (so inference costs what the base model costs); the
norm n used is kept, so that unmerge can recover W = W' n / m - s B A (exact up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import nn

from methods import QuantizedBase, register
from methods.arch import in_out_features
from methods.lora import LoRA, LoRAConfig, LoRALayer


@dataclass
class DoRAConfig(LoRAConfig):
    """Settings of ``method=dora``: LoRA's (rank, alpha, dropout, targets, target_modules,
    rslora, lr, lr_ratio); the magnitude vector adds no setting."""

    name: str = "dora"


class DoRALayer(LoRALayer):
    """A frozen ``nn.Linear`` or ``Conv1D`` with a trainable magnitude and low-rank direction."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, rslora: bool):
        super().__init__(base, rank, alpha, dropout, rslora)
        w = cast(torch.Tensor, base.weight)
        self.lora_magnitude = nn.Parameter(torch.empty(in_out_features(base)[1], dtype=w.dtype, device=w.device))
        if w.device.type != "meta":
            with torch.no_grad():
                self.lora_magnitude.copy_(self.weight_norm())  # ||W||_c: B = 0
        self.merged_norm: Optional[torch.Tensor] = None  # n at merge time, for unmerge

    def base_weight(self) -> torch.Tensor:
        """W as (out, in), whatever the base layer's layout."""
        if hasattr(self.base, "dense_weight"):  # a quantized base (peftbench.quantize): dequantized
            return cast(QuantizedBase, self.base).dense_weight()
        w = cast(torch.Tensor, self.base.weight)
        return w.T if self.transposed else w

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ||W + s B A||_c, (out,), with no gradient (the paper's section 4.3)."""
        w = self.base_weight()
        return torch.linalg.norm(w + self.scaling * (self.lora_B @ self.lora_A).to(w.dtype), dim=1).to(w.dtype)

    def delta_weight(self) -> torch.Tensor:
        """W' - W in the base weight's layout. Unmerged: from the current W (and the norm is kept);
        merged: from the merged weight and the kept norm, so that W' - delta = W."""
        low_rank = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        if not self.merged:
            self.merged_norm = self.weight_norm()
            w = self.base_weight()
            scale = (self.lora_magnitude / self.merged_norm)[:, None]  # (out, 1)
            delta = scale * (w + low_rank) - w
        else:
            merged = self.base_weight()
            assert self.merged_norm is not None  # kept by merge's call of the branch above
            scale = (self.lora_magnitude / self.merged_norm)[:, None]
            delta = merged - (merged / scale - low_rank)
        return delta.T if self.transposed else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        x = self.dropout(x)
        scale = self.lora_magnitude / self.weight_norm()  # (out,)
        if isinstance(self.dropout, nn.Identity):  # x W^T is the base output less its bias
            wx = y - self.base.bias if self.base.bias is not None else y
        else:
            wx = x @ self.base_weight().T
        # (..., in) -> (..., r) -> (..., out)
        lora = (x @ self.lora_A.T @ self.lora_B.T) * self.scaling
        return y + (scale - 1) * wx + scale * lora


@register
class DoRA(LoRA):
    name = "dora"
    config_class = DoRAConfig
    layer_class = DoRALayer
    mergeable = True
    identity_at_init = True  # B = 0 and m = ||W||_c

    def trainable_closed_form(self, model: nn.Module) -> int:
        """r * (in + out) + out per wrapped layer."""
        return sum(
            self.cfg.rank * sum(in_out_features(layer.base)) + in_out_features(layer.base)[1]
            for layer in self.layers(model)
        )

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return {**super().describe(model), "norm": "detached"}
