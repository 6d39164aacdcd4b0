"""Cross-check peftbench's measurements on a CUDA GPU: run the harness on the GPU and compare
the tensor tracker's peaks with the caching allocator's own counters, phase by phase.

    python benchmarks/gpu_check.py                 # tiny-llama, full and LoRA
    python benchmarks/gpu_check.py --model gpt2-medium --steps 8

Without a GPU it says so and exits 0 (``--require-gpu``: exit 1).

What must hold, per phase (train memory steps, evaluation, inference), where ``tracked`` is
the tracker's peak of live tensor bytes, ``requested`` the allocator's peak of requested
bytes (``requested_bytes.all.peak``, before rounding), ``untracked`` the bytes the allocator
holds for no tensor at the end of the phase (cuBLAS workspaces) and ``allocated`` is
``torch.cuda.max_memory_allocated``:

    tracked <= requested <= tracked + untracked + slack,   slack = max(2 MiB, 1% of tracked)
    requested <= allocated <= requested * 1.01 + 2 MiB     (blocks rounded up to 512 bytes)

The slack covers buffers a kernel allocates inside one operator (never visible as a tensor
at an operator boundary). Timing figures must be present and positive (CUDA events), and the
train and inference MFU present on a GPU in peftbench's table of peak FLOP/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

MIB = 2**20
PHASES = (
    ("train", "peak_memory_bytes"),
    ("eval", "eval_peak_memory_bytes"),
    ("inference", "inference_peak_memory_bytes"),
)


def run_one(model: str, method: str, steps: int, out: str):
    from peftbench import cli
    from peftbench.run import run

    overrides = [
        f"model={model}",
        f"method={method}",
        "device=cuda",
        f"train.steps={steps}",
        "train.timing_warmup=3",
        "task.num_train=256",
        "task.num_eval=32",
        "measure.latency_repeats=10",
        "measure.decode_repeats=3",
        f"results_dir={out}",
    ]
    rec, _ = run(cli.checked_config(*overrides))
    return rec


def check_record(rec: dict) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for one run record."""
    m = rec["metrics"]
    out = []
    for phase, key in PHASES:
        tracked = m.get(key)
        requested = m.get(f"cuda_{phase}_requested_peak_bytes")
        untracked = m.get(f"cuda_{phase}_untracked_bytes")
        allocated = m.get(f"cuda_{phase}_max_allocated_bytes")
        if None in (tracked, requested, untracked, allocated):
            out.append(
                (
                    f"{phase}: figures present",
                    False,
                    f"tracked={tracked} requested={requested} untracked={untracked} allocated={allocated}",
                )
            )
            continue
        slack = max(2 * MIB, tracked // 100)
        ok = tracked <= requested <= tracked + max(untracked, 0) + slack
        out.append(
            (
                f"{phase}: tracked <= requested <= tracked + untracked + slack",
                ok,
                f"tracked {tracked / MIB:.2f}, requested {requested / MIB:.2f}, untracked "
                f"{untracked / MIB:.2f}, slack {slack / MIB:.2f} MiB",
            )
        )
        ok = requested <= allocated <= requested * 1.01 + 2 * MIB
        out.append(
            (f"{phase}: requested <= allocated <= requested + rounding", ok, f"allocated {allocated / MIB:.2f} MiB")
        )
    for key in ("train_step_ms_median", "inference_latency_ms", "train_tokens_per_s"):
        ok = (m.get(key) or 0) > 0
        out.append((f"{key} > 0", ok, str(m.get(key))))
    if m.get("device_peak_flops"):
        ok = 0 < (m.get("train_mfu") or 0) < 1 and 0 < (m.get("inference_mfu") or 0) < 1
        out.append(("MFU in (0, 1)", ok, f"train {m.get('train_mfu')}, inference {m.get('inference_mfu')}"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--require-gpu", action="store_true", help="exit 1 (not 0) when there is no GPU")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check.")
        return 1 if args.require_gpu else 0
    print(f"gpu_check: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    failed = 0
    with tempfile.TemporaryDirectory() as out:
        for method in args.methods.split(","):
            rec = run_one(args.model, method, args.steps, out)
            if rec["status"] != "ok":
                print(f"  {method}: run failed: {rec['error']}")
                failed += 1
                continue
            for name, ok, detail in check_record(rec):
                failed += not ok
                print(f"  {'ok  ' if ok else 'FAIL'} {method}: {name}  [{detail}]")
    print("gpu_check: all checks passed" if not failed else f"gpu_check: {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
