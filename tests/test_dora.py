"""DoRA (methods/dora.py): closed-form counts and parity with Hugging Face peft 0.21
(``LoraConfig(use_dora=True)``) in trainable count and outputs, unmerged and merged, on tiny
LLaMA (GQA), GPT-2 (Conv1D) and BERT models; the norm carries no gradient, as in peft."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, KV, LAYERS, TASK, H, batch, logits, perturb

import methods
from methods import ConfigError, trainable_parameters
from methods.dora import DoRAConfig, DoRALayer
from peftbench.models import head_names

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ATOL = 1e-5
PEFT_TARGETS = {
    "llama": {"target_modules": ["q_proj", "v_proj"]},
    "gpt2": {"target_modules": ["c_attn"], "fan_in_fan_out": True},
    "bert": {"target_modules": ["query", "value"]},
}


def dora(model, **kw):
    method = methods.build(DoRAConfig(rank=4, alpha=8.0, **kw))
    return method, method.apply(model)


def test_trainable_count_closed_form():
    # r (in + out) + out per layer: LLaMA q (h -> h), v (h -> kv); GPT-2 c_attn (h -> 3h); BERT q, v (h -> h)
    r = 4
    assert trainable_parameters(dora(FAMILIES["llama"]())[1]) == LAYERS * (r * (H + H) + H + r * (H + KV) + KV)
    assert trainable_parameters(dora(FAMILIES["gpt2"]())[1]) == LAYERS * (r * (H + 3 * H) + 3 * H)
    assert trainable_parameters(dora(FAMILIES["bert"]())[1]) == LAYERS * 2 * (r * (H + H) + H)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parity_with_peft(family):
    import peft

    base = FAMILIES[family]()
    method, ours = dora(copy.deepcopy(base))
    for n, p in ours.named_parameters():  # as the harness does: a task head always trains
        if n in head_names(ours):
            p.requires_grad_(True)
    perturb(ours, method.adapter_names(ours))
    cfg = peft.LoraConfig(r=4, lora_alpha=8.0, use_dora=True, task_type=TASK[family], **PEFT_TARGETS[family])
    ref = peft.get_peft_model(copy.deepcopy(base), cfg).eval()

    assert sorted(method.targets) == sorted(ref.base_model.targeted_module_names)
    assert trainable_parameters(ours) == ref.get_nb_trainable_parameters()[0]
    with torch.no_grad():
        for name in method.targets:
            layer, target = ours.get_submodule(name), ref.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            target.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    b = batch(family)
    got = logits(ours, b)
    assert not torch.allclose(got, logits(base, b), atol=1e-3)  # the update is visible
    torch.testing.assert_close(got, logits(ref, b), atol=ATOL, rtol=0)

    method.merge(ours)
    ref.merge_adapter()
    torch.testing.assert_close(logits(ours, b), logits(ref, b), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(ours, b), got, atol=ATOL, rtol=0)


def test_gradients_match_peft_so_the_norm_is_detached():
    """Same loss, same gradients on A, B and m as peft, whose norm is detached."""
    import peft

    base = FAMILIES["llama"]()
    method, ours = dora(copy.deepcopy(base))
    perturb(ours, method.adapter_names(ours))
    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8.0, use_dora=True, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name in method.targets:
            layer, target = ours.get_submodule(name), ref.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            target.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    b = batch("llama")
    ours(**b).loss.backward()
    ref(**b).loss.backward()
    for name in method.targets:
        layer, target = ours.get_submodule(name), ref.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_B.grad, target.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.lora_A.grad, target.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(
            layer.lora_magnitude.grad, target.lora_magnitude_vector["default"].weight.grad, atol=1e-6, rtol=1e-4
        )


def test_magnitude_starts_at_the_column_norm():
    method, model = dora(FAMILIES["gpt2"]())
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, DoRALayer)
    torch.testing.assert_close(layer.lora_magnitude, torch.linalg.norm(layer.base.weight.T, dim=1))
    assert method.describe(model)["norm"] == "detached"


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="method.rank=0"):
        methods.build(DoRAConfig(rank=0))
    with pytest.raises(ConfigError, match="method.lr_ratio=-1"):
        methods.build(DoRAConfig(lr_ratio=-1))
