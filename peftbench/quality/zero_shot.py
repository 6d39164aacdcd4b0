"""The zero-shot figures of a model, computed once and reused by every run that starts from the
same model, instead of being evaluated again in every run of a sweep: the base model's, for a
method that is the identity at initialisation (full fine-tuning, LoRA, DoRA, adapters, (IA)^3,
LoRA+), and the model with the method applied for one that is not (prefix and prompt tuning),
whose state at initialisation is part of the key: the same seed and settings give the same
virtual tokens, so the trials of a learning-rate search share one entry, and another seed is
another entry.

An entry is keyed by everything the figures depend on (``key``): the base weights' sha256 and the
scheme they are stored in, the evaluation data as tokenized (a digest of the ids, labels, prompt
lengths, answers and choices), the tokenizer, the evaluation and forgetting settings, the
numeric precision and device type, the torch and transformers versions, the code that computes
the figures (a digest of its source files) and, for a method that changes the model at
initialisation, its name, its tensors' SHA-256 (``models.tensors_sha256``) and the methods' source
(``methods_digest``). It is a JSON file under ``<cache>/zero-shot/`` holding the metrics (the record's
``*_initial`` figures), the per-example predictions before training, and the sha256 of both;
``load`` checks that digest and treats a file that fails it, or cannot be parsed, as absent (it
is computed again and rewritten), saying so in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import transformers

import methods
from peftbench.weights import cache_root

# the files whose code computes the zero-shot figures: a change to any of them is a new key
CODE = (
    "quality/generation.py",
    "quality/forgetting.py",
    "quality/zero_shot.py",
    "tasks/answers.py",
    "tasks/chat.py",
    "tasks/batching.py",
    "train.py",
)


def code_digest() -> str:
    """sha256 of the source of the code that computes the figures (``CODE``)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in CODE:
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()


def methods_digest() -> str:
    """sha256 of the source of every method (``methods/*.py``): how a method's modules compute."""
    h = hashlib.sha256()
    for f in sorted(Path(methods.__file__).resolve().parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def digest(value: Any) -> str:
    """sha256 of a JSON-serialisable value, keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def key(spec: dict[str, Any]) -> str:
    """The entry's name: 24 hex digits of the digest of ``spec``, of the code and of the torch and
    transformers versions (either can change a forward's numerics)."""
    versions = [torch.__version__, transformers.__version__]
    return digest({**spec, "code": code_digest(), "versions": versions})[:24]


def path(name: str) -> Path:
    return cache_root() / "zero-shot" / f"{name}.json"


def load(name: str) -> Optional[dict[str, Any]]:
    """The entry ``name`` (``metrics``, ``predictions``), or None when there is none, or when it is
    damaged (unreadable, not JSON, or its sha256 does not match its content: one line on
    standard error; the caller computes the figures again and ``save`` replaces it)."""
    p = path(name)
    if not p.is_file():
        return None
    try:
        entry = json.loads(p.read_text())
        body = {"metrics": entry["metrics"], "predictions": entry["predictions"]}
        ok = entry.get("sha256") == digest(body)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        print(f"peftbench: zero-shot cache entry {p} is damaged; computing its figures again", file=sys.stderr)
        return None
    return body


def save(name: str, metrics: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
    """Write the entry atomically (a temporary file renamed into place), with its sha256."""
    p = path(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    body = {"metrics": metrics, "predictions": predictions}
    tmp = p.with_name(f".tmp-{os.getpid()}-{p.name}")
    tmp.write_text(json.dumps({**body, "sha256": digest(body)}))
    tmp.replace(p)
