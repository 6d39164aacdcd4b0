"""The tasks' generated data, pinned byte for byte."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import compose_config

from peftbench import tasks

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
