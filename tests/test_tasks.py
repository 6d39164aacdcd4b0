"""The task registry (one file per task, one YAML per task, nothing else to edit), and the
generated data pinned byte for byte."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from conftest import REPO, compose_config
from omegaconf import OmegaConf

from methods import ConfigError
from peftbench import tasks


def one_line_error(call, *args) -> str:
    with pytest.raises(ConfigError) as e:
        call(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- registry


def test_every_task_yaml_is_a_registered_task_and_back():
    yamls = {p.stem: yaml.safe_load(p.read_text()) for p in (REPO / "conf" / "task").glob("*.yaml")}
    assert set(yamls) == set(tasks.REGISTRY)
    for stem, conf in yamls.items():
        assert conf["name"] == stem and conf["kind"] == tasks.REGISTRY[stem].kind
        assert compose_config(f"task={stem}").task.name == stem


def test_a_task_is_one_registered_class(monkeypatch):
    monkeypatch.setattr(tasks, "REGISTRY", dict(tasks.REGISTRY))  # the throwaway task leaves no trace

    @tasks.register
    class Echo:
        name, kind = "echo", "causal-lm"

        def check(self, cfg):
            if cfg.num_train > 3:
                raise ConfigError(f"task.num_train={cfg.num_train}: echo has 3 examples; allowed: 1..3")

        def load(self, cfg):
            return tasks.RawTask(["a b"] * cfg.num_train, ["a"], None, None)

    cfg = compose_config("task=synthetic-lm", "task.name=echo", "task.num_train=2").task
    assert tasks.load(cfg).train_text == ["a b", "a b"]
    assert one_line_error(tasks.check, OmegaConf.merge(cfg, {"num_train": 4})).startswith("task.num_train=4: echo")
    assert one_line_error(tasks.check, OmegaConf.merge(cfg, {"kind": "classification"})) == (
        "task.kind=classification: task echo is causal-lm; allowed: causal-lm")
    with pytest.raises(RuntimeError, match="'echo' registered twice"):
        tasks.register(Echo)


def test_unknown_task_name_lists_the_registered_ones():
    cfg = compose_config("task=synthetic-lm", "task.name=nope").task
    for call in (tasks.check, tasks.load):
        assert one_line_error(call, cfg) == "task.name=nope: allowed: synthetic-cls, synthetic-lm, text-classification"


# --------------------------------------------------------------------------- generated data

# sha256 of the first 100 train and eval texts and labels of each generated task at its YAML
# defaults, computed with peftbench/tasks.py as of commit 4c1ba87 (before tasks became a package)
GOLDEN = {
    "synthetic-lm": "8e30ba9917c4d19fa7e9381dc5e35df64d1c1cab7c7c7d54e27f3a3909480f58",
    "synthetic-cls": "8e0207f95fb28d38ea6e136c639265572dbc0c27610b77c91127b532f7f0d174",
}


@pytest.mark.parametrize("name", GOLDEN)
def test_generated_data_is_byte_identical(name):
    raw = tasks.load(compose_config(f"task={name}").task)
    n = 100
    first = [raw.train_text[:n], raw.eval_text[:n], (raw.train_labels or [])[:n], (raw.eval_labels or [])[:n]]
    blob = json.dumps(first)
    assert hashlib.sha256(blob.encode()).hexdigest() == GOLDEN[name]
