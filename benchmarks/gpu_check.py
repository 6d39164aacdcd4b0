"""Cross-check peftbench's measurements on a CUDA GPU, one verdict per line.

    python benchmarks/gpu_check.py                 # tiny-llama, full and LoRA
    python benchmarks/gpu_check.py --model gpt2-medium --steps 8

Without a GPU it prints "no CUDA device" and exits 1. In this order it checks:

1. backward runs on autograd's device thread and the tensor tracker (a dispatch mode) still
   sees its operators there;
2. ``requested_bytes.all.peak`` exists in ``torch.cuda.memory_stats`` and resets with the
   peaks; the tracker's peak never exceeds it; and, per phase of each run (train memory steps,
   evaluation, inference; ``tracked`` the tracker's peak, ``requested`` the allocator's peak of
   requested bytes, ``untracked`` what the allocator holds for no tensor at the end of the
   phase, such as cuBLAS workspaces, ``allocated`` = ``torch.cuda.max_memory_allocated`` over
   the same window):

       tracked <= requested <= tracked + untracked + max(2 MiB, 1% of tracked)
       requested <= allocated <= requested + large x (1 MiB + 511) + small x 511

   where large / small are the peak counts of live blocks in the allocator's large pool
   (requests over 1 MiB: rounded up to 512 bytes, and a cached block is not split when at most
   1 MiB would remain) and small pool (rounded up to 512 bytes); default allocator settings
   (``PYTORCH_CUDA_ALLOC_CONF`` without ``max_split_size_mb``, which allows far more);
3. the Stopwatch (CUDA events) agrees with ``perf_counter`` + synchronise on a kernel of known
   length (``torch.cuda._sleep``, calibrated against the wall clock), also on a GPU that is not
   the current one when there are several;
4. each run's ``inference_flops`` equals the same run's count on the CPU (FLOPs must not
   depend on the device; for tiny-llama the attention products are 67,108,864 of them);
5. the eval and inference reserved figures are below training's (the cache is emptied before
   each phase, so a phase's reserved bytes are its own);

then that timings are positive and MFU in (0, 1) on a GPU with a known peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

MIB = 2**20
LARGE_BLOCK_SLACK = MIB + 511  # bytes a live large-pool block may hold beyond its request
SMALL_BLOCK_SLACK = 511
PHASES = (
    ("train", "peak_memory_bytes"),
    ("eval", "eval_peak_memory_bytes"),
    ("inference", "inference_peak_memory_bytes"),
)
Check = tuple[str, bool, str]  # (what, passed, detail)


def overrides(model: str, method: str, steps: int, device: str, out: str) -> list[str]:
    """The command line of one checked run (small: 256 training examples, 32 for evaluation)."""
    return [
        f"model={model}",
        f"method={method}",
        f"device={device}",
        f"train.steps={steps}",
        "train.timing_warmup=3",
        "task.num_train=256",
        "task.num_eval=32",
        "measure.latency_repeats=10",
        "measure.decode_repeats=3",
        f"results_dir={out}",
    ]


def run_one(model: str, method: str, steps: int, out: str) -> dict[str, Any]:
    from peftbench import cli
    from peftbench.cli import run_and_write as run

    rec, _ = run(cli.checked_config(*overrides(model, method, steps, "cuda", out)))
    return rec


# ------------------------------------------------------------------ 1-3: on their own


def check_backward_thread(device: torch.device) -> Check:
    """Backward on CUDA runs on autograd's device thread, which inherits the dispatch mode."""
    from peftbench.memory import TensorMemoryTracker

    class Seen(TensorMemoryTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append((threading.get_ident(), str(func)))
            return super().__torch_dispatch__(func, types, args, kwargs)

    lin = torch.nn.Linear(1024, 1024, device=device)
    tracker = Seen(lin, None, device)
    tracker.ops = []
    with tracker:
        lin(torch.randn(256, 1024, device=device)).sum().backward()
    tracker.close()
    elsewhere = [op for thread, op in tracker.ops if thread != threading.get_ident()]
    ok = any("mm" in op for op in elsewhere)
    return "backward on another thread, seen by the tracker", ok, f"{len(elsewhere)} op(s) there: {elsewhere[:4]}"


def check_requested_peak(device: torch.device) -> list[Check]:
    """``requested_bytes.all.peak`` exists, resets, and bounds the tracker's peak."""
    from peftbench.memory import TensorMemoryTracker

    key = "requested_bytes.all.peak"
    if key not in torch.cuda.memory_stats(device):
        return [(f"{key} in torch.cuda.memory_stats", False, "missing")]
    x = torch.empty(64 * MIB, dtype=torch.uint8, device=device)
    del x
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    s = torch.cuda.memory_stats(device)
    resets = s[key] == s["requested_bytes.all.current"] < 64 * MIB
    lin = torch.nn.Linear(1024, 1024, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    tracker = TensorMemoryTracker(lin, None, device)
    with tracker:
        lin(torch.randn(256, 1024, device=device)).sum().backward()
    torch.cuda.synchronize(device)
    tracker.close()
    requested = torch.cuda.memory_stats(device)[key]
    return [
        (
            f"{key} exists and resets",
            resets,
            f"after a reset: peak {s[key]:,}, current {s['requested_bytes.all.current']:,}",
        ),
        ("tracker peak <= requested peak", tracker.peak <= requested, f"{tracker.peak:,} <= {requested:,}"),
    ]


def sleep_ms(device: torch.device, cycles: int) -> float:
    """Wall-clock ms of ``torch.cuda._sleep(cycles)`` on ``device``, synchronised around it."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.cuda.device(device):
        torch.cuda._sleep(cycles)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def check_stopwatch(device: torch.device, target_ms: float = 50.0) -> Check:
    """The Stopwatch against perf_counter + synchronise on a ~50 ms kernel of calibrated length."""
    from peftbench.timing import Stopwatch

    sleep_ms(device, 10**7)  # warm-up
    cycles = int(target_ms * 10**8 / sleep_ms(device, 10**8))
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with Stopwatch(device) as sw:
        with torch.cuda.device(device):
            torch.cuda._sleep(cycles)
    wall = (time.perf_counter() - t0) * 1e3
    ok = abs(sw.ms - wall) <= 0.02 * wall + 0.2 and abs(sw.ms - target_ms) <= 0.1 * target_ms
    return f"Stopwatch on {device} agrees with perf_counter", ok, f"events {sw.ms:.3f} ms, wall {wall:.3f} ms"


# ------------------------------------------------------------------- 2, 4, 5: per run


def phase_checks(m: dict[str, Any], phase: str, key: str) -> list[Check]:
    """The tracker against the allocator for one phase of a record's metrics."""
    names = ("requested_peak_bytes", "untracked_bytes", "max_allocated_bytes", "peak_large_blocks", "peak_small_blocks")
    tracked = m.get(key)
    requested, untracked, allocated, large, small = (m.get(f"cuda_{phase}_{n}") for n in names)
    if None in (tracked, requested, untracked, allocated, large, small):
        return [
            (
                f"{phase}: figures present",
                False,
                f"{key}={tracked} " + " ".join(f"{n}={m.get(f'cuda_{phase}_{n}')}" for n in names),
            )
        ]
    slack = max(2 * MIB, tracked // 100)
    bound = requested + large * LARGE_BLOCK_SLACK + small * SMALL_BLOCK_SLACK
    return [
        (
            f"{phase}: tracked <= requested <= tracked + untracked + slack",
            tracked <= requested <= tracked + max(untracked, 0) + slack,
            f"tracked {tracked / MIB:.2f}, requested {requested / MIB:.2f}, untracked {untracked / MIB:.2f}, "
            f"slack {slack / MIB:.2f} MiB",
        ),
        (
            f"{phase}: requested <= allocated <= requested + block slack",
            requested <= allocated <= bound,
            f"allocated {allocated / MIB:.2f} MiB, bound {bound / MIB:.2f} MiB ({large} large, {small} small blocks)",
        ),
    ]


def expected_inference_flops(model: str, method: str, out: str) -> int:
    """``inference_flops`` of the same run set up on the CPU: one forward at the default point,
    merged where the method merges, as ``measure.inference`` counts it on the GPU."""
    from peftbench import cli, measure, run

    cfg = cli.checked_config(*overrides(model, method, 0, "cpu", out), "measure.forgetting=false")
    s = run.setup(cfg, {"metrics": {}})
    inputs = measure.latency_inputs(len(s.tokenizer), cfg.measure.latency_batch, cfg.measure.latency_length, s.device)
    s.model.eval()
    with measure.merged(s.method, s.model), torch.no_grad():
        return measure.count_flops(lambda: s.model(**inputs))


def check_record(rec: dict[str, Any], expected_flops: int | None = None) -> list[Check]:
    """Every per-run check for one run record, in order."""
    m = rec["metrics"]
    out = [c for phase, key in PHASES for c in phase_checks(m, phase, key)]
    if expected_flops is not None:
        got = m.get("inference_flops")
        out.append(("inference_flops = the CPU's count", got == expected_flops, f"GPU {got:,}, CPU {expected_flops:,}"))
    train = m.get("cuda_train_max_reserved_bytes")
    for phase in ("eval", "inference"):
        r = m.get(f"cuda_{phase}_max_reserved_bytes")
        ok = None not in (r, train) and r < train
        out.append((f"{phase} reserved < train reserved", ok, f"{phase} {r:,}, train {train:,} bytes"))
    for key in ("train_step_ms_median", "inference_latency_ms", "train_tokens_per_s"):
        out.append((f"{key} > 0", (m.get(key) or 0) > 0, str(m.get(key))))
    if m.get("device_peak_flops"):
        ok = 0 < (m.get("train_mfu") or 0) < 1 and 0 < (m.get("inference_mfu") or 0) < 1
        out.append(("MFU in (0, 1)", ok, f"train {m.get('train_mfu')}, inference {m.get('inference_mfu')}"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing checked.")
        return 1
    device = torch.device("cuda")
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    print(f"gpu_check: {torch.cuda.get_device_name()} (torch {torch.__version__})" + (f", {conf}" if conf else ""))
    failed = 0

    def report(label: str, checks: list[Check]) -> None:
        nonlocal failed
        for name, ok, detail in checks:
            failed += not ok
            print(f"  {'ok  ' if ok else 'FAIL'} {label}: {name}  [{detail}]")

    report("thread", [check_backward_thread(device)])
    report("allocator", check_requested_peak(device))
    others = [torch.device("cuda", torch.cuda.device_count() - 1)] if torch.cuda.device_count() > 1 else []
    report("timing", [check_stopwatch(d) for d in [device, *others]])
    with tempfile.TemporaryDirectory() as out:
        for method in args.methods.split(","):
            rec = run_one(args.model, method, args.steps, out)
            if rec["status"] != "ok":
                report(method, [("run", False, str(rec["error"]))])
                continue
            report(method, check_record(rec, expected_inference_flops(args.model, method, out)))
    print("gpu_check: all checks passed" if not failed else f"gpu_check: {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
