"""Measured figures of whole runs on tiny settings of the default model: invariants that hold
exactly (bytes, FLOPs, closed forms) and the relations between methods that must hold."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import compose_config

F32 = 4
TINY = (
    "train.steps=4",
    "train.batch_size=2",
    "train.timing_warmup=2",
    "task.num_train=16",
    "task.num_eval=4",
    "task.max_length=32",
    "measure.latency_repeats=2",
    "measure.latency_warmup=1",
    "measure.latency_batch=1",
    "measure.latency_length=16",
    "measure.latency_grid_batches=[1,2]",
    "measure.latency_grid_lengths=[8,16]",
    "measure.decode_tokens=4",
    "measure.decode_repeats=1",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Records of tiny runs, made once per module: full, LoRA twice, LoRA latency-only."""
    from peftbench.cli import run_and_write as run

    out = tmp_path_factory.mktemp("runs")
    cache: dict[str, dict] = {}

    def get(name: str, *overrides: str) -> dict:
        if name not in cache:
            rec, _ = run(compose_config(*TINY, f"results_dir={out}", *overrides))
            assert rec["status"] == "ok", rec.get("error")
            cache[name] = rec
        return cache[name]

    return get


def lora_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the default LoRA's parameters, from the model's structure."""
    import methods
    from peftbench import models

    cfg = compose_config("method=lora")
    meta = models.build_meta(cfg.model, "causal-lm", cfg.task.vocab_size)
    method = methods.build(cfg.method)
    model = method.apply(meta)
    params = dict(model.named_parameters())
    return {n: tuple(params[n].shape) for n in sorted(method.adapter_names(model))}


def buffer_bytes() -> int:
    """Bytes of the default model's buffers, from its structure on the meta device."""
    from peftbench import models

    cfg = compose_config()
    meta = models.build_meta(cfg.model, "causal-lm", cfg.task.vocab_size)
    return sum(b.numel() * b.element_size() for b in meta.buffers())


def safetensors_closed_form(shapes: dict[str, tuple[int, ...]]) -> int:
    """8-byte header length + JSON header (names sorted, compact, space-padded to 8 bytes) +
    4 bytes per float32 scalar: the safetensors layout."""
    header, offset = {}, 0
    for name, shape in sorted(shapes.items()):
        n = F32 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    return 8 + (len(text) + 7) // 8 * 8 + offset


def test_breakdown_adds_up_and_optimizer_state_is_closed_form(runs):
    full, lora = runs("full", "method=full"), runs("lora", "method=lora", "rank=8")
    for rec in (full, lora):
        m = rec["metrics"]
        parts = sum(m[f"memory_{c}_bytes"] for c in ("weights", "gradients", "optimizer", "activations"))
        assert parts == m["peak_memory_bytes"]
        assert m["eval_memory_weights_bytes"] + m["eval_memory_activations_bytes"] == m["eval_peak_memory_bytes"]
        # AdamW keeps exp_avg and exp_avg_sq per trained scalar and a 4-byte step per tensor.
        n_tensors = m["checkpoint_tensors"]
        assert m["memory_optimizer_bytes"] == 2 * F32 * m["trainable_params"] + F32 * n_tensors
        # weights: every parameter and buffer (the rotary embedding's frequencies)
        assert m["memory_weights_bytes"] == F32 * m["total_params"] + buffer_bytes()
    assert lora["metrics"]["memory_optimizer_bytes"] < 0.05 * full["metrics"]["memory_optimizer_bytes"]
    assert lora["metrics"]["peak_memory_bytes"] < full["metrics"]["peak_memory_bytes"]


def test_same_config_same_bytes_and_flops(runs):
    a, b = runs("lora", "method=lora", "rank=8"), runs("lora-again", "method=lora", "rank=8", "seed=0")
    keys = [k for k in a["metrics"] if k.endswith("_bytes") or "flops" in k]
    assert len(keys) >= 12
    assert {k: a["metrics"][k] for k in keys} == {k: b["metrics"][k] for k in keys}


def test_lora_train_flops_are_about_two_thirds_of_full(runs):
    """Frozen weights get no weight gradient: a frozen linear layer costs forward + input
    gradient (2 matmuls) instead of 3; attention and LoRA's own small matmuls keep it above 2/3."""
    full, lora = runs("full", "method=full"), runs("lora", "method=lora", "rank=8")
    ratio = lora["metrics"]["train_flops_per_step"] / full["metrics"]["train_flops_per_step"]
    assert 0.55 < ratio < 0.75, ratio
    # one forward at the default point costs the same whether LoRA is merged or not trained
    assert full["metrics"]["inference_flops"] == lora["metrics"]["inference_flops"]


def test_latency_grid_and_decode(runs):
    rec = runs("lora", "method=lora", "rank=8")
    grid = rec["latency_grid"]
    assert [(g["batch"], g["length"]) for g in grid] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    for g in grid:
        assert g["inference_latency_ms"] > 0 and g["inference_latency_unmerged_ms"] > 0
    m = rec["metrics"]
    assert m["inference_latency_ms"] == grid[1]["inference_latency_ms"]  # default point (1, 16)
    assert m["decode_ms_per_token"] is not None and m["decode_unmerged_ms_per_token"] is not None
    full = runs("full", "method=full")["metrics"]
    assert "inference_latency_unmerged_ms" not in full  # nothing to merge


def test_checkpoint_bytes_closed_form(runs):
    lora = runs("lora", "method=lora", "rank=8")["metrics"]
    assert lora["checkpoint_bytes"] == safetensors_closed_form(lora_shapes())
    assert lora["checkpoint_params"] == lora["trainable_params"]
    full = runs("full", "method=full")["metrics"]
    assert 0 < full["checkpoint_bytes"] - F32 * full["total_params"] < 16_384  # header only


def test_latency_only_run(runs):
    rec = runs("lora-steps0", "method=lora", "train.steps=0")
    m = rec["metrics"]
    assert "peak_memory_bytes" not in m and "eval_loss" not in m and "train_flops_per_step" not in m
    assert m["inference_peak_memory_bytes"] > m["inference_memory_weights_bytes"] > 0
    assert m["inference_flops"] > 0 and m["inference_latency_ms"] > 0
    assert len(rec["latency_grid"]) == 4


def test_classification_has_no_decode(runs):
    m = runs("cls", "method=lora", "task=synthetic-cls", "train.steps=0")["metrics"]
    assert m["decode_ms_per_token"] is None
    assert m["inference_flops"] > 0
