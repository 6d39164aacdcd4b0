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


# ------------------------------------------------------------------------- choices told apart
def test_the_first_distinguishing_token_decides_not_the_length():
    from peftbench.quality.generation import first_distinguishing

    ids = [[5, 6, 7, 9], [5, 8]]
    logps = [[-1.0, -0.5, -3.0, -3.0], [-1.0, -0.6]]  # summed: -7.5 against -1.6, the short one
    assert first_distinguishing(ids, logps) == 0  # after the shared 5, 6 is likelier than 8
    assert first_distinguishing([[1], [2], [3]], [[-2.0], [-0.1], [-0.1]]) == 1  # the first on a tie
    assert first_distinguishing([[4, 1], [4, 2], [3]], [[-0.2, -1.0], [-0.2, -0.5], [-0.3]]) == 1


@pytest.mark.parametrize(
    "choices, why",
    [
        (["good", "good movie"], "'good' and 'good movie' cannot be told apart ('good' is how 'good movie' begins"),
        (["bad", "bad"], "'bad' and 'bad' cannot be told apart (tokenize alike"),
        (["good", "zyzzyva"], "'zyzzyva' tokenizes to an unknown token; allowed: choices the tokenizer knows"),
    ],
)
def test_choices_no_token_tells_apart_are_refused(choices, why):
    from peftbench import tasks
    from peftbench.errors import ConfigError
    from peftbench.quality.generation import check_choices

    tok = tasks.word_tokenizer(["a good movie", "a bad movie"], 64)
    with pytest.raises(ConfigError) as e:
        check_choices(tok, choices)
    assert str(e.value).startswith(f"task.choices={choices}: {why}")


def test_choices_are_checked_by_the_dry_run(tmp_path, capsys):
    code = cli.main(["task=sentiment", "task.choices=[negative,negative]", f"results_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (
        "peftbench: error: task.choices=['negative', 'negative']: 'negative' and 'negative' cannot be told "
        "apart (tokenize alike, token by token); allowed: choices whose tokens differ before either ends"
    )
