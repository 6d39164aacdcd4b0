"""LoRA+: LoRA with a higher learning rate for B than for A (Hayou et al., 2024).

The model is exactly LoRA's (``methods/lora.py``: same layers, count, merge); only the
optimizer differs. With learning rate eta for A, B trains at lr_ratio * eta; the paper's
analysis of feature learning in wide networks gives B the larger step, and its default ratio
is 16. The task head and any other trainable parameter train at eta.

``method=loraplus`` is ``method=lora method.lr_ratio=16`` under its own name, so that the
config option, this module and the row in the results agree (``lora lr_ratio=16`` is the same
run labelled as a LoRA setting). The groups are LoRA's ``param_groups``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from methods import register
from methods.lora import LoRA, LoRAConfig


@dataclass
class LoRAPlusConfig(LoRAConfig):
    """Settings of ``method=loraplus``: LoRA's, with ``lr_ratio`` (B's rate / A's) 16 by default."""

    name: str = "loraplus"
    lr_ratio: Optional[float] = 16.0


@register
class LoRAPlus(LoRA):
    name = "loraplus"
    config_class = LoRAPlusConfig
