"""Measurements outside the training loop: memory per phase, FLOPs, prefill latency grid,
decode latency, checkpoint size, and model FLOP utilisation on known GPUs.

Every figure has its unit in its name (``_bytes``, ``_ms``, ``_flops``); docs/METHODOLOGY.md
says how each is taken. Memory and FLOPs are always counted in their own untimed passes, so
that neither instrument slows a timed one.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Optional, cast

import torch
from torch import nn

from peftbench.memory import TensorMemoryTracker
from peftbench.timing import PhaseClock, Stopwatch, repeat, stats, synchronize

# Dense peak throughput in TFLOP/s (bf16/fp16, tf32, fp32), by the whole name that
# ``torch.cuda.get_device_name`` returns, form factor included (an H100 PCIe is not an H100 SXM,
# an L40 is not an L4). Tensor-core figures are the datasheets' "with sparsity" figures halved;
# fp32 is the non-tensor figure. A name not here gets no MFU.
GPU_PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column (to the Hopper whitepaper's precision) and PCIe
    "NVIDIA H100 80GB HBM3": (989.4, 494.7, 66.9),
    "NVIDIA H100 PCIe": (756.5, 378.0, 51.0),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 SXM, H200 NVL columns
    "NVIDIA H200": (989.4, 494.7, 66.9),
    "NVIDIA H200 NVL": (835.5, 417.5, 60.0),
    # NVIDIA A100 Tensor Core GPU datasheet: the same peaks for SXM4 and PCIe, 40 and 80 GB
    "NVIDIA A100-SXM4-40GB": (312.0, 156.0, 19.5),
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0, 19.5),
    "NVIDIA A100-PCIE-40GB": (312.0, 156.0, 19.5),
    "NVIDIA A100 80GB PCIe": (312.0, 156.0, 19.5),
    "NVIDIA L4": (121.0, 60.0, 30.3),  # NVIDIA L4 Tensor Core GPU datasheet
    "NVIDIA L40": (181.05, 90.5, 90.5),  # NVIDIA L40 datasheet
    "NVIDIA L40S": (362.05, 183.0, 91.6),  # NVIDIA L40S datasheet
}


# ------------------------------------------------------------------------------ memory


def cuda_reset(device: torch.device, release: bool = True) -> None:
    """Start a CUDA memory window: finish pending work, release the allocator's free cache
    (``release``: so that the window's reserved bytes are its own, not what an earlier phase
    left cached), then reset the allocator's peaks."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if release:
            gc.collect()  # tensors held only by reference cycles (an optimizer and its schedule)
            with torch.cuda.device(device):
                torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cuda_phase_stats(
    device: torch.device, phase: str, tracker: Optional[TensorMemoryTracker] = None
) -> dict[str, Optional[int]]:
    """The caching allocator's figures since the last ``cuda_reset`` (empty off CUDA).

    ``cuda_<phase>_max_allocated_bytes`` / ``_max_reserved_bytes``: ``torch.cuda`` peaks.
    ``cuda_<phase>_requested_peak_bytes``: peak of the bytes requested (before the allocator
    rounds them up and leaves blocks unsplit), the figure the tracker's peak is checked against.
    ``cuda_<phase>_peak_large_blocks`` / ``_peak_small_blocks``: peak count of live blocks in
    the large pool (requests over 1 MiB) and the small pool, which bound allocated - requested.
    ``cuda_<phase>_untracked_bytes``: bytes requested but not held by any tensor the tracker
    sees, now (cuBLAS workspaces, say).
    """
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    s = torch.cuda.memory_stats(device)
    out = {
        f"cuda_{phase}_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        f"cuda_{phase}_max_reserved_bytes": torch.cuda.max_memory_reserved(device),
        f"cuda_{phase}_requested_peak_bytes": s.get("requested_bytes.all.peak"),
        f"cuda_{phase}_peak_large_blocks": s.get("allocation.large_pool.peak"),
        f"cuda_{phase}_peak_small_blocks": s.get("allocation.small_pool.peak"),
    }
    if tracker is not None:
        out[f"cuda_{phase}_untracked_bytes"] = s.get("requested_bytes.all.current", 0) - tracker.current
    return out


def phase_memory(
    model: nn.Module, device: torch.device, phase: str, fn: Callable[[], Any], extra: Iterable[torch.Tensor] = ()
) -> dict[str, Optional[int]]:
    """Run ``fn`` once under the tensor tracker (and the CUDA allocator's peak counters).

    Returns ``<phase>_peak_memory_bytes`` with its ``<phase>_memory_weights_bytes`` and
    ``<phase>_memory_activations_bytes`` (nothing else is live outside training), and the
    ``cuda_<phase>_*`` figures on a GPU.
    """
    cuda_reset(device)
    tracker = TensorMemoryTracker(model, None, device, extra=extra)
    try:
        with tracker:
            fn()
        cuda = cuda_phase_stats(device, phase, tracker)
        full = tracker.summary()
    finally:
        tracker.close()
    out: dict[str, Optional[int]] = {
        f"{phase}_peak_memory_bytes": full["peak_memory_bytes"],
        f"{phase}_memory_weights_bytes": full["memory_weights_bytes"],
        f"{phase}_memory_activations_bytes": full["memory_activations_bytes"],
    }
    out.update(cuda)
    return out


# ------------------------------------------------------------------------------ FLOPs


def _attention(query, key, value, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one attention forward from its shapes, as for the CUDA kernels."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _attention_backward(grad_out, query, key, value, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one attention backward from its shapes, as for the CUDA kernels."""
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> Any:
    """A ``FlopCounterMode`` that counts the CPU's fused attention kernel with the formula
    PyTorch applies to the CUDA ones (flash, efficient, cuDNN), which it leaves uncounted on
    its own, so that FLOPs do not depend on the device."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: _attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward,
    }
    return FlopCounterMode(display=False, custom_mapping=cpu_attention)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products (mm, bmm, addmm, convolution, attention, forward and
    backward) that ``fn`` runs, as ``flop_counter`` counts them (2 per multiply-add; elementwise
    work, norms and the optimizer are not counted)."""
    counter = flop_counter()
    with counter:
        fn()
    return int(counter.get_total_flops())


def fp32_matmul_uses_tf32() -> bool:
    """Whether float32 CUDA matmuls may run on TF32 (or faster) tensor cores. Read through
    ``torch.backends.cuda.matmul.fp32_precision``: the legacy getters (``allow_tf32``,
    ``torch.get_float32_matmul_precision()``) raise once the newer API has been used."""
    mode = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if mode is None:  # torch without the newer API
        return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    if mode == "none":  # inherits the global setting
        mode = getattr(torch.backends, "fp32_precision", "none")
    return mode not in ("none", "ieee")


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Dense peak FLOP/s of the GPU for ``dtype`` matmuls, or None (CPU, a GPU not in
    ``GPU_PEAK_TFLOPS``). float32 counts as TF32 when PyTorch lets matmuls use it."""
    if device.type != "cuda":
        return None
    figures = GPU_PEAK_TFLOPS.get(torch.cuda.get_device_name(device).strip())
    if figures is None:
        return None
    half, tf32, fp32 = figures
    if dtype in (torch.bfloat16, torch.float16):
        tflops = half
    else:
        tflops = tf32 if fp32_matmul_uses_tf32() else fp32
    return tflops * 1e12


# ---------------------------------------------------------------------------- latency


def latency_inputs(vocab_size: int, batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Seeded random token ids of shape (batch, length), ids 4.. (past the special tokens), no padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, max(vocab_size, 5), (batch, length), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def forward_latency(
    model: nn.Module, inputs: dict, device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median and IQR (ms) of one no-grad forward pass (prefill) over ``inputs``."""
    model.eval()
    with torch.no_grad():
        ms = repeat(lambda: model(**inputs), device, warmup, repeats)
    return stats(ms)


def grid_points(m: Any) -> list[tuple[int, int]]:
    """(batch, length) of every grid point, batch-major."""
    return [(b, n) for b in m.latency_grid_batches for n in m.latency_grid_lengths]


def latency_grid(model: nn.Module, vocab_size: int, device: torch.device, m: Any) -> dict[tuple[int, int], dict]:
    """Prefill latency (median, IQR in ms) at every grid point and at the default point."""
    points = grid_points(m)
    if (m.latency_batch, m.latency_length) not in points:
        points.append((m.latency_batch, m.latency_length))
    out = {}
    for b, n in points:
        inputs = latency_inputs(vocab_size, b, n, device)
        out[(b, n)] = forward_latency(model, inputs, device, m.latency_warmup, m.latency_repeats)
    return out


def decode_latency(
    model: nn.Module, vocab_size: int, pad_id: Optional[int], device: torch.device, m: Any
) -> Optional[dict[str, float]]:
    """Milliseconds per generated token with the KV cache, greedy, prompt of the default point.

    Times ``generate`` for 1 and for N + 1 new tokens (N = ``decode_tokens``, EOS suppressed
    by ``min_new_tokens``), interleaved pair by pair so that drift cancels; the per-pair
    difference over N is the cost of one decode step (prefill and the first token cancel).
    Returns the median and IQR over pairs, or None for a model without ``generate``.
    """
    if not m.decode_tokens or not callable(getattr(model, "generate", None)):
        return None
    inputs = latency_inputs(vocab_size, m.latency_batch, m.latency_length, device)
    model.eval()

    def gen(n: int) -> float:
        with Stopwatch(device) as sw:
            cast(Callable[..., Any], model.generate)(
                **inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id
            )
        return sw.ms

    per_token = []
    with torch.no_grad():
        gen(1), gen(m.decode_tokens + 1)  # warm-up: allocations, first-call work
        synchronize(device)
        for _ in range(m.decode_repeats):
            short, long = gen(1), gen(m.decode_tokens + 1)
            per_token.append((long - short) / m.decode_tokens)
    return stats(per_token)


# ------------------------------------------------------------------------- checkpoint


def checkpoint_size(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """Bytes of the safetensors serialisation of the parameters ``names`` (what a method
    trained and would save), in the model's dtype: ``checkpoint_bytes``, plus
    ``checkpoint_params`` (scalars) and ``checkpoint_tensors``."""
    from safetensors.torch import save

    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().to("cpu").contiguous() for n in sorted(names)}
    size = len(save(tensors))
    return {
        "checkpoint_bytes": size,
        "checkpoint_params": sum(t.numel() for t in tensors.values()),
        "checkpoint_tensors": len(tensors),
    }


# ----------------------------------------------------------------- inference, all of it


@contextmanager
def merged(method: Any, model: nn.Module) -> Iterator[bool]:
    """The model merged for the block if the method can merge (yields whether it did)."""
    did = bool(method.merge(model))
    try:
        yield did
    finally:
        if did:
            method.unmerge(model)


def inference(
    model: nn.Module,
    method: Any,
    vocab_size: int,
    pad_id: Optional[int],
    kind: str,
    device: torch.device,
    m: Any,
    clock: Optional[PhaseClock] = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Everything measured on the finished model: flat metrics and the latency grid.

    Latency and decode are taken as trained first, then, for a method that merges, again
    merged (the deployed form, behind the flat figures); inference memory and FLOPs are
    counted in the deployed form, in their own untimed passes. The lengths were checked
    against the model's context (``config.check_context``) before training. ``clock``: the run's
    phases, the decode measurements in ``decode``.
    """
    default = (m.latency_batch, m.latency_length)

    def timed() -> tuple[dict, Optional[dict]]:
        grid = latency_grid(model, vocab_size, device, m)
        if kind != "causal-lm":
            return grid, None
        with clock.phase("decode") if clock is not None else nullcontext():
            return grid, decode_latency(model, vocab_size, pad_id, device, m)

    as_trained = timed()
    metrics: dict[str, Any] = {"inference_batch": default[0], "inference_length": default[1]}
    with merged(method, model) as did_merge:
        model.eval()
        inputs = latency_inputs(vocab_size, *default, device)
        with torch.no_grad():
            metrics.update(phase_memory(model, device, "inference", lambda: model(**inputs), extra=inputs.values()))
            metrics["inference_flops"] = count_flops(lambda: model(**inputs))
        grid, decode = timed() if did_merge else as_trained
    unmerged_grid, unmerged_decode = as_trained if did_merge else (None, None)

    metrics["inference_latency_ms"] = grid[default]["median"]
    metrics["inference_latency_iqr_ms"] = grid[default]["iqr"]
    metrics["decode_ms_per_token"] = decode["median"] if decode else None
    metrics["decode_ms_per_token_iqr"] = decode["iqr"] if decode else None
    if unmerged_grid is not None:
        metrics["inference_latency_unmerged_ms"] = unmerged_grid[default]["median"]
        metrics["inference_latency_unmerged_iqr_ms"] = unmerged_grid[default]["iqr"]
        metrics["decode_unmerged_ms_per_token"] = unmerged_decode["median"] if unmerged_decode else None
    if decode:
        metrics["decode_new_tokens"] = m.decode_tokens
    rows = []
    for b, n in grid_points(m):
        row = {
            "batch": b,
            "length": n,
            "inference_latency_ms": grid[(b, n)]["median"],
            "inference_latency_iqr_ms": grid[(b, n)]["iqr"],
            "tokens_per_s": b * n / grid[(b, n)]["median"] * 1e3,
        }
        if unmerged_grid is not None:
            row["inference_latency_unmerged_ms"] = unmerged_grid[(b, n)]["median"]
            row["inference_latency_unmerged_iqr_ms"] = unmerged_grid[(b, n)]["iqr"]
        rows.append(row)
    return metrics, rows


def mfu(metrics: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Model FLOP utilisation of training and of the default inference point on a known GPU:
    achieved matmul FLOP/s over the device's dense peak (None elsewhere)."""
    peak = device_peak_flops(device, dtype)
    out: dict[str, Any] = {"device_peak_flops": peak, "train_mfu": None, "train_hfu": None, "inference_mfu": None}
    if peak is None:
        return out
    # MFU counts the model's FLOPs, leaving out the forward that gradient checkpointing
    # recomputes (``train_model_flops_per_token``, measured when it is on); HFU counts every
    # FLOP executed (Chowdhery et al. 2022, PaLM, appendix B).
    model_flops = metrics.get("train_model_flops_per_token") or metrics.get("train_flops_per_token")
    if model_flops and metrics.get("train_padded_tokens_per_s"):
        out["train_mfu"] = model_flops * metrics["train_padded_tokens_per_s"] / peak
        out["train_hfu"] = metrics["train_flops_per_token"] * metrics["train_padded_tokens_per_s"] / peak
    if metrics.get("inference_flops") and metrics.get("inference_latency_ms"):
        out["inference_mfu"] = metrics["inference_flops"] / (metrics["inference_latency_ms"] / 1e3) / peak
    return out
