"""Every method on every built-in model family, end to end through the harness (short runs).

The trainable counts are pinned: a change to a method or a preset that moves one is a change
in what the results mean, and must show up here.
"""

from __future__ import annotations

import pytest

# (method overrides, model) -> trainable parameters (a fresh classifier head included for minilm)
EXPECTED = {
    ("full", "tiny-llama"): None,  # everything: equals total_params
    ("lora", "tiny-llama"): 4 * (8 * (256 + 256) + 8 * (256 + 128)),
    ("adapter", "tiny-llama"): 4 * 2 * (2 * 256 * 16 + 16 + 256),
    ("prefix", "tiny-llama"): 20 * 4 * 2 * 128,
    ("full", "tiny-gpt2"): None,
    ("lora", "tiny-gpt2"): 4 * 8 * (256 + 3 * 256),
    ("adapter", "tiny-gpt2"): 4 * 2 * (2 * 256 * 16 + 16 + 256),
    ("prefix", "tiny-gpt2"): 20 * 4 * 2 * 256,
    ("full", "minilm"): None,
    ("lora", "minilm"): 6 * 2 * 8 * (384 + 384) + (384 * 2 + 2),
    ("adapter", "minilm"): 6 * 2 * (2 * 384 * 24 + 24 + 384) + (384 * 2 + 2),
    ("prefix", "minilm"): 20 * 6 * 2 * 384 + (384 * 2 + 2),
}


@pytest.mark.parametrize("method,model", list(EXPECTED), ids=[f"{a}-{b}" for a, b in EXPECTED])
def test_method_runs_on_family(method, model, tiny_run):
    rec, _ = tiny_run(f"method={method}", f"model={model}")
    assert rec["status"] == "ok", rec["error"]
    m = rec["metrics"]
    expected = EXPECTED[(method, model)]
    assert m["trainable_params"] == (m["total_params"] if expected is None else expected)
    assert m["eval_loss"] > 0 and m["inference_latency_ms"] > 0
    if model == "minilm":
        assert rec["task"] == "synthetic-cls" and 0 <= m["eval_accuracy"] <= 1
