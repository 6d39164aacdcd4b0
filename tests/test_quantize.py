"""``model.quantize``: a frozen base stored in NF4 or int8 (peftbench.quantize), QLoRA's setting.

Bytes are pinned to the closed form and to hand counts; a method over a quantized base is
checked against the same method over a dense base that holds the dequantized weights; merging
LoRA is a dequantize-merge that unmerges bit for bit; the config refuses what cannot work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import methods
from peftbench import app, cli
from peftbench.memory import TensorMemoryTracker, plain_tensors
from peftbench.quality.forgetting import cache_key
from peftbench.quantize import (
    SCHEMES,
    QuantizedLinear,
    dequantize,
    nf4_scaler_block_size,
    quantize_base,
    quantize_weight,
    quantized_bytes,
    scheme_of,
)

from conftest import TINY_RUN

VOCAB = 97


def tiny(arch: str) -> nn.Module:
    """A seeded two-layer model of ``arch``; every linear layer's size is a multiple of 64."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if arch == "llama":  # intermediate 172: 172 NF4 blocks, one scaler block of 172
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(cfg).eval()
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def batch(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1]) if arch == "bert" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def method(name: str, **kw):
    return methods.build(methods.REGISTRY[name].config_class(**kw))


def weight_bytes(model: nn.Module, optimizer=None) -> int:
    tracker = TensorMemoryTracker(model, optimizer, "cpu")
    found = tracker.summary()["memory_weights_bytes"]
    tracker.close()
    return found


# ---------------------------------------------------------------------------------- bytes
# (out, in) -> hand count. nf4: values n/2 + block scalers n/64 + 4 per scaler-block factor
# + the scalers' mean 4 + the 16-entry lookup table 64 (float32). int8: n + 4 + 1 per row.
HAND = {
    ("nf4", (688, 256)): 88_064 + 2_752 + 16 * 4 + 4 + 64,  # 2,752 blocks: 16 scaler blocks of 172
    ("nf4", (128, 128)): 8_192 + 256 + 1 * 4 + 4 + 64,  # one scaler block: its factor is 4 bytes
    ("nf4", (256, 100)): 12_800 + 400 + 2 * 4 + 4 + 64,  # 400 blocks: 2 scaler blocks of 200
    ("int8", (688, 256)): 176_128 + 688 * 5,
    ("int8", (128, 128)): 16_384 + 128 * 5,
    ("int8", (256, 100)): 25_600 + 256 * 5,
}


@pytest.mark.parametrize("scheme,shape", list(HAND), ids=[f"{s}-{o}x{i}" for s, (o, i) in HAND])
def test_tracked_weight_bytes_equal_the_closed_form(scheme, shape):
    layer = QuantizedLinear.from_module(nn.Linear(shape[1], shape[0], bias=False), scheme)
    assert weight_bytes(layer) == quantized_bytes(shape, scheme) == HAND[(scheme, shape)]
    assert layer.weight.numel() == shape[0] * shape[1]  # parameter counts stay the logical count


def test_nf4_scaler_block_is_the_largest_divisor_up_to_256():
    assert [nf4_scaler_block_size(n * 64) for n in (1, 256, 512, 2752, 5184, 257)] == [1, 256, 256, 172, 216, 1]


def test_bf16_weights_are_2_bytes_per_element_dense_and_in_the_nf4_tables():
    dense = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    assert weight_bytes(dense) == 64 * 32 * 2
    layer = QuantizedLinear.from_module(nn.Linear(256, 128, dtype=torch.bfloat16), "nf4")
    assert layer.weight.dtype == torch.bfloat16
    # factor, mean and lookup table in bfloat16; the bias stays a dense bf16 vector
    expected = 16_384 + 512 + 2 * 2 + 2 + 16 * 2 + 128 * 2
    assert weight_bytes(layer) == quantized_bytes((128, 256), "nf4", torch.bfloat16) + 128 * 2 == expected


def test_training_step_of_lora_on_a_quantized_llama_adds_up():
    model = tiny("llama")
    dense_bytes = weight_bytes(model)
    info = quantize_base(model, "nf4")
    assert info["modules_quantized"] == 2 * 7 and info["modules_left_dense"] == []
    assert weight_bytes(model) == dense_bytes - info["saved_bytes"]  # exact, as the closed form says
    model = method("lora").apply(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    b = batch("llama")
    tracker = TensorMemoryTracker(model, opt, "cpu", extra=b.values())
    with tracker:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    s = tracker.summary()
    tracker.close()
    lora = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    parts = [s[f"memory_{c}_bytes"] for c in ("weights", "gradients", "optimizer", "activations")]
    assert sum(parts) == s["peak_memory_bytes"]
    assert s["memory_weights_bytes"] == dense_bytes - info["saved_bytes"] + lora


# ------------------------------------------------------------------------------ numerics
def test_quantization_error_is_small_and_int8_is_finer_than_nf4():
    torch.manual_seed(0)
    w = nn.Linear(256, 688).weight.detach()
    err = {s: float((dequantize(quantize_weight(w, s), torch.float32) - w).norm() / w.norm()) for s in SCHEMES}
    # observed: nf4 0.091, int8 0.0039 (relative Frobenius error on nn.Linear's initialisation)
    assert 0.05 < err["nf4"] < 0.1 and err["int8"] < 0.005 and err["int8"] < err["nf4"] / 10


def dense_twin(quantized: nn.Module, arch: str) -> nn.Module:
    """The same model with every quantized weight replaced by its dense dequantized copy."""
    twin = tiny(arch)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, QuantizedLinear):
                w = dequantize(m.weight, torch.float32)
                target = twin.get_submodule(name)
                target.weight.copy_(w if isinstance(target, nn.Linear) else w.T)
    return twin


@pytest.mark.parametrize("scheme", SCHEMES)
def test_lora_on_a_quantized_base_matches_lora_on_the_dequantized_dense_base(scheme):
    model = tiny("llama")
    quantize_base(model, scheme)
    twin = dense_twin(model, "llama")
    b = batch("llama")
    with torch.no_grad():
        base_logits = model(**b).logits
    lora = method("lora", targets="all-linear")
    torch.manual_seed(3)
    model = lora.apply(model)
    torch.manual_seed(3)
    twin = method("lora", targets="all-linear").apply(twin)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, base_logits)  # B = 0: exactly the quantized base
        for m in (model, twin):  # B away from zero, identically, so that A gets a gradient too
            for name, p in m.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    loss, twin_loss = model(**b).loss, twin(**b).loss
    loss.backward()
    twin_loss.backward()
    torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-6)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == lora.adapter_names(model) and len(grads) == 2 * 2 * 7
    twin_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, twin_params[name].grad, rtol=1e-4, atol=1e-6)


def stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every inner tensor of every quantized weight, by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            for i, t in enumerate(plain_tensors(m.weight)):
                out[f"{name}.{i}"] = t.clone()
    return out


ARCHS = ("llama", "gpt2", "bert")
FROZEN_BASE = sorted(n for n, cls in methods.REGISTRY.items() if not getattr(cls, "trains_base", False))
CASES = [(n, a, "nf4") for n in FROZEN_BASE for a in ARCHS] + [("lora", a, "int8") for a in ARCHS]


@pytest.mark.parametrize("name,arch,scheme", CASES, ids=["-".join(c) for c in CASES])
def test_every_frozen_base_method_trains_and_merges_on_a_quantized_base(name, arch, scheme):
    """Only the method's parameters get gradients; a method that starts as the base starts as the
    quantized base exactly; merging is a dequantize-merge (dense weights, merged output equal to
    unmerged) and unmerging restores the stored bits and the unmerged output exactly."""
    model = tiny(arch)
    info = quantize_base(model, scheme)
    # every linear layer but the output layer / task head: GPT-2's Conv1D too, BERT's pooler too
    assert info["modules_quantized"] == {"llama": 2 * 7, "gpt2": 2 * 4, "bert": 2 * 6 + 1}[arch]
    b = batch(arch)
    with torch.no_grad():
        base_out = model(**b).logits
    m = method(name)
    model = m.apply(model)
    if m.identity_at_init:
        with torch.no_grad():
            assert torch.equal(model(**b).logits, base_out)
    model(**b).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and grads <= m.adapter_names(model)
    if not m.mergeable:
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # away from the identity, so that the merge has something to fold
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        before = stored(model)
        unmerged = model(**b).logits
        assert m.merge(model)
        quantized = [q for q in model.modules() if isinstance(q, QuantizedLinear)]
        merged_layers = [q for q in quantized if q.merged]
        assert merged_layers and all(type(q.weight) is nn.Parameter for q in merged_layers)
        merged = model(**b).logits
        m.unmerge(model)
        again = model(**b).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, unmerged)
    after = stored(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(q.merged for q in quantized)


def test_lora_merge_writes_the_dequantized_weight_plus_the_update():
    model = tiny("gpt2")  # a Conv1D base: the update is added in the quantized layer's (out, in)
    quantize_base(model, "nf4")
    lora = method("lora")
    model = lora.apply(model)
    layer = lora.layers(model)[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        stored_weight = layer.base.weight
        expected = dequantize(stored_weight, torch.float32) + layer.delta_weight()
        lora.merge(model)
        assert torch.equal(layer.base.weight, expected)
        lora.unmerge(model)
    assert layer.base.weight is stored_weight


def test_a_gpt2_conv1d_becomes_a_linear_with_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(192, 64)  # weight (in 64, out 192)
    layer = QuantizedLinear.from_module(conv, "int8")
    assert isinstance(layer, nn.Linear) and layer.weight.shape == (192, 64) and layer.bias is conv.bias
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = x @ dequantize(layer.weight, torch.float32).T + conv.bias
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer(x), conv(x), rtol=0.02, atol=0.02)


def test_the_forgetting_reference_of_a_quantized_base_is_its_own():
    class Tok:  # what the key reads of a tokenizer: its length and its type's name
        def __len__(self):
            return VOCAB

    model = tiny("llama")
    assert scheme_of(model) is None
    quantize_base(model, "int8")
    assert scheme_of(model) == "int8"
    dense_key = cache_key("abc", Tok(), "plain", 8)
    assert cache_key("abc", Tok(), "plain", 8, None) == dense_key  # existing caches keep their names
    keys = {dense_key, *(cache_key("abc", Tok(), "plain", 8, scheme) for scheme in SCHEMES)}
    assert len(keys) == 3


# ------------------------------------------------------------------------------- harness
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftbench: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["method=full", "model.quantize=nf4"],
            "model.quantize=nf4: method=full trains the base weights, which a quantized base cannot; "
            f"allowed with methods that freeze the base: {', '.join(FROZEN_BASE)}",
        ),
        (["model.quantize=nf5"], "model.quantize=nf5: allowed: nf4, int8, null"),
    ],
)
def test_quantize_config_errors_are_one_line_exit_2_and_nothing_written(args, expected, tmp_path, capsys):
    assert cli.main([*TINY_RUN, *args, f"results_dir={tmp_path}"]) == app.EXIT_CONFIG
    assert one_error_line(capsys) == f"peftbench: error: {expected}"
    assert not list(tmp_path.rglob("*"))


def record(folder: Path) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


def test_a_run_on_an_nf4_base_saves_exactly_the_closed_form_bytes(tmp_path):
    args = [*TINY_RUN, "model=tiny-llama", "method=lora", "train.steps=3"]
    assert cli.main([*args, "model.quantize=nf4", f"results_dir={tmp_path / 'nf4'}"]) == app.EXIT_OK
    assert cli.main([*args, f"results_dir={tmp_path / 'dense'}"]) == app.EXIT_OK
    q, d = record(tmp_path / "nf4"), record(tmp_path / "dense")
    assert q["status"] == "ok" and "quantization" not in d
    info = q["quantization"]
    assert info["scheme"] == "nf4" and info["library"] == "torchao" and info["modules_quantized"] == 4 * 7
    assert info["inference_weights"] == "dequantize-merged (dense)"
    saved = info["dense_weight_bytes"] - info["quantized_weight_bytes"]
    qm, dm = q["metrics"], d["metrics"]
    assert qm["memory_weights_bytes"] == dm["memory_weights_bytes"] - saved
    assert qm["eval_memory_weights_bytes"] == dm["eval_memory_weights_bytes"] - saved
    # the same logical model: parameter counts, FLOPs and checkpoint are those of the dense run
    for key in ("trainable_params", "total_params", "train_flops_per_step", "inference_flops", "checkpoint_bytes"):
        assert qm[key] == dm[key], key
