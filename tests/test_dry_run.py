"""The dry run reads the data as the run will tokenize it (issue 24): what a run would find only
while running (a prompt longer than ``task.max_length``, packed text too short for a batch,
generation past the model's context) is a one-line config error, exit status 2, nothing
written, before any job runs."""

from __future__ import annotations

import pytest

from peftbench import cli

from conftest import REPO

RT = str(REPO / "data" / "rt-polarity")


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["task=sentiment", "task.max_length=8"],
            "task.max_length=8: the prompt of train example 1 is 47 tokens; allowed: at least 48 (the prompt and "
            "one response token), or shorter prompts",
        ),
        (
            ["task=text-lm", f"task.path={RT}", "task.max_length=128", "train.batch_size=8", "task.num_train=20"],
            "train.batch_size=8: the train split packs into 3 block(s) of task.max_length=128 tokens; allowed: at "
            "most 3, or a smaller task.max_length (at least 8) or more text",
        ),
        (
            ["model=tiny-gpt2", "task=sentiment", "method=prefix", "task.max_new_tokens=100000"],
            "task.max_new_tokens=100000: the longest prompt generated from is 95 tokens (20 of them the method's), "
            "and with the new tokens it must fit the model's 512-token context; allowed: at most 417",
        ),
    ],
    ids=["prompt", "blocks", "context"],
)
def test_what_only_the_run_found_is_a_config_error_before_any_job(tmp_path, capsys, overrides, line):
    code = cli.main([*overrides, f"results_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"peftbench: error: {line}", err
    assert not any(tmp_path.iterdir())


def test_generation_that_fits_passes():
    cli.checked_config("model=tiny-gpt2", "task=sentiment", "method=prefix", "task.max_new_tokens=417")
