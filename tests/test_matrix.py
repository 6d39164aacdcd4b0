"""Every method on every built-in model family, end to end through the harness (short runs).

The trainable counts are pinned: a change to a method or a preset that moves one is a change
in what the results mean, and must show up here.
"""

from __future__ import annotations

import pytest

# (method, model) -> trainable parameters (a fresh classifier head included for minilm: 384 * 2 + 2).
# tiny-llama: hidden 256, key/value width 128, intermediate 688, 4 layers; tiny-gpt2: hidden 256,
# intermediate 1024, 4 layers; minilm (BERT): hidden 384, intermediate 1536, 6 layers. Rank 8.
LLAMA_LORA = 4 * (8 * (256 + 256) + 8 * (256 + 128))  # r (in + out) on q_proj and v_proj
GPT2_LORA = 4 * 8 * (256 + 3 * 256)  # r (in + out) on the fused c_attn
MINILM_LORA = 6 * 2 * 8 * (384 + 384)  # r (in + out) on query and value
HEAD = 384 * 2 + 2
EXPECTED = {
    ("full", "tiny-llama"): None,  # everything: equals total_params
    ("lora", "tiny-llama"): LLAMA_LORA,
    ("loraplus", "tiny-llama"): LLAMA_LORA,  # LoRA's layers; only the optimizer differs
    ("dora", "tiny-llama"): LLAMA_LORA + 4 * (256 + 128),  # + a magnitude per output feature
    ("ia3", "tiny-llama"): 4 * (128 + 128 + 688),  # k, v outputs + down_proj input
    ("adapter", "tiny-llama"): 4 * 2 * (2 * 256 * 16 + 16 + 256),
    ("prefix", "tiny-llama"): 20 * 4 * 2 * 128,
    ("prompt", "tiny-llama"): 20 * 256,  # n x hidden
    ("compose", "tiny-llama"): LLAMA_LORA + 20 * 4 * 2 * 128,  # lora + prefix
    ("full", "tiny-gpt2"): None,
    ("lora", "tiny-gpt2"): GPT2_LORA,
    ("loraplus", "tiny-gpt2"): GPT2_LORA,
    ("dora", "tiny-gpt2"): GPT2_LORA + 4 * 3 * 256,
    ("ia3", "tiny-gpt2"): 4 * (3 * 256 + 1024),  # c_attn output + mlp.c_proj input
    ("adapter", "tiny-gpt2"): 4 * 2 * (2 * 256 * 16 + 16 + 256),
    ("prefix", "tiny-gpt2"): 20 * 4 * 2 * 256,
    ("prompt", "tiny-gpt2"): 20 * 256,
    ("compose", "tiny-gpt2"): GPT2_LORA + 20 * 4 * 2 * 256,
    ("full", "minilm"): None,
    ("lora", "minilm"): MINILM_LORA + HEAD,
    ("loraplus", "minilm"): MINILM_LORA + HEAD,
    ("dora", "minilm"): MINILM_LORA + 6 * 2 * 384 + HEAD,
    ("ia3", "minilm"): 6 * (384 + 384 + 1536 + 384) + HEAD,  # key, value out; output.dense in (both)
    ("adapter", "minilm"): 6 * 2 * (2 * 384 * 24 + 24 + 384) + HEAD,
    ("prefix", "minilm"): 20 * 6 * 2 * 384 + HEAD,
    ("prompt", "minilm"): 20 * 384 + HEAD,
    ("compose", "minilm"): MINILM_LORA + 20 * 6 * 2 * 384 + HEAD,
}


def test_every_method_is_pinned():
    import methods

    assert {m for m, _ in EXPECTED} == set(methods.REGISTRY)


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
