"""``method=compose`` (methods/compose.py): the parts' counts add, the output equals applying the
parts by hand, merge folds what folds, context tokens add, optimizer groups come from the parts,
per-part overrides, config errors; and a run through the harness."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import FAMILIES, batch, logits, perturb

import methods
from methods import ConfigError, trainable_parameters
from methods.compose import ComposeConfig

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PARTS = [["lora", "prefix"], ["ia3", "prompt"], ["dora", "adapter"], [{"name": "lora", "rank": 2}, "prompt", "prefix"]]


def compose(parts):
    return methods.build(OmegaConf.structured(ComposeConfig(parts=parts)))


def alone(item):
    """The part as its own method, from the same config ``compose`` resolves for it."""
    from methods.compose import part_config

    return methods.build(part_config(0, item))


@pytest.mark.parametrize("parts", PARTS, ids=lambda p: "+".join(x if isinstance(x, str) else x["name"] for x in p))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_counts_add_and_output_equals_the_parts_by_hand(family, parts):
    base = FAMILIES[family]()
    method = compose(parts)
    torch.manual_seed(3)
    model = method.apply(copy.deepcopy(base))
    counts = [trainable_parameters(alone(p).apply(copy.deepcopy(base))) for p in parts]
    assert trainable_parameters(model) == sum(counts) == method.trainable_closed_form(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == method.adapter_names(model)

    torch.manual_seed(3)
    by_hand = copy.deepcopy(base)
    for p in parts:
        by_hand = alone(p).apply(by_hand)
    perturb(model, method.adapter_names(model))
    by_hand.load_state_dict(model.state_dict())
    b = batch(family)
    torch.testing.assert_close(logits(model, b), logits(by_hand, b), atol=0, rtol=0)
    assert method.context_tokens == sum(alone(p).context_tokens for p in parts)


def test_merge_folds_the_mergeable_parts_and_describe_says_what_stays():
    method = compose(["lora", "prefix"])
    model = method.apply(FAMILIES["llama"]())
    perturb(model, method.adapter_names(model))
    b = batch("llama")
    before = logits(model, b)
    q = model.get_submodule("base_model.model.layers.0.self_attn.q_proj")
    w0 = q.base.weight.detach().clone()
    assert method.merge(model) is True and q.merged
    torch.testing.assert_close(logits(model, b), before, atol=1e-5, rtol=0)
    assert not torch.equal(q.base.weight, w0)
    method.unmerge(model)
    torch.testing.assert_close(q.base.weight, w0, atol=1e-6, rtol=0)
    d = method.describe(model)
    assert d["unmerged"] == ["prefix"] and [p["name"] for p in d["parts"]] == ["lora", "prefix"]
    assert d["context_tokens"] == 20 and not method.mergeable and not method.identity_at_init
    assert compose(["lora", "ia3"]).mergeable and compose(["lora", "adapter"]).identity_at_init


def test_param_groups_come_from_the_parts():
    method = compose(["loraplus", "prompt"])
    model = method.apply(FAMILIES["gpt2"]())
    groups = methods.param_groups(method, model, 1e-3)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    named = dict(model.named_parameters())
    assert by_lr[1e-3 * 16] == {id(p) for n, p in named.items() if n.endswith("lora_B")}
    assert {id(named["prompt_encoder.embedding.weight"])} <= by_lr[1e-3]
    assert methods.param_groups(compose(["lora", "prompt"]), model, 1e-3) is None


@pytest.mark.parametrize(
    "parts,message",
    [
        (["lora", "nope"], r"method.parts\[1\].name=nope: allowed: adapter, dora"),
        (["full"], r"method.parts\[0\].name=full"),
        ([{"name": "lora", "rnk": 4}], r"method.parts\[0\].rnk=4: not a setting of lora"),
        ([{"name": "lora", "rank": 0}], r"method.parts\[0\].rank=0"),
        (["lora", "lora"], "a method appears twice"),
        ([], r"method.parts=\[\]"),
    ],
)
def test_bad_parts_are_one_line_config_errors(parts, message):
    with pytest.raises(ConfigError, match=message) as e:
        compose(parts)
    assert "\n" not in str(e.value)


def test_overrides_through_hydra_and_a_run(tiny_run):
    from conftest import compose_config

    cfg = compose_config("method=compose", "method.parts=[{name:lora,rank:4},{name:prefix,num_virtual_tokens:10}]")
    method = methods.build(cfg.method)
    assert [p.cfg.rank if p.name == "lora" else p.cfg.num_virtual_tokens for p in method.parts] == [4, 10]
    rec, _ = tiny_run("method=compose")
    assert rec["status"] == "ok", rec.get("error")
    # tiny-llama: LoRA r=8 on q (256 -> 256) and v (256 -> 128) of 4 layers + prefix 20 x 4 x 2 x 128
    assert rec["metrics"]["trainable_params"] == 4 * 8 * ((256 + 256) + (256 + 128)) + 20 * 4 * 2 * 128
    assert rec["method_config"]["unmerged"] == ["prefix"]
