"""The regression gate: matching, exact figures, noise-aware timing, and its exit codes."""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from peftbench import compare, stats

CPU = "AMD EPYC"
FULL_PARAMS = 3_043_584


def make_record(
    method: str = "lora",
    *,
    rank: int = 8,
    device: str = CPU,
    device_type: str = "cpu",
    step_ms: float = 100.0,
    seed: int = 0,
    chash: str | None = None,
    status: str = "ok",
    kind: str = "measured",
    model: str = "tiny-llama",
    task: str = "synthetic-lm",
    quality: float = 5.0,
    extra_config: dict | None = None,
    parallel: bool = False,
) -> dict:
    """A record in peftbench's format with plausible, internally consistent numbers."""
    trainable = FULL_PARAMS if method == "full" else 3584 * rank
    rng = random.Random(seed)
    steps = [step_ms * (1 + 0.02 * rng.uniform(-1, 1)) for _ in range(25)]
    med = sorted(steps)[12]
    config = {
        "method": {"name": method, **({"rank": rank} if method == "lora" else {})},
        "model": {"name": model},
        "task": {"name": task},
        "train": {"steps": 30},
        "seed": 0,
        "results_dir": "results/runs",
        **(extra_config or {}),
    }
    chash = chash or f"{abs(hash(json.dumps(config, sort_keys=True))) % 16**10:010x}"
    rec = {
        "schema_version": 1,
        "run_id": f"20260101T000000{seed:06d}-{method}-{model}-{task}-{chash}",
        "kind": kind,
        "status": status,
        "error": None if status == "ok" else "FloatingPointError: nan",
        "method": method,
        "model": model,
        "task": task,
        "config_hash": chash,
        "config": config,
        "provenance": {
            "git_sha": "a" * 40,
            "git_dirty": False,
            "device_type": device_type,
            "device_name": device,
            "launcher": {"name": "BasicLauncher", "parallel": parallel},
        },
        "base_weights_sha256": "b" * 64,
        "metrics": {
            "trainable_params": trainable,
            "total_params": FULL_PARAMS + (0 if method == "full" else trainable),
            "trainable_percent": 100.0 * trainable / FULL_PARAMS,
            "peak_memory_bytes": 50_000_000 if method == "full" else 16_000_000,
            "memory_weights_bytes": 12_000_000,
            "memory_gradients_bytes": 12_000_000 if method == "full" else 100_000,
            "memory_optimizer_bytes": 24_000_000 if method == "full" else 200_000,
            "memory_activations_bytes": 2_000_000,
            "train_flops_per_step": 1_140_719_616,
            "inference_flops": 95_059_968,
            "checkpoint_bytes": 4 * trainable + 1000,
            "train_step_ms_median": med,
            "train_step_ms_iqr": 2.0,
            "train_tokens_per_s": 6400 / med * 1e3,
            "train_tokens_per_s_iqr": 100.0,
            "inference_latency_ms": 10.0,
            "inference_latency_iqr_ms": 0.5,
            "eval_loss": quality,
            "train_loss_final": quality,
        },
        "train_step_ms": steps,
        "latency_grid": [
            {
                "batch": b,
                "length": n,
                "inference_latency_ms": 0.05 * b * n,
                "inference_latency_iqr_ms": 0.1,
                "tokens_per_s": 1.0,
            }
            for b in (1, 8)
            for n in (32, 128)
        ],
    }
    if status != "ok":
        rec["metrics"] = {k: rec["metrics"][k] for k in ("trainable_params", "total_params")}
    return rec


def write(folder: Path, *recs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in recs:
        (folder / f"{r['run_id']}.json").write_text(json.dumps(r))
    return folder


@pytest.fixture
def baseline(tmp_path):
    return [make_record("full", seed=1), make_record("lora", seed=2), make_record("lora", rank=16, seed=3)]


def run_compare(tmp_path, base, cur, *args):
    b = write(tmp_path / "b", *base)
    c = write(tmp_path / "c", *cur)
    return compare.main([str(b), str(c), *args])


def test_identical_records_pass(tmp_path, baseline, capsys):
    assert run_compare(tmp_path, baseline, copy.deepcopy(baseline)) == 0
    assert "3 run(s) matched, 0 missing, 0 new" in capsys.readouterr().out


def test_exact_metric_change_fails(tmp_path, baseline, capsys):
    cur = copy.deepcopy(baseline)
    cur[1]["metrics"]["memory_activations_bytes"] += 8  # 8 bytes more at the peak
    assert run_compare(tmp_path, baseline, cur) == 1
    out = capsys.readouterr().out
    assert "memory_activations_bytes" in out and "+8" in out and "REGRESSION" in out


def test_bytes_are_exact_only_between_cpu_runs(tmp_path):
    base = [make_record("lora", device="NVIDIA H100", device_type="cuda")]
    cur = copy.deepcopy(base)
    cur[0]["metrics"]["peak_memory_bytes"] += 4096  # allocator-dependent on a GPU: not exact
    assert run_compare(tmp_path, base, cur) == 0
    cur[0]["metrics"]["train_flops_per_step"] += 1  # FLOPs are exact everywhere
    assert run_compare(tmp_path, base, cur) == 1


def test_significant_slowdown_fails_and_noise_does_not(tmp_path, baseline, capsys):
    slow = copy.deepcopy(baseline)
    slow[1] = make_record("lora", seed=7, step_ms=130.0, chash=baseline[1]["config_hash"])
    assert run_compare(tmp_path, baseline, slow) == 1
    out = capsys.readouterr().out
    assert "train_step_ms_median" in out and "Mann-Whitney" in out and "FAIL" in out
    # the same slowdown only warns under --timing warn (it is under the 2x gross threshold) ...
    assert run_compare(tmp_path, baseline, slow, "--timing", "warn") == 0
    # ... and fails beyond it
    gross = copy.deepcopy(baseline)
    gross[1] = make_record("lora", seed=7, step_ms=250.0, chash=baseline[1]["config_hash"])
    assert run_compare(tmp_path, baseline, gross, "--timing", "warn") == 1
    # a 3% change within noise passes at the default 10% tolerance
    noisy = copy.deepcopy(baseline)
    noisy[1] = make_record("lora", seed=8, step_ms=103.0, chash=baseline[1]["config_hash"])
    assert run_compare(tmp_path, baseline, noisy) == 0


def test_slowdown_without_significance_is_not_a_regression(tmp_path):
    """Medians 15% apart but the samples overlap completely: Mann-Whitney does not reject."""
    base = [make_record("lora", seed=1)]
    cur = copy.deepcopy(base)
    wide = [60.0 + 5 * i for i in range(25)]  # 60..180 ms, the baseline's 100 ms in the middle
    cur[0]["train_step_ms"] = wide
    cur[0]["metrics"]["train_step_ms_median"] = 115.0
    assert stats.mann_whitney_p(base[0]["train_step_ms"], wide) > 0.01
    assert run_compare(tmp_path, base, cur) == 0


def test_timings_are_compared_only_on_the_same_device(tmp_path, baseline, capsys):
    cur = [
        make_record(
            r["method"],
            rank=r["config"]["method"].get("rank", 8),
            seed=9,
            step_ms=400.0,
            device="Intel Xeon",
            chash=r["config_hash"],
        )
        for r in baseline
    ]
    assert run_compare(tmp_path, baseline, cur) == 0
    assert "different devices: timings not compared" in capsys.readouterr().out


def test_parallel_launcher_timings_only_warn(tmp_path, baseline, capsys):
    cur = copy.deepcopy(baseline)
    cur[1] = make_record("lora", seed=7, step_ms=300.0, chash=baseline[1]["config_hash"], parallel=True)
    assert run_compare(tmp_path, baseline, cur) == 0
    assert "parallel launcher" in capsys.readouterr().out


def test_failed_or_missing_run_fails(tmp_path, baseline):
    failed = copy.deepcopy(baseline)
    failed[0] = make_record("full", seed=5, status="failed", chash=baseline[0]["config_hash"])
    assert run_compare(tmp_path / "a", baseline, failed) == 1
    assert run_compare(tmp_path / "b", baseline, baseline[1:]) == 1
    assert run_compare(tmp_path / "c", baseline, baseline[1:], "--allow-missing") == 0


def test_falls_back_to_method_settings_when_the_config_gained_a_key(tmp_path, baseline, capsys):
    cur = [
        make_record(
            r["method"], rank=r["config"]["method"].get("rank", 8), seed=i, extra_config={"measure": {"new_key": 1}}
        )
        for i, r in enumerate(baseline, 1)
    ]
    assert {r["config_hash"] for r in cur}.isdisjoint(r["config_hash"] for r in baseline)
    assert run_compare(tmp_path, baseline, cur) == 0
    out = capsys.readouterr().out
    assert "3 run(s) matched" in out and "measure.new_key: (absent) -> 1" in out


def test_quality_worse_beyond_tolerance_fails(tmp_path, baseline):
    cur = copy.deepcopy(baseline)
    cur[2]["metrics"]["eval_loss"] *= 1.05
    assert run_compare(tmp_path / "a", baseline, cur) == 1
    assert run_compare(tmp_path / "b", baseline, cur, "--quality-tolerance", "0.1") == 0


@pytest.mark.parametrize("bad", ["missing", "garbage", "foreign", "empty"])
def test_unusable_input_exits_2_with_one_line(tmp_path, baseline, bad):
    good = write(tmp_path / "good", *baseline)
    target = tmp_path / "bad"
    if bad == "garbage":
        target = tmp_path / "bad.json"
        target.write_bytes(b"\x00\xffnot json{")
    elif bad == "foreign":
        target = tmp_path / "package.json"
        target.write_text(json.dumps({"name": "x", "version": "1"}))
    elif bad == "empty":
        target.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "peftbench.compare", str(good), str(target)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("peftbench.compare: error:"), proc.stderr


def test_foreign_file_inside_a_folder_is_skipped(tmp_path, baseline, capsys):
    b = write(tmp_path / "b", *baseline)
    c = write(tmp_path / "c", *copy.deepcopy(baseline))
    (c / "notes.json").write_text("[1, 2]")
    assert compare.main([str(b), str(c)]) == 0
    assert "skipped" in capsys.readouterr().err


BAD_OPTIONS = [
    ("--time-tolerance", "nan", "a finite number >= 0"),
    ("--time-tolerance", "-1", "a finite number >= 0"),
    ("--time-tolerance", "inf", "a finite number >= 0"),
    ("--gross-slowdown", "nan", "a finite number >= 1"),
    ("--gross-slowdown", "0.5", "a finite number >= 1"),
    ("--alpha", "0", "a number in (0, 1]"),
    ("--alpha", "1.5", "a number in (0, 1]"),
    ("--alpha", "nan", "a number in (0, 1]"),
    ("--quality-tolerance", "-0.1", "a finite number >= 0"),
    ("--quality-tolerance", "inf", "a finite number >= 0"),
]


@pytest.mark.parametrize("option, value, allowed", BAD_OPTIONS)
def test_a_numeric_option_that_cannot_work_is_refused(tmp_path, baseline, capsys, option, value, allowed):
    """Before the check, --time-tolerance nan or -1 made a folder compared with itself a REGRESSION."""
    folder = write(tmp_path / "b", *baseline)
    with pytest.raises(SystemExit) as stop:
        compare.main([str(folder), str(folder), option, value])
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"peftbench.compare: error: {option}={value}: must be {allowed}\n")


def test_a_bad_option_from_the_shell_is_one_line_and_exit_2(tmp_path, baseline):
    folder = write(tmp_path / "b", *baseline)
    for args in (["--time-tolerance", "nan"], ["--time-tolerance=-1"], ["--alpha", "abc"]):
        proc = subprocess.run(
            [sys.executable, "-m", "peftbench.compare", str(folder), str(folder), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("peftbench.compare: error: "), proc.stderr
        assert args[0].split("=")[0] in lines[0] and args[-1].split("=")[-1] in lines[0], lines
