"""Every registered method (``methods.REGISTRY``: a new method is tested here without being
listed) against the method contract, on tiny LLaMA (GQA), GPT-2 (Conv1D) and BERT models:

- its config class has ``name`` and ``lr``, and its defaults are those of ``conf/method/<name>.yaml``;
- it applies on the meta device, with the same trainable count as on real weights;
- only its own parameters (``adapter_names``) train;
- at init it computes what the base model computes, where it declares ``identity_at_init``;
- merge then unmerge restores every base weight; merged outputs equal unmerged ones where it
  declares ``mergeable``;
- the trainable count equals its closed form, where it declares one (``trainable_closed_form``).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import FAMILIES, batch, logits, perturb

import methods
from methods import trainable_parameters

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

NAMES = sorted(methods.REGISTRY)
CASES = [(m, f) for m in NAMES for f in sorted(FAMILIES)]
ATOL = 1e-5


def build(name: str):
    return methods.build(OmegaConf.structured(methods.REGISTRY[name].config_class))


def applied(name: str, family: str, meta: bool = False):
    method = build(name)
    torch.manual_seed(0)
    return method, method.apply(FAMILIES[family](meta=meta))


@pytest.mark.parametrize("name", NAMES)
def test_contract_attributes_and_yaml_defaults(name):
    from conftest import compose_config

    cls = methods.REGISTRY[name]
    assert cls.name == name and cls.__module__ == f"methods.{name}"  # config name = module name
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    assert {"name", "lr"} <= set(fields)
    method = build(name)
    for attr in ("mergeable", "identity_at_init", "context_tokens"):
        assert isinstance(getattr(method, attr), (bool, int)), attr
    for fn in ("apply", "adapter_names", "merge", "unmerge", "describe"):
        assert callable(getattr(method, fn)), fn
    yaml = OmegaConf.to_container(compose_config(f"method={name}").method, resolve=True)
    assert yaml == OmegaConf.to_container(OmegaConf.structured(cls.config_class))


@pytest.mark.parametrize("name,family", CASES)
def test_meta_apply_counts_the_same(name, family):
    _, meta = applied(name, family, meta=True)
    _, real = applied(name, family)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert trainable_parameters(meta) == trainable_parameters(real) > 0


@pytest.mark.parametrize("name,family", CASES)
def test_only_its_own_parameters_train_and_closed_form(name, family):
    method, model = applied(name, family)
    names = method.adapter_names(model)
    assert names and {n for n, p in model.named_parameters() if p.requires_grad} == names
    form = getattr(method, "trainable_closed_form", None)
    if form is not None and form(model) is not None:
        assert trainable_parameters(model) == form(model)


@pytest.mark.parametrize("name,family", CASES)
def test_identity_at_init(name, family):
    method = build(name)
    base = FAMILIES[family]()
    b = batch(family)
    same = torch.allclose(logits(method.apply(copy.deepcopy(base)), b), logits(base, b), atol=0, rtol=0)
    assert same == method.identity_at_init


@pytest.mark.parametrize("name,family", CASES)
def test_merge_unmerge(name, family):
    method, model = applied(name, family)
    perturb(model, method.adapter_names(model), scale=0.1)
    b = batch(family)
    before = logits(model, b)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    did = method.merge(model)
    assert did == method.mergeable or name == "compose"
    if method.mergeable:
        scale = max(1.0, before.abs().max().item())
        torch.testing.assert_close(logits(model, b), before, atol=ATOL * scale, rtol=0)
    method.unmerge(model)
    for n, p in model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(logits(model, b), before, atol=ATOL, rtol=0)
