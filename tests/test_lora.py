"""LoRA (methods/lora.py): invariants, closed-form parameter counts, and parity with Hugging
Face ``peft`` on tiny LLaMA (GQA), GPT-2 (Conv1D) and BERT models, in fp32 on the CPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

import methods
from methods import ConfigError, trainable_parameters
from methods.lora import LoRAConfig, LoRALayer
from peftbench.models import head_names

VOCAB = 97
ATOL = 1e-5


# --------------------------------------------------------------------------- tiny models


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # one padded row, so masking is exercised too
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def lora(model: torch.nn.Module, **kw):
    method = methods.build(LoRAConfig(**kw))
    return method, method.apply(model)


def randomize_b(model: torch.nn.Module, seed: int = 7) -> None:
    """Give every B a non-zero value (B starts at zero, which would hide most errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALayer):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)


def in_out(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or a Conv1D (whose weight is stored as (in, out))."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_at_init_equals_base(family):
    base = FAMILIES[family]()
    batch = inputs()
    want = logits(base, batch)
    _, model = lora(copy.deepcopy(base), rank=4, alpha=8.0)
    assert torch.equal(logits(model, batch), want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_unmerge_and_merged_weight(family):
    base = FAMILIES[family]()
    method, model = lora(base, rank=4, alpha=8.0, targets="all-linear")
    randomize_b(model)
    batch = inputs()
    unmerged = logits(model, batch)
    layers = method.layers(model)
    originals = [layer.base.weight.detach().clone() for layer in layers]

    method.merge(model)
    merged_weights = [layer.base.weight.detach().clone() for layer in layers]
    for layer, w0, wm in zip(layers, originals, merged_weights):
        delta = layer.scaling * (layer.lora_B @ layer.lora_A).detach()  # (out, in)
        if isinstance(layer.base, Conv1D):
            delta = delta.T  # Conv1D stores (in, out)
        torch.testing.assert_close(wm, w0 + delta, atol=1e-6, rtol=0)
        assert layer.scaling == 8.0 / 4
    torch.testing.assert_close(logits(model, batch), unmerged, atol=ATOL, rtol=0)

    method.merge(model)  # a second merge is a no-op
    for layer, wm in zip(layers, merged_weights):
        assert torch.equal(layer.base.weight, wm)

    method.unmerge(model)
    for layer, w0 in zip(layers, originals):
        torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=ATOL, rtol=0)
    method.unmerge(model)  # a second unmerge is a no-op too
    for layer, w0 in zip(layers, originals):
        torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_only_lora_parameters_change_when_training(family):
    model = FAMILIES[family]()
    method, model = lora(model, rank=4, alpha=8.0)
    names = method.adapter_names(model)
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = inputs()
    for _ in range(3):
        out = model(**batch)
        out.logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in names:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_trainable_count_closed_form():
    # LLaMA, GQA: q_proj h -> h, v_proj h -> kv_heads * head_dim.
    model = tiny_llama()
    h, layers, kv = 32, 2, 2 * (32 // 4)
    _, model = lora(model, rank=4)
    assert trainable_parameters(model) == layers * 4 * ((h + h) + (h + kv))
    # GPT-2: the fused c_attn, h -> 3h.
    _, model = lora(tiny_gpt2(), rank=4)
    assert trainable_parameters(model) == layers * 4 * (h + 3 * h)
    # BERT: query and value, h -> h each.
    _, model = lora(tiny_bert(), rank=4)
    assert trainable_parameters(model) == layers * 4 * 2 * (h + h)
    # all-linear on LLaMA: q, k, v, o (h <-> h or kv), gate/up (h -> i), down (i -> h).
    i = 64
    _, model = lora(tiny_llama(), rank=4, targets="all-linear")
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
    assert trainable_parameters(model) == layers * 4 * per_layer


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trainable_count_is_sum_of_r_in_plus_out(family):
    base = FAMILIES[family]()
    method, model = lora(copy.deepcopy(base), rank=3, targets="all-linear")
    want = sum(3 * sum(in_out(base.get_submodule(n))) for n in method.targets)
    assert trainable_parameters(model) == want


def test_dropout_changes_train_outputs_only():
    base = tiny_llama()
    _, model = lora(copy.deepcopy(base), rank=4, dropout=0.5)
    _, plain = lora(copy.deepcopy(base), rank=4, dropout=0.0)
    randomize_b(model)
    randomize_b(plain)
    plain.load_state_dict(model.state_dict())
    batch = inputs()
    model.eval()
    torch.testing.assert_close(logits(model, batch), logits(plain, batch), atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(logits(model, batch), logits(plain, batch), atol=1e-3)


def test_bad_targets_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"method.target_modules=\['nope'\].*q_proj"):
        lora(tiny_llama(), target_modules=["nope"])
    with pytest.raises(ConfigError, match="method.rank=0"):
        lora(tiny_llama(), rank=0)
    with pytest.raises(ConfigError, match="method.targets=mlp"):
        lora(tiny_llama(), targets="mlp")


def test_regex_and_leaf_targets():
    method, _ = lora(tiny_llama(), target_modules=[r"model\.layers\.1\.self_attn\.(q|k)_proj", "down_proj"])
    assert sorted(method.targets) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj",
    ]


# ------------------------------------------------------------------------- parity with peft

CASES = {
    # name: (model factory, our settings, peft LoraConfig settings)
    "llama-qv": (tiny_llama, {}, {"target_modules": ["q_proj", "v_proj"]}),
    "gpt2-c_attn": (tiny_gpt2, {}, {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    "bert-qv": (tiny_bert, {}, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    "llama-rslora": (tiny_llama, {"rslora": True}, {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}),
    "llama-all-linear": (tiny_llama, {"targets": "all-linear"}, {"target_modules": "all-linear"}),
    "gpt2-all-linear": (tiny_gpt2, {"targets": "all-linear"}, {"target_modules": "all-linear", "fan_in_fan_out": True}),
    # peft leaves the classifier out of all-linear only for task_type SEQ_CLS (and trains it
    # whole, as modules_to_save); peftbench always does both, so SEQ_CLS is the like-for-like.
    "bert-all-linear": (tiny_bert, {"targets": "all-linear"}, {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_peft(case):
    import peft

    factory, ours_kw, peft_kw = CASES[case]
    rank, alpha = 4, 12.0
    base = factory()
    method, ours = lora(copy.deepcopy(base), rank=rank, alpha=alpha, **ours_kw)
    for n, p in ours.named_parameters():  # as the harness does: a task head always trains
        if n in head_names(ours):
            p.requires_grad_(True)
    randomize_b(ours)
    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, **peft_kw)
    )
    ref.eval()

    assert sorted(method.targets) == sorted(ref.base_model.targeted_module_names)
    assert trainable_parameters(ours) == ref.get_nb_trainable_parameters()[0]

    scale = alpha / math.sqrt(rank) if ours_kw.get("rslora") else alpha / rank
    with torch.no_grad():
        for name in method.targets:
            layer = ours.get_submodule(name)
            target = ref.base_model.model.get_submodule(name)
            assert layer.scaling == pytest.approx(scale) == target.scaling["default"]
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
    batch = inputs()
    want = logits(ref, batch)
    got = logits(ours, batch)
    assert not torch.allclose(got, logits(base, batch), atol=1e-3)  # the update is visible
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    method.merge(ours)
    ref.merge_adapter()
    torch.testing.assert_close(logits(ours, batch), logits(ref, batch), atol=ATOL, rtol=0)
