"""A frozen base stored quantized (``model.quantize: nf4 | int8``), as in QLoRA (Dettmers et al., 2023).

Every linear layer of the base but the output layer and the task heads (the layers LoRA's
``all-linear`` preset targets, and what QLoRA and bitsandbytes quantize: all linear layers but
the LM head) becomes a ``QuantizedLinear``: its weight W (out x in) is stored quantized and
frozen, and dequantized on the fly, in the input's dtype, in the forward and in the backward
(which gives only the input's gradient). What a method adds (LoRA's A and B, adapters, prefix
vectors) stays in the model's dtype. Embeddings, norms and biases stay as they are.

- ``nf4``: 4-bit NormalFloat with double quantization. W is cut into blocks of 64 values in
  row-major order; each value is the index (4 bits, two per byte) of the nearest of 16
  normal-distribution quantiles of the block scaled by its absmax; the absmax scalers, less
  their mean, are quantized to int8 in blocks of ``scaler_block_size`` with one factor each.
- ``int8``: symmetric per-output-row int8 (weight-only): W[o] = q[o] * scale[o].

The library is torchao (``NF4Tensor``, ``Int8Tensor``), not bitsandbytes. Both are
quantized tensors that autograd can use; torchao's are traceable wrapper subclasses made of
plain tensors (``__tensor_flatten__``), so ``peftbench.memory`` counts their storages exactly,
and its kernels are plain PyTorch operators, so one code path runs on CPU and CUDA and the FLOP
counter sees the same matmuls as for a dense base. bitsandbytes (0.50 ships CPU kernels too)
keeps a 4-bit weight's absmax and code tables in a Python ``QuantState`` the tracker cannot
reach, and needs its native library on every device.

Exact bytes of the stored tensors (``quantized_bytes``; e = bytes per element of the model's
dtype, n = numel, out = rows), as torchao 0.18 builds them:

- nf4: packed values n/2 (uint8) + block scalers n/64 (int8) + one quantization factor per
  scaler block n/64/scaler_block_size (dtype e) + the scalers' mean (e) + the 16-entry NF4
  lookup table, stored once per tensor (16 e). torchao requires n/64 to be a multiple of the
  scaler block size; it is the largest divisor of n/64 up to 256 (QLoRA's 256), so every
  shape whose size is a multiple of 64 is quantized; other layers stay dense (named in the
  record).
- int8: values n (int8) + per-row scale (float32, 4 out) + per-row zero point (int8, out).

Merging (LoRA) into a quantized base is a dequantize-merge: the layer's weight becomes the dense
dequantized W plus the update, in the model's dtype, and the quantized tensor is kept aside;
unmerging puts the very same quantized tensor back, bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from methods import module_parent
from methods.arch import HEAD_NAMES, LINEAR_TYPES

if TYPE_CHECKING:
    from torch.utils._python_dispatch import TraceableWrapperSubclass

SCHEMES = ("nf4", "int8")
NF4_BLOCK = 64  # values per absmax block (QLoRA's 64)
NF4_SCALER_BLOCK = 256  # block scalers per quantization factor, at most (QLoRA's 256)
NF4_CODES = 16  # entries of the NF4 lookup table torchao stores with each tensor


def _torchao() -> Any:
    """torchao with its quantized tensors imported (its import warnings are muted in ``peftbench``)."""
    import torchao
    import torchao.quantization  # noqa: F401
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor  # noqa: F401

    return torchao


def nf4_scaler_block_size(numel: int) -> int:
    """Block scalers per quantization factor for an NF4 tensor of ``numel`` values: the largest
    divisor of its ``numel / 64`` blocks up to 256 (torchao needs an exact division)."""
    blocks = numel // NF4_BLOCK
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, blocks) + 1) if blocks % d == 0)


def can_quantize(shape: tuple[int, int], scheme: str) -> bool:
    """Whether a weight of ``shape`` (out, in) can be stored in ``scheme`` (nf4: whole blocks)."""
    return scheme == "int8" or (shape[0] * shape[1]) % NF4_BLOCK == 0


def quantized_bytes(shape: tuple[int, int], scheme: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the tensors stored for a weight of ``shape`` (out, in) of ``dtype`` (module docstring)."""
    out_features, in_features = shape
    n = out_features * in_features
    if scheme == "int8":
        return n + out_features * (4 + 1)
    e = torch.empty((), dtype=dtype).element_size()
    factors = n // NF4_BLOCK // nf4_scaler_block_size(n)
    return n // 2 + n // NF4_BLOCK + factors * e + e + NF4_CODES * e


def _compact(t: TraceableWrapperSubclass) -> torch.Tensor:
    """``t`` rebuilt from inner tensors that own exactly their bytes: torchao keeps NF4's one
    quantization factor as a view of a whole scaler block when there is a single block."""
    names, meta = t.__tensor_flatten__()
    inner = {}
    for name in names:
        x = getattr(t, name)
        inner[name] = x.clone() if x.untyped_storage().nbytes() != x.numel() * x.element_size() else x
    return type(t).__tensor_unflatten__(inner, meta, t.size(), t.stride())


def quantize_weight(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """The torchao tensor storing ``w`` (out, in) in ``scheme``; same shape and logical dtype."""
    _torchao()
    w = w.detach().contiguous()
    if scheme == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        return _compact(to_nf4(w, NF4_BLOCK, nf4_scaler_block_size(w.numel())))
    if scheme == "int8":
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow

        return Int8Tensor.from_hp(w, PerRow())
    raise ValueError(f"scheme={scheme}: allowed: {', '.join(SCHEMES)}")


def dequantize(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense (out, in) weight of a quantized tensor, in ``dtype``."""
    if hasattr(w, "get_original_weight"):  # NF4Tensor
        return w.get_original_weight().to(dtype)
    return w.dequantize(dtype)  # type: ignore[call-arg]  # torchao's Int8Tensor.dequantize takes the output dtype


class _Int8Linear(torch.autograd.Function):
    """x W^T for an int8 W, dequantized in the forward and again in the backward, so the graph
    holds the int8 tensor, not a dense copy (torchao's own int8 ``F.linear`` keeps the
    dequantized weight for the backward, as large as the dense layer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize(weight, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ dequantize(weight, grad.dtype), None


class QuantizedLinear(nn.Linear):
    """A frozen linear layer whose weight (out, in) is a torchao quantized tensor.

    An ``nn.Linear`` so that whatever finds linear layers by type (LoRA's targets, adapters'
    insertion points) finds it, as bitsandbytes' ``Linear4bit`` is. ``weight`` is a frozen
    ``nn.Parameter`` holding the quantized tensor (its ``numel`` is the logical count, so
    parameter counts do not change); ``bias`` is the original one, unchanged.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[nn.Parameter], scheme: str):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a dense weight
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        self.weight = nn.Parameter(quantize_weight(weight, scheme), requires_grad=False)
        self.register_parameter("bias", bias)
        self._quantized: Optional[nn.Parameter] = None  # the stored weight while a delta is merged

    @classmethod
    def from_module(cls, module: nn.Module, scheme: str) -> QuantizedLinear:
        """The quantized copy of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight (in, out))."""
        w = module.weight if isinstance(module, nn.Linear) else cast(torch.Tensor, module.weight).T
        return cls(w, cast(Optional[nn.Parameter], module.bias), scheme)

    @property
    def merged(self) -> bool:
        return self._quantized is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.scheme == "nf4":
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

            y = linear_nf4(x, self.weight)
        else:
            y = _Int8Linear.apply(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        """W (out, in), dense in the model's dtype: dequantized, or the merged weight. For methods
        that read the base weight (DoRA's column norms, (IA)^3's merge)."""
        return self.weight if self.merged else dequantize(self.weight, self.weight.dtype)

    @torch.no_grad()
    def merge_delta(self, delta: torch.Tensor) -> None:
        """Weight := dequantized W + ``delta`` (out, in), dense in the model's dtype; the
        quantized tensor is kept aside for ``unmerge_delta``."""
        if self.merged:
            raise RuntimeError("QuantizedLinear.merge_delta: a delta is already merged")
        q = self.weight
        self.weight = nn.Parameter(dequantize(q, q.dtype) + delta.to(q.dtype), requires_grad=False)
        object.__setattr__(self, "_quantized", q)  # not registered: no parameter of the merged model

    @torch.no_grad()
    def unmerge_delta(self) -> None:
        """Put the stored quantized weight back (bit for bit) and drop the dense one."""
        if self.merged:
            assert self._quantized is not None  # merged means kept aside
            self.weight = self._quantized
            object.__setattr__(self, "_quantized", None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}"


def scheme_of(model: nn.Module) -> Optional[str]:
    """The scheme(s) ``model``'s base weights are stored in (``nf4``), None for a dense base."""
    schemes = sorted({m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)})
    return ",".join(schemes) or None


def quantize_base(model: nn.Module, scheme: str, skip_names: tuple[str, ...] = HEAD_NAMES) -> dict[str, Any]:
    """Replace every ``nn.Linear`` / ``Conv1D`` of ``model`` whose dotted name has no part in
    ``skip_names`` by a ``QuantizedLinear``; returns what was done, for the run record.

    ``dense_weight_bytes`` / ``quantized_weight_bytes``: bytes of those weights before and
    after (closed form, ``quantized_bytes``); ``modules_left_dense``: layers whose size nf4
    cannot block (not a multiple of 64 values).
    """
    torchao = _torchao()
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LINEAR_TYPES)
        and not isinstance(m, QuantizedLinear)
        and not any(part in skip_names for part in name.split("."))
    ]
    dense_bytes = quant_bytes = 0
    left_dense, scaler_blocks = [], set()
    for name, m in targets:
        w = m.weight if isinstance(m, nn.Linear) else cast(torch.Tensor, m.weight).T
        shape = cast(tuple[int, int], tuple(w.shape))  # (out, in)
        if not can_quantize(shape, scheme):
            left_dense.append(name)
            continue
        parent, attr = module_parent(model, name)
        setattr(parent, attr, QuantizedLinear.from_module(m, scheme))
        dense_bytes += w.numel() * w.element_size()
        quant_bytes += quantized_bytes(shape, scheme, w.dtype)
        if scheme == "nf4":
            scaler_blocks.add(nf4_scaler_block_size(w.numel()))
    out: dict[str, Any] = {"scheme": scheme, "library": "torchao", "library_version": torchao.__version__}
    if scheme == "nf4":
        out.update(block_size=NF4_BLOCK, scaler_block_sizes=sorted(scaler_blocks), double_quant=True)
    else:
        out.update(granularity="per output row", symmetric=True)
    out.update(
        modules_quantized=len(targets) - len(left_dense),
        modules_left_dense=left_dense,
        skipped=list(skip_names),
        dense_weight_bytes=dense_bytes,
        quantized_weight_bytes=quant_bytes,
        saved_bytes=dense_bytes - quant_bytes,
    )
    return out
