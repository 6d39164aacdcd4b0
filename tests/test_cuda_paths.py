"""The CUDA code paths, on CPU, with a fake ``torch.cuda``: which window each allocator figure
covers, the cache released between phases, the allocator bound gpu_check applies, FLOPs that
do not depend on the device, the run's GPU made current, GPU names matched whole, the float32
matmul precision read without raising, and gpu_check on a machine without CUDA."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from peftbench import measure
from peftbench.memory import TensorMemoryTracker
from tests.conftest import REPO, compose_config

MIB = 2**20
CUDA = torch.device("cuda")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeAllocator(TensorMemoryTracker):
    """The caching allocator as peftbench reads it, on CPU: allocated = requested = live CPU
    tensor bytes (the tracker's own count, so no rounding); reserved is a cache that grows with
    them and shrinks only on ``empty_cache``; ``highest`` is the peak that no reset clears."""

    def __init__(self) -> None:
        self.reserved = self.peak_reserved = self.highest = 0
        super().__init__(device="cpu")

    def _grow(self, n: int) -> None:
        super()._grow(n)
        self.reserved = max(self.reserved, self.current)
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.highest = max(self.highest, self.current)


class FakeEvent:
    def __init__(self, fake: FakeCuda, **_: object) -> None:
        self.fake = fake

    def record(self, stream: object = None) -> None:
        self.device = stream.device_index if stream is not None else self.fake.current
        self.fake.events.append(self)

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: FakeEvent) -> float:
        return 1.0


class FakeCuda:
    """``torch.cuda`` on a machine with ``count`` GPUs named ``name``, backed by ``FakeAllocator``;
    tensors stay on the CPU (trackers and ``train.to_device`` are patched to match)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str = "NVIDIA H100 80GB HBM3", count: int = 2) -> None:
        from peftbench import train

        self.alloc, self.current, self.events, self.name = FakeAllocator(), 0, [], name
        a = self.alloc
        stats = {
            "is_available": lambda: True,
            "device_count": lambda: count,
            "get_device_name": lambda device=None: self.name,
            "current_device": lambda: self.current,
            "device": self.device,
            "current_stream": lambda device=None: SimpleNamespace(device_index=self.index(device)),
            "Event": lambda **kw: FakeEvent(self, **kw),
            "synchronize": lambda device=None: None,
            "empty_cache": self.empty_cache,
            "reset_peak_memory_stats": self.reset_peaks,
            "max_memory_allocated": lambda device=None: a.peak,
            "max_memory_reserved": lambda device=None: a.peak_reserved,
            "memory_reserved": lambda device=None: a.reserved,
            "memory_stats": lambda device=None: {
                "requested_bytes.all.peak": a.peak,
                "requested_bytes.all.current": a.current,
                "allocation.large_pool.peak": 3,
                "allocation.small_pool.peak": 7,
            },
        }
        for attr, value in stats.items():
            monkeypatch.setattr(torch.cuda, attr, value)
        cpu_tracker = lambda model=None, optimizer=None, device="cpu", **kw: TensorMemoryTracker(  # noqa: E731
            model, optimizer, "cpu", **kw
        )
        monkeypatch.setattr(train, "TensorMemoryTracker", cpu_tracker)
        monkeypatch.setattr(measure, "TensorMemoryTracker", cpu_tracker)
        monkeypatch.setattr(train, "to_device", lambda batch, device: batch)

    def index(self, device: object) -> int:
        index = None if device is None else torch.device(device).index
        return self.current if index is None else index

    @contextmanager
    def device(self, device: object):
        before, self.current = self.current, self.index(device)
        try:
            yield
        finally:
            self.current = before

    def empty_cache(self) -> None:
        self.alloc.reserved = self.alloc.current

    def reset_peaks(self, device: object = None) -> None:
        self.alloc.reset_peak()
        self.alloc.peak_reserved = self.alloc.reserved


@pytest.fixture
def fake_cuda(monkeypatch):
    return FakeCuda(monkeypatch)


def tiny_llama(vocab: int = 512) -> torch.nn.Module:
    from peftbench import models

    cfg = compose_config("model=tiny-llama")
    return models.build(cfg.model, "causal-lm", vocab, 0, 0)


def lm_batches(vocab: int, batch: int, length: int):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(4, vocab, (batch, length), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ------------------------------------------------------------------- 1. windows


def test_train_allocator_figures_cover_the_tracked_steps_and_the_phase_leaves_the_flop_step_out(fake_cuda):
    """The FLOP step holds activations longer: the allocator's train figures must cover the
    memory steps, as the tracker's do, and the whole-phase figure must leave the FLOP step out."""
    from peftbench.config import Levers
    from peftbench.train import train

    model = tiny_llama()
    fake_cuda.alloc.track([*model.parameters(), *model.buffers()])  # on the GPU from the start
    lev = Levers(
        precision="fp32",
        grad_accum=1,
        batch_size=4,
        world_size=1,
        lr=1e-3,
        grad_clip=1.0,
        weight_decay=0.0,
        warmup_steps=0,
        gradient_checkpointing=False,
    )
    with fake_cuda.alloc:
        m = train(model, lm_batches(512, 4, 64), 5, lev, 0, 2, CUDA)["metrics"]
    assert m["cuda_train_max_allocated_bytes"] == m["cuda_train_requested_peak_bytes"]  # one window
    assert abs(m["cuda_train_max_allocated_bytes"] - m["peak_memory_bytes"]) < MIB
    assert m["cuda_train_phase_steps"] == 4  # 5 steps, the FLOP step left out
    assert m["cuda_train_max_allocated_bytes"] <= m["cuda_train_phase_max_allocated_bytes"]
    assert m["cuda_train_phase_max_allocated_bytes"] < fake_cuda.alloc.highest  # the FLOP step's peak
    failed = [c for c in load_gpu_check().phase_checks(m, "train", "peak_memory_bytes") if not c[1]]
    assert not failed


# -------------------------------------------------------------- 2. allocator bound


def fake_record(**metrics: int) -> dict:
    m = {"train_step_ms_median": 1.0, "inference_latency_ms": 1.0, "train_tokens_per_s": 1.0}
    for phase, key in (
        ("train", "peak_memory_bytes"),
        ("eval", "eval_peak_memory_bytes"),
        ("inference", "inference_peak_memory_bytes"),
    ):
        m[key] = 60 * MIB
        m |= {
            f"cuda_{phase}_requested_peak_bytes": 60 * MIB,
            f"cuda_{phase}_untracked_bytes": 0,
            f"cuda_{phase}_max_allocated_bytes": 60 * MIB,
            f"cuda_{phase}_peak_large_blocks": 40,
            f"cuda_{phase}_peak_small_blocks": 10,
        }
    m.update(metrics)
    return {"metrics": m}


def test_allocator_bound_is_per_live_block():
    """40 live tensors of 1.5 MiB, each in a 2.5 MiB block that was not split (at most 1 MiB
    would remain): 100 MiB allocated for 60 MiB requested is within the allocator's rules."""
    gc = load_gpu_check()
    bound = 60 * MIB + 40 * (MIB + 511) + 10 * 511
    ok = gc.phase_checks(fake_record(cuda_train_max_allocated_bytes=100 * MIB)["metrics"], "train", "peak_memory_bytes")
    assert all(c[1] for c in ok), ok
    over = fake_record(cuda_train_max_allocated_bytes=bound + 1)["metrics"]
    assert not all(c[1] for c in gc.phase_checks(over, "train", "peak_memory_bytes"))
    at = fake_record(cuda_train_max_allocated_bytes=bound)["metrics"]
    assert all(c[1] for c in gc.phase_checks(at, "train", "peak_memory_bytes"))


def test_phase_stats_count_the_live_blocks(fake_cuda):
    s = measure.cuda_phase_stats(CUDA, "eval")
    assert s["cuda_eval_peak_large_blocks"] == 3 and s["cuda_eval_peak_small_blocks"] == 7


# ---------------------------------------------------------- 3. reserved per phase


def test_a_phase_reserved_figure_is_not_the_cache_an_earlier_phase_left(fake_cuda):
    model = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    with fake_cuda.alloc:
        big = torch.ones(8 * MIB // 4)  # an earlier phase's 8 MiB, freed, still in the cache
        del big
        assert fake_cuda.alloc.reserved >= 8 * MIB
        with torch.no_grad():
            m = measure.phase_memory(model, CUDA, "inference", lambda: model(x))
    assert 0 < m["cuda_inference_max_reserved_bytes"] < MIB


def test_summary_prints_each_phase_cache_as_its_own():
    from peftbench.summary import _memory

    m = {f"cuda_{p}_max_allocated_bytes": 10 * MIB for p in ("train", "eval", "inference")}
    m |= {f"cuda_{p}_max_reserved_bytes": r * MIB for p, r in (("train", 40), ("eval", 12), ("inference", 11))}
    ((label, text),) = [row for row in _memory(m) if row[0].startswith("CUDA")]
    assert "inference 10.00/11.00" in text and "cache emptied" in text, text


# ------------------------------------------------------------------------ 4. FLOPs


def test_cpu_attention_is_counted_as_the_cuda_kernels_are():
    """The CPU's fused attention kernel is counted with the formula PyTorch uses for the CUDA
    kernels (flash, efficient, cuDNN), forward and backward, grouped-query attention included."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 16, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 4, 16, 32, generator=g, requires_grad=True) for _ in range(2))
    attend = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    forward = sdpa_flop_count(q.shape, k.shape, v.shape)
    assert forward == 4 * 2 * 8 * 16 * 16 * 32
    assert measure.count_flops(attend) == forward
    backward = sdpa_backward_flop_count(q.shape, q.shape, k.shape, v.shape)  # recomputes the scores
    assert backward == 5 * forward // 2
    assert measure.count_flops(lambda: attend().sum().backward()) == forward + backward


def test_tiny_llama_inference_flops_closed_form():
    """One forward of tiny-llama at 1 x 128 tokens: 2 FLOPs per weight per token in the linear
    layers and the head, plus the attention products, 4 * heads * s^2 * head_dim per layer (the
    67 MFLOP that CUDA counted and the CPU did not)."""
    vocab, s, layers, h, kv, d, ff = 512, 128, 4, 256, 4, 32, 688
    model = tiny_llama(vocab).eval()
    inputs = measure.latency_inputs(vocab, 1, s, torch.device("cpu"))
    with torch.no_grad():
        flops = measure.count_flops(lambda: model(**inputs))
    linear = layers * (2 * h * h + 2 * h * kv * d + 3 * h * ff) + h * vocab
    attention = layers * 4 * (h // d) * s * s * d
    assert attention == 67_108_864
    assert flops == 2 * s * linear + attention


# ------------------------------------------------------------------- 5. cuda:N


def test_stopwatch_records_its_events_on_its_own_gpu(fake_cuda):
    from peftbench.timing import Stopwatch

    with Stopwatch(torch.device("cuda:1")) as sw:
        pass
    assert [e.device for e in fake_cuda.events] == [1, 1] and sw.ms == 1.0


def test_the_run_device_is_current_for_the_whole_run(fake_cuda, monkeypatch):
    from peftbench import run

    class Stop(Exception):
        pass

    seen = []

    def load_base(cfg, rec, clock=None):
        seen.append(torch.cuda.current_device())
        raise Stop

    monkeypatch.setattr(run, "load_base", load_base)
    with pytest.raises(Stop):
        run.execute(compose_config("device=cuda:1"), {"metrics": {}})
    assert seen == [1] and fake_cuda.current == 0


# --------------------------------------------------------------------- 6. names

DATASHEET_BF16 = {  # dense bf16 TFLOP/s (None: no MFU)
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": None,
    "NVIDIA H200": 989.4,
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L4": 121.0,
    "NVIDIA L40": 181.05,
    "NVIDIA L40S": 362.05,
    "Tesla T4": None,
    "NVIDIA GeForce RTX 4090": None,
    "NVIDIA H100": None,  # no form factor: not known
}


@pytest.mark.parametrize("name", sorted(DATASHEET_BF16))
def test_gpu_names_match_whole(fake_cuda, name):
    fake_cuda.name = name
    peak = measure.device_peak_flops(CUDA, torch.bfloat16)
    expected = DATASHEET_BF16[name]
    assert peak == (None if expected is None else pytest.approx(expected * 1e12))
    m = measure.mfu({"inference_flops": 1e9, "inference_latency_ms": 1.0}, CUDA, torch.bfloat16)
    assert (m["inference_mfu"] is None) == (expected is None)


# -------------------------------------------------------------- 7. fp32 precision


@pytest.mark.parametrize("mode,tflops", [("tf32", 156.0), ("ieee", 19.5)])
def test_fp32_precision_is_read_through_the_api_that_does_not_raise(fake_cuda, mode, tflops):
    fake_cuda.name = "NVIDIA A100-SXM4-80GB"
    torch.backends.cuda.matmul.fp32_precision = mode
    try:
        assert measure.device_peak_flops(CUDA, torch.float32) == pytest.approx(tflops * 1e12)
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert torch.get_float32_matmul_precision() == "highest"  # the test left no state behind


# ------------------------------------------------------------------- gpu_check


def test_gpu_check_fails_cleanly_without_cuda(capsys):
    assert not torch.cuda.is_available()
    assert load_gpu_check().main([]) == 1
    assert "no CUDA device" in capsys.readouterr().out
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "no CUDA device" in proc.stdout, proc.stdout + proc.stderr[-2000:]
