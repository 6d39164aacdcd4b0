"""The estimator: counts equal the real model's, bytes equal the tensor-memory tracker's, FLOPs
equal the closed form, presets cost no weight memory, and the Hydra sweep works end to end."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pytest
import torch

import methods
from peftbench import app
from peftbench.estimate import app as EA
from peftbench.estimate import calibrate as EC
from peftbench.estimate import cost as E

from conftest import REPO

METHODS = sorted(methods.REGISTRY)  # every method, a new one included
TINY = ["batch_size=2", "seq_length=16", "precision=fp32"]


def compose_estimate(*overrides: str):
    return app.compose(*overrides, config_name="estimate")


def real_model(cfg):
    """The same config built with real (random) weights, the method applied."""
    from peftbench import models

    spec, vocab = E.model_spec(cfg)
    model = models.build(spec, "causal-lm", vocab, 0, 0)
    return methods.build(cfg.method).apply(model)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_counts_equal_the_real_model(model, method):
    cfg = compose_estimate(f"model={model}", f"method={method}", *TINY)
    m = E.estimate(cfg)["metrics"]
    real = real_model(cfg)
    assert m["trainable_params"] == methods.trainable_parameters(real)
    assert m["total_params"] == methods.total_parameters(real)
    trained = E.unique(p for p in real.parameters() if p.requires_grad)
    assert m["checkpoint_bytes"] == sum(p.numel() * p.element_size() for p in trained)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bytes_equal_the_tracker_on_the_default_model(method):
    """fp32: weights, gradients and AdamW state to the byte; the traced activations too (the
    bytes live right after the forward of a real step: batch, saved tensors, loss)."""
    cfg = compose_estimate("model=tiny-llama", f"method={method}", *TINY)
    est = E.estimate(cfg)["metrics"]
    got = EC.tracked_step(cfg)
    for part in ("weights", "gradients", "optimizer", "activations"):
        key = f"memory_{part}_bytes"
        assert est[key] == got[key], (part, est[key], got[key])
    assert est["peak_memory_bytes"] == sum(est[f"memory_{p}_bytes"] for p in EC.PARTS)


def test_precision_mixed_closed_form_on_llama2_7b():
    """bf16 weights and gradients; 12 B of AdamW state per trained element plus a 4 B step."""
    cfg = compose_estimate("model=llama2-7b", "method=full", "precision=mixed")
    model, _ = E.build(cfg)
    m = E.estimate(cfg)["metrics"]
    n = m["total_params"]
    assert n == 6_738_415_616  # Llama-2-7B's published count
    tensors = len(E.unique(model.parameters()))
    buffers = sum(E.nbytes(b) for b in model.buffers())
    assert m["memory_weights_bytes"] == 2 * n + buffers
    assert m["memory_gradients_bytes"] == m["checkpoint_bytes"] == 2 * n
    assert m["memory_optimizer_bytes"] == 12 * n + 4 * tensors


def test_flops_full_fine_tuning_is_6n_plus_attention():
    """Full fine-tuning: 6 FLOPs per matrix weight per token (forward 2, input and weight
    gradients 2 each; the embedding lookup is no product), plus 3 x 4*s*d_attn per layer."""
    cfg = compose_estimate("model=tiny-llama", "method=full", *TINY)
    model, _ = E.build(cfg)
    m = E.estimate(cfg)["metrics"]
    c = model.config
    n_matmul = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    s = cfg.seq_length
    attention = c.num_hidden_layers * 3 * 4 * s * c.hidden_size
    assert m["train_attention_flops_per_token"] == attention
    assert m["train_flops_per_token"] == 6 * n_matmul + attention
    assert m["train_flops_per_step"] == m["train_flops_per_token"] * cfg.batch_size * s


def test_flops_lora_closed_form():
    """LoRA (r=8 on q, v; frozen base): forward 2N, input gradients 2N except layer 0's q, k, v
    (nothing below them trains), no weight gradients; each LoRA product costs 2 x its size
    forward, 2 x for its weight gradient and 2 x for its input gradient (A's skipped in layer 0)."""
    cfg = compose_estimate("model=tiny-llama", "method=lora", "rank=8", *TINY)
    model, _ = E.build(cfg)
    m = E.estimate(cfg)["metrics"]
    c = model.config
    h, kv, r, layers = c.hidden_size, c.num_key_value_heads * c.head_dim, 8, c.num_hidden_layers
    base = sum(
        mod.weight.numel()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not name.endswith(("lora_A", "lora_B"))
    )
    first_qkv = h * h + 2 * h * kv
    a_sizes, b_sizes = r * h + r * h, r * h + r * kv  # A_q, A_v; B_q, B_v
    lora = layers * (3 * 2 * (a_sizes + b_sizes)) - 2 * a_sizes  # fwd + wgrad + dgrad; no dgrad of A in layer 0
    attention = layers * 3 * 4 * cfg.seq_length * h
    assert m["train_flops_per_token"] == 4 * base - 2 * first_qkv + lora + attention


@pytest.mark.parametrize("method", METHODS)
def test_layer_extrapolation_equals_the_whole_trace(method):
    cfg = compose_estimate("model=tiny-gpt2", f"method={method}", *TINY)
    model, _ = E.build(cfg)
    assert model.config.num_hidden_layers > 3
    assert E.trace_model(model, cfg) == E.trace(model, cfg.batch_size, cfg.seq_length, cfg.attention)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("model,params", [("llama2-7b", 6_738_415_616), ("gpt3-175b", 174_604_259_328)])
def test_preset_estimates_take_seconds_and_no_weight_memory(model, params, tmp_path):
    cfg = compose_estimate(f"model={model}", "method=lora", f"results_dir={tmp_path}")
    built, _ = E.build(cfg)
    assert all(p.device.type == "meta" for p in built.parameters())
    before, t0 = rss_bytes(), time.perf_counter()
    rec, path = app.run_job(EA.APP, cfg)
    assert time.perf_counter() - t0 < 30
    assert rss_bytes() - before < 1 << 30  # 2 bytes x 175B parameters would be 350 GB
    assert rec["status"] == "ok", rec["error"]
    assert rec["kind"] == "estimate" and json.loads(path.read_text())["run_id"] == rec["run_id"]
    m = rec["metrics"]
    assert m["total_params"] == params + m["trainable_params"]
    assert m["peak_memory_bytes"] == sum(m[f"memory_{p}_bytes"] for p in EC.PARTS)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "peftbench.estimate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_hydra_sweep_over_presets_and_methods(tmp_path):
    proc = run_cli("-m", "model=llama3.2-3b,gpt3-175b", f"method={','.join(METHODS)}", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert sorted((r["model"], r["method"]) for r in recs) == sorted(
        (m, meth) for m in ("llama3.2-3b", "gpt3-175b") for meth in METHODS
    )
    for r in recs:
        assert r["status"] == "ok" and r["kind"] == "estimate"
        for key in (
            "trainable_params",
            "total_params",
            "checkpoint_bytes",
            "memory_weights_bytes",
            "memory_gradients_bytes",
            "memory_optimizer_bytes",
            "memory_activations_bytes",
            "peak_memory_bytes",
            "train_flops_per_token",
            "train_flops_per_step",
        ):
            assert r["metrics"][key] > 0, key
    assert "ESTIMATES" in proc.stdout and "gpt3-175b" in proc.stdout


@pytest.mark.parametrize(
    "args,expected",
    [
        (["precision=fp16"], "precision=fp16: allowed: fp32, mixed, bf16"),
        (["method=lora", "rank=0"], "method.rank=0"),
        (["model=gpt3-175b", "seq_length=4096"], "seq_length=4096: 4096 tokens exceed the model's context of 2048"),
        (["model=gpt3-175b", "method=prefix", "seq_length=2048"], "allowed: at most 2028"),
        (["model=nope"], "model=nope: no such option"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(args, expected, tmp_path, capsys):
    """In-process (the same ``main`` the module runs): the check phase stops before Hydra."""
    assert EA.main([*args, f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftbench.estimate: error: ") and err.strip().count("\n") == 0, err
    assert expected in err, err
    assert not list(tmp_path.glob("*.json"))
