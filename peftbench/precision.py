"""Numeric precision of a run (``train.precision``), one of the cost levers.

- ``fp32``: float32 weights, gradients, optimizer state and compute.
- ``bf16-mixed``: float32 weights ("master weights"), gradients and AdamW state; the forward
  runs under ``torch.autocast(dtype=bfloat16)``, which computes matrix products in bfloat16
  from bfloat16 copies of the weights (autocast caches those copies for the duration of the
  forward: the memory tracker counts them as activations) and keeps reductions, softmax and
  the loss in float32. Backward runs in the dtypes the forward chose.
- ``bf16``: pure bfloat16: the weights are cast to bfloat16 before the method is applied, so
  gradients and AdamW state are bfloat16 too (half the bytes of every category; updates
  smaller than bfloat16's resolution of the weight are lost, the known cost of this lever).
- ``fp16-mixed``: as bf16-mixed with float16, plus a dynamic loss scaler
  (``torch.amp.GradScaler``) against float16's narrow range. CUDA only, as in practice.

Which precision may run where is checked with the config (``config.check_precision``).
Evaluation, generation, forgetting and the inference measurements run under the same
autocast as training, so a run's figures all describe one numeric setting.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from peftbench.config import PRECISIONS  # noqa: F401 (the values, declared with the checks)

MIXED = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}  # config.MIXED_PRECISIONS


def weight_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype the base weights are cast to before the method is applied (None: as loaded)."""
    return torch.bfloat16 if precision == "bf16" else None


def compute_dtype(precision: str, weights: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in (the one a device's peak FLOP/s is quoted for)."""
    return MIXED.get(precision, torch.bfloat16 if precision == "bf16" else weights)


def autocast(precision: str, device: torch.device) -> Any:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32 and bf16)."""
    dtype = MIXED.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """fp16-mixed's dynamic loss scaler, or None."""
    return torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
