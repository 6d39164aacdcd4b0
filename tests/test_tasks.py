"""The task registry (one file per task, one YAML per task, nothing else to edit), the generated
data pinned byte for byte, and bad local data files caught before any model is built."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from peftbench import tasks
from peftbench.errors import ConfigError
from peftbench.tasks import data

from conftest import REPO, compose_config


def task_cfg(path, **kw):
    """A text-classification task config as the yaml composes it, reading ``path``."""
    base = OmegaConf.to_container(compose_config("model=minilm", "task=text-classification", "task.path=x").task)
    return SimpleNamespace(**{**base, "path": str(path), **kw})


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

        def num_train_examples(self, cfg):
            return cfg.num_train

        def load(self, cfg):
            return tasks.RawTask(["a b"] * cfg.num_train, ["a"], None, None)

    cfg = compose_config("task=synthetic-lm", "task.name=echo", "task.num_train=2").task
    assert tasks.load(cfg).train_text == ["a b", "a b"] and tasks.num_train_examples(cfg) == 2
    assert one_line_error(tasks.check, OmegaConf.merge(cfg, {"num_train": 4})).startswith("task.num_train=4: echo")
    assert one_line_error(tasks.check, OmegaConf.merge(cfg, {"kind": "classification"})) == (
        "task.kind=classification: task echo is causal-lm; allowed: causal-lm"
    )
    with pytest.raises(RuntimeError, match="'echo' registered twice"):
        tasks.register(Echo)


def test_unknown_task_name_lists_the_registered_ones():
    cfg = compose_config("task=synthetic-lm", "task.name=nope").task
    for call in (tasks.check, tasks.load, tasks.num_train_examples):
        assert one_line_error(call, cfg) == f"task.name=nope: allowed: {', '.join(sorted(tasks.REGISTRY))}"


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


# --------------------------------------------------------------------------- bad input


def test_vocab_size_must_leave_room_for_a_word():
    for value in (0, 4):
        cfg = compose_config("task=synthetic-lm", f"task.vocab_size={value}").task
        assert one_line_error(tasks.check, cfg) == (
            f"task.vocab_size={value}: the word-level tokenizer needs its 4 special tokens "
            f"([PAD], [UNK], [BOS], [EOS]) and at least one word; allowed: an integer >= 5"
        )
    tasks.check(compose_config("task=synthetic-lm", "task.vocab_size=5").task)


def split_folder(tmp_path: Path, train: bytes, name="train.csv") -> Path:
    (tmp_path / name).write_bytes(train)
    (tmp_path / "validation.csv").write_text('text,label\n"fine",1\n')
    return tmp_path


def test_non_utf8_file_names_the_file_and_line(tmp_path):
    folder = split_folder(tmp_path, b'text,label\n"ok",1\n"\xff\xfe bad",0\n')
    assert one_line_error(tasks.check, task_cfg(folder)) == (
        f"task.path={folder}: train.csv line 3: not UTF-8 text (byte 0xff); "
        f"allowed: UTF-8 encoded .csv/.json/.jsonl files"
    )


def test_malformed_json_line_names_the_file_and_line(tmp_path):
    lines = [b'{"text": "a", "label": 0}', b"", b'{"text": "c" "label": 1}']
    folder = split_folder(tmp_path, b"\n".join(lines), "train.jsonl")
    assert one_line_error(tasks.check, task_cfg(folder)) == (
        f"task.path={folder}: train.jsonl line 3: not a JSON object (Expecting ',' delimiter at column 14)"
    )
    (folder / "train.jsonl").write_text('{"text": "a", "label": 0}\n["b", 1]\n')
    assert one_line_error(tasks.check, task_cfg(folder)).endswith('train.jsonl line 2: not a JSON object: ["b", 1]')
    (folder / "train.jsonl").write_text('{\n  "text": "a",\n  "label": 0\n}\n{"text": "b", "label": 1}\n')
    tasks.check(task_cfg(folder))  # objects spread over lines: datasets reads them too
    assert tasks.num_train_examples(task_cfg(folder)) == 2 == len(tasks.load(task_cfg(folder)).train_text)
    (folder / "train.jsonl").unlink()
    (folder / "train.json").write_text('[\n{"text": "a", "label": 0},\n{"text": "b", label: 1}\n]\n')
    assert one_line_error(tasks.check, task_cfg(folder)).endswith(
        "train.json line 3: not a JSON array of objects "
        "(Expecting property name enclosed in double quotes at column 15)"
    )


def test_ragged_csv_names_the_file_and_line(tmp_path):
    folder = split_folder(tmp_path, b'text,label\n"a",0\n"b, quoted",1\n\nb,1,extra\n')
    assert one_line_error(tasks.check, task_cfg(folder)) == (
        f"task.path={folder}: train.csv line 5: 3 fields but the header has 2; "
        f"allowed: at most 2 (quote a text that contains a comma)"
    )


def test_a_file_datasets_cannot_read_is_one_line_naming_it(tmp_path):
    folder = split_folder(tmp_path, b'text,label\n"a",0\n"b",1,extra\n')
    message = one_line_error(data.load_splits, task_cfg(folder))  # load without the up-front check
    assert message.startswith(f"task.path={folder}: train.csv: datasets cannot read it (")
    assert "Expected 2 fields in line 3, saw 3" in message


def test_num_train_examples_before_anything_is_loaded(tmp_path):
    assert tasks.num_train_examples(compose_config("task=synthetic-lm", "task.num_train=7").task) == 7
    assert tasks.num_train_examples(compose_config("model=minilm", "task=synthetic-cls").task) == 4000
    folder = split_folder(tmp_path, b'text,label\n"a, multi\nline",0\n\n"b",1\n"c",1\n')
    assert tasks.num_train_examples(task_cfg(folder)) == 3  # records, not lines; blank lines skipped
    assert tasks.num_train_examples(task_cfg(folder, num_train=2)) == 2
    assert len(tasks.load(task_cfg(folder)).train_text) == 3
    assert tasks.num_train_examples(task_cfg("someone/some-dataset")) is None  # hub: unknown until loaded
