"""The command line: a real run writes a complete ok record; bad input is one line, exit 2,
and no record; a failure at run time is a failed record and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftbench import cli

from conftest import REPO, compose_config

TINY = [
    "train.steps=6",
    "train.batch_size=2",
    "train.timing_warmup=2",
    "task.num_train=32",
    "task.num_eval=8",
    "task.max_length=32",
    "measure.latency_repeats=3",
    "measure.latency_length=16",
]


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "peftbench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def records(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_main_command_writes_a_complete_ok_record(tmp_path):
    proc = run_cli("method=lora", "rank=8", *TINY, f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = records(tmp_path)
    assert not list(tmp_path.glob(".tmp-*")), "temporary file left behind"
    for key in (
        "schema_version",
        "run_id",
        "status",
        "error",
        "method",
        "model",
        "task",
        "config",
        "model_config",
        "method_config",
        "provenance",
        "metrics",
    ):
        assert key in rec, key
    assert rec["status"] == "ok" and rec["error"] is None
    assert (rec["method"], rec["model"], rec["task"]) == ("lora", "tiny-llama", "synthetic-lm")
    assert rec["config"]["method"]["rank"] == 8 and rec["config"]["rank"] == 8
    assert rec["model_config"]["architectures"] == ["LlamaForCausalLM"]
    assert rec["method_config"]["target_modules"] == ["q_proj", "v_proj"]
    for key in ("git_sha", "git_dirty", "packages", "device_name", "torch_threads", "timestamp"):
        assert key in rec["provenance"], key
    m = rec["metrics"]
    for key in (
        "trainable_params",
        "total_params",
        "peak_memory_bytes",
        "train_tokens_per_s",
        "train_samples_per_s",
        "inference_latency_ms",
        "eval_loss",
    ):
        assert isinstance(m[key], (int, float)) and m[key] > 0, key
    assert "trainable params" in proc.stdout and rec["run_id"] in proc.stdout


def test_lora_trainable_count_equals_peft_for_the_recorded_model(tiny_run):
    """The record's count equals Hugging Face peft's for the same model config and targets."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    rec, _ = tiny_run("method=lora", "rank=8")
    cfg = dict(rec["model_config"])
    config = AutoConfig.for_model(
        cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "transformers_version"}
    )
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    ref = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=rec["method_config"]["target_modules"])
    )
    trainable, total = ref.get_nb_trainable_parameters()
    assert rec["metrics"]["trainable_params"] == trainable
    assert rec["metrics"]["total_params"] == total
    # 4 layers x (q: 8*(256+256) + v: 8*(256+128)) with 4 of 8 heads for keys/values
    assert trainable == 4 * (8 * (256 + 256) + 8 * (256 + 128))


def test_every_method_starts_from_identical_base_weights(tiny_run):
    full, _ = tiny_run("method=full")
    lora, _ = tiny_run("method=lora", "rank=4")
    assert full["status"] == lora["status"] == "ok"
    assert len(full["base_weights_sha256"]) == 64
    assert full["base_weights_sha256"] == lora["base_weights_sha256"]
    assert full["metrics"]["trainable_params"] == full["metrics"]["total_params"]


BAD = [
    (["rank=0"], "method.rank=0"),
    (["rank=-2"], "method.rank=-2"),
    (["rank=abc"], "rank=abc"),
    (["method=nope"], "method=nope"),
    (["method.dropout=1.5"], "method.dropout=1.5"),
    (["seed=x"], "seed=x"),
    (["method.target_modules=[nope_proj]"], "method.target_modules=['nope_proj']"),
    (["device=tpu"], "device=tpu"),
    (["train.steps=-1"], "train.steps=-1"),
    (["train.batch_size=0"], "train.batch_size=0"),
    (["-m", "method=full,nope"], "method=nope"),
]


@pytest.mark.parametrize("args,named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_naming_key_and_value(args, named, tmp_path, capsys):
    code = cli.main([*args, f"results_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("peftbench: error: ") and named in err, err
    assert "allowed" in err or "must be" in err or "converted" in err, err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_bad_input_from_the_shell_exits_2_without_traceback(tmp_path):
    proc = run_cli("rank=0", f"results_dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "peftbench: error: method.rank=0: LoRA rank must be an integer >= 1"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_failure_at_run_time_is_a_failed_record(tiny_run, monkeypatch):
    """A loss that turns NaN is recorded as failed with its reason, not as a result."""
    import torch

    from peftbench import train as train_mod

    real = train_mod.train

    def nan_loss(model, *args, **kwargs):
        def poisoned_forward(*a, _orig=model.forward, **k):
            out = _orig(*a, **k)
            out.loss = out.loss * torch.tensor(float("nan"))
            return out

        model.forward = poisoned_forward
        return real(model, *args, **kwargs)

    monkeypatch.setattr("peftbench.run.train", nan_loss)
    rec, path = tiny_run("method=lora")
    assert rec["status"] == "failed"
    assert "loss is nan" in rec["error"]
    assert json.loads(path.read_text())["status"] == "failed"


def test_rank_is_interpolated_and_method_rank_overrides():
    assert compose_config("method=lora", "rank=16").method.rank == 16
    assert compose_config("method=lora", "method.rank=4").method.rank == 4
