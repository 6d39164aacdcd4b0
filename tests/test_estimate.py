"""The estimator: counts equal the real model's; for every cost lever and method, weights,
gradients and optimizer state equal the tensor-memory tracker's to the byte and activations and
the peak are within a stated tolerance (the calibration); FLOPs equal the closed form and the
run's count; presets cost no weight memory; the Hydra sweep works end to end."""

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
from peftbench.estimate import calibrate as EC
from peftbench.estimate import cli as EA
from peftbench.estimate import cost as E

from conftest import REPO

METHODS = sorted(methods.REGISTRY)  # every method, a new one included
TINY = ["train.batch_size=2", "seq_length=16", "train.precision=fp32"]
QLORA_65B = (
    "model=llama-65b",
    "method=lora",
    "method.targets=all-linear",
    "rank=64",
    "model.quantize=nf4",
    "train.gradient_checkpointing=true",
    "train.precision=bf16-mixed",
    "train.batch_size=1",
    "seq_length=512",
)


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
    built, _ = E.build(cfg)
    states = E.state_bytes(built, cfg.train.precision)
    real = real_model(cfg)
    assert methods.trainable_parameters(built) == methods.trainable_parameters(real)
    assert methods.total_parameters(built) == methods.total_parameters(real)
    trained = E.unique(p for p in real.parameters() if p.requires_grad)
    assert states["checkpoint_bytes"] == sum(p.numel() * p.element_size() for p in trained)


# ---------------------------------------------------------------- calibration against the tracker

# Activations and peak: |estimated / measured - 1| within TOLERANCE (measured: 0 in every cell
# but four bf16-mixed peaks with prefix, prompt and compose, at most 0.26%; docs/ESTIMATES.md).
# Weights, gradients, optimizer state and FLOPs: to the byte / FLOP, every cell.
TOLERANCE = 0.005


def default_cells() -> set[tuple[str, str, str]]:
    """The cells run by default (the rest are ``slow``): LoRA under every lever on tiny-llama,
    full fine-tuning under three on tiny-gpt2, and every other method once, the cheaper levers
    and the two models taken in turn."""
    chosen = {(lever, "tiny-llama", "lora") for lever in EC.LEVERS}
    chosen |= {(lever, "tiny-gpt2", "full") for lever in ("bf16-mixed", "checkpointing", "grad_accum=2")}
    rotation = ("fp32", "bf16-mixed", "checkpointing", "bf16")
    others = [m for m in METHODS if m not in ("lora", "full")]
    chosen |= {(rotation[i % 4], EC.CALIBRATE_MODELS[i % 2], m) for i, m in enumerate(others)}
    return chosen


CELLS = [
    pytest.param(*cell, id="-".join(cell), marks=() if cell in default_cells() else pytest.mark.slow)
    for cell in EC.cells()
]


@pytest.mark.parametrize("lever,model,method", CELLS)
def test_calibration(lever, model, method):
    """The estimate beside the tracker's measurement of the same real step on CPU (batch 2 x 16)."""
    rows = {part: (e, g) for part, e, g in EC.calibration_rows(model, method, lever, 2, 16)}
    for part in (*EC.STATES, "FLOPs", "model FLOPs"):
        if part in rows:
            assert rows[part][0] == rows[part][1], (part, rows[part])
    for part in ("activations", "peak"):
        err = EC.error(*rows[part])
        assert abs(err) <= TOLERANCE, (part, rows[part], f"{100 * err:+.3f}%")


def test_every_lever_is_calibrated_with_every_method_it_allows():
    cells = EC.cells()
    assert {c[0] for c in cells} == {"fp32", "bf16-mixed", "bf16", "checkpointing", "grad_accum=2", "nf4", "int8"}
    assert ("nf4", "tiny-llama", "full") not in cells  # a quantized base refuses full fine-tuning
    assert len(cells) == len(EC.LEVERS) * 2 * len(METHODS) - 2 * 2 * sum(
        getattr(methods.REGISTRY[m], "trains_base", False) for m in METHODS
    )
    assert default_cells() <= set(cells)


def test_calibrate_command_prints_every_part(capsys):
    assert EC.calibrate(["lever=checkpointing", "model=tiny-llama", "method=ia3", "batch_size=2", "seq_length=16"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer", "activations", "peak", "FLOPs", "model FLOPs"):
        assert f"checkpointing tiny-llama  ia3       {part}" in out
    assert "largest error on weights, gradients and optimizer state: 0.0000%" in out


# ---------------------------------------------------------------- closed forms


def test_precision_bf16_master_closed_form_on_llama2_7b():
    """bf16 weights and gradients; 12 B of AdamW state per trained element plus a 4 B step."""
    cfg = compose_estimate("model=llama2-7b", "method=full", "train.precision=bf16-master")
    model, _ = E.build(cfg)
    n = methods.total_parameters(model)
    assert n == 6_738_415_616  # Llama-2-7B's published count
    states = E.state_bytes(model, cfg.train.precision)
    tensors = len(E.unique(model.parameters()))
    buffers = sum(E.nbytes(b) for b in model.buffers())
    assert states["memory_weights_bytes"] == 2 * n + buffers
    assert states["memory_gradients_bytes"] == states["checkpoint_bytes"] == 2 * n
    assert states["memory_optimizer_bytes"] == 12 * n + 4 * tensors


@pytest.mark.parametrize("precision,weight,optim", [("fp32", 4, 8), ("bf16-mixed", 4, 8), ("bf16", 2, 4)])
def test_precision_closed_forms_of_the_run_levers(precision, weight, optim):
    """As the run keeps them: bf16-mixed keeps fp32 weights, gradients and moments (its bf16
    copies are activations); pure bf16 halves all three."""
    cfg = compose_estimate("model=llama2-7b", "method=full", f"train.precision={precision}")
    model, _ = E.build(cfg)
    n = methods.total_parameters(model)
    states = E.state_bytes(model, cfg.train.precision)
    tensors = len(E.unique(model.parameters()))
    assert states["memory_gradients_bytes"] == weight * n
    assert states["memory_optimizer_bytes"] == optim * n + 4 * tensors


@pytest.mark.slow
def test_qlora_65b_weights_are_the_quantized_closed_form():
    """LLaMA-65B under nf4: every linear layer of the 80 blocks stored as ``quantized_bytes``
    says (fp32 quantization factors under bf16-mixed), the embedding, LM head and norms dense;
    LoRA r=64 on every linear layer of the blocks; the activations with checkpointing are the
    80 saved layer inputs plus what one layer and the head need."""
    from peftbench.quantize import quantized_bytes

    cfg = compose_estimate(*QLORA_65B)
    m = E.estimate(cfg)["metrics"]
    h, f, layers, vocab, r = 8192, 22016, 80, 32000, 64
    assert m["total_params"] - m["trainable_params"] == 65_285_660_672
    shapes = [(h, h)] * 4 + [(f, h)] * 2 + [(h, f)]  # q, k, v, o; gate, up; down
    assert m["trainable_params"] == layers * sum(r * (o + i) for o, i in shapes)
    rope = 2 * (h // 64) // 2  # inv_freq and original_inv_freq: head_dim / 2 each
    dense = 4 * (2 * vocab * h + (2 * layers + 1) * h + rope)  # embeddings and LM head, norms, RoPE
    quantized = layers * sum(quantized_bytes(s, "nf4", torch.float32) for s in shapes)
    lora = 4 * m["trainable_params"]
    assert m["memory_weights_bytes"] == dense + quantized + lora
    assert m["memory_gradients_bytes"] == lora
    assert m["memory_optimizer_bytes"] == 2 * lora + 4 * layers * len(shapes) * 2
    assert m["train_model_flops_per_token"] < m["train_flops_per_token"]
    saved_inputs = layers * 512 * h * 4  # each checkpointed layer keeps its fp32 input
    assert saved_inputs < m["memory_activations_bytes"] < saved_inputs + 2 * 10**9


# Attention FLOPs per layer and token, in units of s * d_attn, as torch.utils.flop_counter counts
# a fused kernel (and so the run): forward 4 (q k^T and p v), backward 10 (the kernel computes
# q k^T again, then the gradients of v, p, q and k).
ATTENTION_UNITS = 4 + 10


def test_flops_full_fine_tuning_is_6n_plus_attention():
    """Full fine-tuning: 6 FLOPs per matrix weight per token (forward 2, input and weight
    gradients 2 each; the embedding lookup is no product), plus the attention products."""
    cfg = compose_estimate("model=tiny-llama", "method=full", *TINY)
    model, _ = E.build(cfg)
    m = E.estimate(cfg)["metrics"]
    c = model.config
    n_matmul = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    s = cfg.seq_length
    attention = c.num_hidden_layers * ATTENTION_UNITS * s * c.hidden_size
    assert m["train_attention_flops_per_token"] == attention
    assert m["train_flops_per_token"] == 6 * n_matmul + attention
    assert m["train_flops_per_step"] == m["train_flops_per_token"] * cfg.train.batch_size * s


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
    attention = layers * ATTENTION_UNITS * cfg.seq_length * h
    assert m["train_flops_per_token"] == 4 * base - 2 * first_qkv + lora + attention


@pytest.mark.parametrize(
    "method,levers",
    [
        ("lora", ("train.gradient_checkpointing=true", "train.precision=bf16-mixed", "train.grad_accum=2")),
        *(pytest.param(m, (), marks=pytest.mark.slow) for m in METHODS),
    ],
)
def test_layer_extrapolation_equals_the_whole_trace(method, levers):
    """Traces of the 2- and 3-layer models give the 4-layer model's bytes, peak and FLOPs (every
    calibration also shows it, against the real 4-layer step)."""
    cfg = compose_estimate("model=tiny-gpt2", f"method={method}", *TINY, *levers)
    model, _ = E.build(cfg)
    assert model.config.num_hidden_layers > 3
    assert E.trace_model(model.config, cfg) == E.trace(model.config, cfg)


def test_checkpointing_keeps_fewer_activations_and_counts_the_recomputation_apart():
    plain, ckpt = (
        E.estimate(compose_estimate("model=tiny-llama", "method=lora", *TINY, *extra))["metrics"]
        for extra in ((), ("train.gradient_checkpointing=true",))
    )
    assert ckpt["train_model_flops_per_token"] == plain["train_flops_per_token"]
    assert ckpt["train_flops_per_token"] > plain["train_flops_per_token"]
    assert "train_model_flops_per_token" not in plain
    assert ckpt["memory_activations_bytes"] < plain["memory_activations_bytes"]
    assert ckpt["peak_memory_bytes"] < plain["peak_memory_bytes"]


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
    assert m["peak_memory_bytes"] > m["memory_weights_bytes"] + m["memory_optimizer_bytes"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "peftbench.estimate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "sweep", [("lora", "prefix"), pytest.param(tuple(METHODS), marks=pytest.mark.slow, id="every-method")]
)
def test_hydra_sweep_over_presets_and_methods(sweep, tmp_path):
    proc = run_cli("-m", "model=llama3.2-3b,gpt3-175b", f"method={','.join(sweep)}", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert sorted((r["model"], r["method"]) for r in recs) == sorted(
        (m, meth) for m in ("llama3.2-3b", "gpt3-175b") for meth in sweep
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
        (["train.precision=mixed"], "train.precision=mixed: allowed: fp32, bf16-mixed, bf16, fp16-mixed, bf16-master"),
        (["train.grad_accum=0"], "train.grad_accum=0: must be an integer >= 1"),
        (["method=full", "model.quantize=nf4"], "model.quantize=nf4: method=full trains the base weights"),
        (["model.quantize=nf3"], "model.quantize=nf3: allowed: nf4, int8, null"),
        (["method=lora", "rank=0"], "method.rank=0"),
        (["model=gpt3-175b", "seq_length=4096"], "seq_length=4096: 4096 tokens exceed the model's context of 2048"),
        (["model=gpt3-175b", "method=prefix", "seq_length=2048"], "allowed: at most 2028"),
        (["model=nope"], "model=nope: no such option"),
        # the levers are spelled as in a run: the old top-level keys name the new one
        (["precision=bf16"], "precision=bf16: renamed; allowed: train.precision=bf16"),
        (["gradient_checkpointing=true"], "renamed; allowed: train.gradient_checkpointing=true"),
        (["-m", "batch_size=1,2"], "batch_size=1,2: renamed; allowed: train.batch_size=1,2"),
        (["grad_accum=2"], "grad_accum=2: renamed; allowed: train.grad_accum=2"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(args, expected, tmp_path, capsys):
    """In-process (the same ``main`` the module runs): the check phase stops before Hydra."""
    assert EA.main([*args, f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftbench.estimate: error: ") and err.strip().count("\n") == 0, err
    assert expected in err, err
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["model=llama2-7b", "model.arch.num_hidden_layers=100000"],
            "model.arch.num_hidden_layers=100000: the estimate builds every layer on the meta device, in host "
            "memory and time in proportion; allowed: at most 1,024 (the deepest published models have under 200)",
        ),
        (
            ["model=tiny-llama", "seq_length=128", "model.arch.hidden_size=1"],
            "transformers refuses this llama architecture: The hidden size (1) is not a multiple of the number of "
            "attention heads (8).; allowed: an architecture its config class accepts",
        ),
    ],
)
def test_an_impossible_or_huge_architecture_is_one_line_before_any_work(tmp_path, capsys, overrides, line):
    from peftbench.estimate import cli as estimate_cli

    code = estimate_cli.main([*overrides, f"results_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].endswith(line), err
    assert err[0].startswith("peftbench.estimate: error: model.arch")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------ every preset the run takes
def test_an_encoder_preset_is_estimated_as_sequence_classification_exactly():
    """model=minilm (its default task: classification) is estimated with its fresh two-class
    head trained; every part equals the tracker's measurement of the real step (bytes, FLOPs)."""
    for method, lever in (("lora", "fp32"), ("full", "checkpointing")):
        for part, est, got in EC.calibration_rows("minilm", method, lever, 2, 16):
            assert est == got, (method, lever, part, est, got)
    cfg = compose_estimate("model=minilm", "method=lora", "seq_length=64")
    built, _ = E.build(cfg)
    assert methods.trainable_parameters(built) == 74_498  # LoRA r=8 on q, v and the head: as a run counts


def test_a_glob_over_a_config_group_is_its_yaml_options():
    assert app.expand_globs(["-m", "model=glob(tiny-*)", "method=lora"]) == [
        "-m",
        "model=tiny-gpt2,tiny-llama",
        "method=lora",
    ]


@pytest.mark.slow
def test_every_model_preset_is_estimated(tmp_path):
    proc = run_cli("-m", "model=glob(*)", "method=lora", "seq_length=128", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the launcher failed" not in proc.stderr
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    presets = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
    assert sorted(r["model"] for r in recs) == presets and all(r["status"] == "ok" for r in recs)
