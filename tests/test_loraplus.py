"""LoRA+ (``method=lora method.lr_ratio=16``, ``method=loraplus``): B at lr_ratio x the learning
rate of A, the rest at the base rate; the groups against peft 0.21's
``create_loraplus_optimizer`` (same parameters at the same rates)."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import FAMILIES, TASK

import methods
from methods.lora import LoRAConfig
from peftbench.errors import ConfigError
from peftbench.models import head_names

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LR, RATIO = 1e-3, 16.0
PEFT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


def rates(model: torch.nn.Module, groups: list[dict]) -> dict[str, float]:
    """Parameter name (peft's prefix and adapter name stripped) -> its learning rate."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)].removeprefix("base_model.model.").replace("modules_to_save.default.", "")
            out[n.replace("lora_A.default.weight", "lora_A").replace("lora_B.default.weight", "lora_B")] = g["lr"]
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_groups_match_peft(family):
    import peft
    from peft.optimizers import create_loraplus_optimizer

    base = FAMILIES[family]()
    method = methods.build(OmegaConf.structured(LoRAConfig(rank=4, lr_ratio=RATIO)))
    ours = method.apply(copy.deepcopy(base))
    for n, p in ours.named_parameters():
        if n in head_names(ours):
            p.requires_grad_(True)
    mine = rates(ours, methods.param_groups(method, ours, LR))

    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4, target_modules=PEFT_TARGETS[family], task_type=TASK[family], fan_in_fan_out=family == "gpt2"
        ),
    )
    opt = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    theirs = rates(ref, opt.param_groups)
    assert sorted(mine) == sorted(theirs)
    assert {n: r for n, r in mine.items() if "lora_B" in n} == {n: LR * RATIO for n in mine if "lora_B" in n}
    # peft puts every 1-D parameter at B's rate, the classifier's bias included; peftbench trains
    # the task head at the base rate, as the paper leaves it
    differ = {n for n in mine if mine[n] != theirs[n]}
    assert differ == ({"classifier.bias"} if family == "bert" else set())
    assert theirs.get("classifier.bias", LR * RATIO) == LR * RATIO and mine.get("classifier.bias", LR) == LR


def test_plain_lora_uses_the_loops_single_group_and_loraplus_is_lora_at_16():
    model = FAMILIES["llama"]()
    lora = methods.build(OmegaConf.structured(LoRAConfig()))
    assert methods.param_groups(lora, lora.apply(copy.deepcopy(model)), LR) is None
    plus = methods.build(OmegaConf.structured(methods.REGISTRY["loraplus"].config_class))
    wrapped = plus.apply(copy.deepcopy(model))
    assert sorted(g["lr"] for g in methods.param_groups(plus, wrapped, LR)) == [LR, LR * 16]
    with pytest.raises(ConfigError, match="method.lr_ratio=0"):
        methods.build(OmegaConf.structured(LoRAConfig(lr_ratio=0.0)))


def test_run_records_the_ratio(tiny_run):
    rec, _ = tiny_run("method=lora", "method.lr_ratio=16")
    assert rec["status"] == "ok", rec.get("error")
    assert rec["method_config"]["lr_ratio"] == 16.0
