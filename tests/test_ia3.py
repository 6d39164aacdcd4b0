"""(IA)^3 (methods/ia3.py): closed-form counts and parity with Hugging Face peft 0.21 (``IA3Config``
with its default target and feed-forward modules) in trainable count and outputs, unmerged and
merged, on tiny LLaMA (GQA), GPT-2 (Conv1D) and BERT models."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, KV, LAYERS, TASK, H, I, batch, logits, perturb

import methods
from methods import ConfigError, trainable_parameters
from methods.ia3 import IA3Config
from peftbench.models import head_names

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ATOL = 1e-5
# per layer: LLaMA k, v (kv out each) + down_proj in (intermediate); GPT-2 c_attn out (3h) +
# mlp.c_proj in (4h); BERT key, value out (h each) + output.dense in (intermediate) + attention.output.dense in (h)
CLOSED_FORM = {
    "llama": LAYERS * (KV + KV + I),
    "gpt2": LAYERS * (3 * H + 4 * H),
    "bert": LAYERS * (H + H + I + H),
}


def ia3(model, **kw):
    method = methods.build(IA3Config(**kw))
    return method, method.apply(model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parity_with_peft(family):
    import peft

    base = FAMILIES[family]()
    method, ours = ia3(copy.deepcopy(base))
    assert trainable_parameters(ours) == CLOSED_FORM[family] == method.trainable_closed_form(ours)
    for n, p in ours.named_parameters():  # as the harness does: a task head always trains
        if n in head_names(ours):
            p.requires_grad_(True)
    perturb(ours, method.adapter_names(ours), scale=0.2)
    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.IA3Config(task_type=TASK[family], fan_in_fan_out=family == "gpt2")
    ).eval()
    theirs = {
        n.removeprefix("base_model.model.").removesuffix(".ia3_l.default"): p
        for n, p in ref.named_parameters()
        if "ia3_l" in n
    }
    mine = {n.removesuffix(".ia3_l"): p for n, p in ours.named_parameters() if n.endswith(".ia3_l")}
    assert sorted(mine) == sorted(theirs)
    assert trainable_parameters(ours) == ref.get_nb_trainable_parameters()[0]
    with torch.no_grad():
        for name, p in mine.items():
            theirs[name].copy_(p.view_as(theirs[name]))
    b = batch(family)
    got, plain = logits(ours, b), logits(base, b)
    atol = ATOL * plain.abs().max().item()  # BERT's fresh head gives logits near 0.01
    assert (got - plain).abs().max() > 100 * atol  # the scaling is visible
    torch.testing.assert_close(got, logits(ref, b), atol=atol, rtol=0)

    method.merge(ours)
    ref.merge_adapter()
    torch.testing.assert_close(logits(ours, b), logits(ref, b), atol=atol, rtol=0)
    torch.testing.assert_close(logits(ours, b), got, atol=atol, rtol=0)


def test_sides_per_family():
    method, _ = ia3(FAMILIES["bert"]())
    d = method.describe(None)
    assert d["output_modules"] == ["key", "value"] and d["input_modules"] == ["dense"]
    assert "bert.encoder.layer.0.attention.output.dense" in d["module_paths"]["input"]
    method, _ = ia3(FAMILIES["gpt2"]())
    assert method.targets["input"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def test_explicit_modules_and_errors():
    method, model = ia3(FAMILIES["llama"](), target_modules=["v_proj"], feedforward_modules=[])
    assert trainable_parameters(model) == LAYERS * KV
    with pytest.raises(ConfigError, match=r"method.target_modules=\[\]"):
        methods.build(IA3Config(target_modules=[], feedforward_modules=[]))
    with pytest.raises(ConfigError, match=r"method.target_modules=\['nope'\]"):
        ia3(FAMILIES["llama"](), target_modules=["nope"], feedforward_modules=[])
    with pytest.raises(ConfigError, match="method.lr=0"):
        methods.build(IA3Config(lr=0.0))
