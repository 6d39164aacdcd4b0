"""``task=instruction``: a user's own Alpaca-style JSON or chat-``messages`` JSONL loads as prompt
and response, each bad input is one line naming its key (also through the CLI, before anything
runs), and both layouts train and evaluate end to end with no code change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftbench import app, cli, tasks
from peftbench.errors import ConfigError

from conftest import compose_config

ALPACA = [
    {"instruction": "Name the colour of the sky.", "input": "", "output": "blue"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name the colour of grass.", "output": "green"},
    {"instruction": "Say hello in French.", "input": "", "output": "bonjour"},
]
CHATS = [
    [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "blue"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Colour of grass?"},
        {"role": "assistant", "content": "green"},
        {"role": "user", "content": "And of snow?"},
        {"role": "assistant", "content": " white "},
    ],
    [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Hello in French?"}, {"role": "assistant", "content": "bonjour"}],
]


def alpaca(folder: Path, train: list[dict] = ALPACA, validation: list[dict] = ALPACA[:2]) -> Path:
    """A user's Alpaca data: train.json and validation.json, each one JSON array."""
    folder.mkdir(exist_ok=True)
    (folder / "train.json").write_text(json.dumps(train, indent=1))
    (folder / "validation.json").write_text(json.dumps(validation, indent=1))
    return folder


def chats(folder: Path, train: list = CHATS, validation: list = CHATS[:2]) -> Path:
    """A user's chat data: train.jsonl and validation.jsonl, one {"messages": [...]} a line."""
    folder.mkdir(exist_ok=True)
    for split, rows in (("train", train), ("validation", validation)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return folder


def task_cfg(folder: Path, *overrides: str):
    return compose_config("task=instruction", f"task.path={folder}", *overrides).task


def one_line_error(call, *args) -> str:
    with pytest.raises(ConfigError) as e:
        call(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- loading


def test_alpaca_rows_become_a_user_prompt_and_a_response(tmp_path):
    raw = tasks.load(task_cfg(alpaca(tmp_path), "task.system_prompt=Be brief."))
    assert raw.train_text == ["blue", "5", "green", "bonjour"] and raw.eval_answers == ["blue", "5"]
    assert raw.train_prompts[1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},  # the input after a blank line
    ]
    assert raw.train_prompts[0][1] == {"role": "user", "content": "Name the colour of the sky."}
    assert raw.choices is None and raw.train_labels is None
    assert tasks.num_train_examples(task_cfg(tmp_path, "task.num_train=3")) == 3


def test_the_last_assistant_message_is_the_response_and_the_rest_the_prompt(tmp_path):
    raw = tasks.load(task_cfg(chats(tmp_path), "task.system_prompt=Be brief."))
    assert raw.eval_text == ["blue", "white"]
    assert raw.eval_prompts[0] == [{"role": "system", "content": "Be brief."}, CHATS[0][0]]
    assert raw.eval_prompts[1] == CHATS[1][:4]  # its own system message is kept, not doubled


# --------------------------------------------------------------------------- bad input


def test_missing_columns_name_the_key(tmp_path):
    alpaca(tmp_path, [{"question": "q?", "answer": "a"}], [{"question": "r?", "answer": "b"}])
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        "task.prompt_column=instruction: no such column in train.json; allowed: question, answer (or set task.format)"
    )
    assert one_line_error(tasks.check, task_cfg(tmp_path, "task.prompt_column=question")) == (
        "task.response_column=output: no such column in train.json; allowed: question, answer (or set task.format)"
    )
    assert one_line_error(tasks.check, task_cfg(tmp_path, "task.format=messages")) == (
        "task.messages_column=messages: no such column in train.json; allowed: question, answer (or set task.format)"
    )
    tasks.check(task_cfg(tmp_path, "task.prompt_column=question", "task.response_column=answer"))


def test_a_file_without_examples_says_so_not_that_columns_are_missing(tmp_path):
    alpaca(tmp_path, [])
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        f"task.path={tmp_path}: train.json holds no examples; allowed: at least one"
    )
    chats(tmp_path / "chat", CHATS, [])
    assert one_line_error(tasks.check, task_cfg(tmp_path / "chat")) == (
        f"task.path={tmp_path / 'chat'}: validation.jsonl holds no examples; allowed: at least one"
    )


def test_an_empty_response_is_one_line(tmp_path):
    alpaca(tmp_path, [ALPACA[0], {"instruction": "Say nothing.", "input": "", "output": "  "}])
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        "task.response_column=output: train.json example 2 has an empty response; allowed: a non-empty text"
    )
    empty = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": ""}]
    chats(tmp_path / "chat", CHATS, [empty])
    assert one_line_error(tasks.check, task_cfg(tmp_path / "chat")) == (
        "task.messages_column=messages: validation.jsonl example 1 has an empty response "
        "(no non-empty assistant message); allowed: at least one"
    )


@pytest.mark.parametrize(
    "messages",
    ["Hi?", [{"role": "bot", "content": "hi"}], [{"role": "user", "content": None}], [["user", "hi"]]],
)
def test_messages_that_are_not_role_content_dicts_are_one_line(tmp_path, messages):
    chats(tmp_path, [messages])
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        "task.messages_column=messages: train.jsonl example 1 is not a list of {role, content} "
        "messages; allowed: roles system, user, assistant with text content"
    )


def test_a_turn_after_the_last_assistant_message_is_one_line(tmp_path):
    dangling = [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And then?"},
    ]
    chats(tmp_path, [dangling])
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        "task.messages_column=messages: train.jsonl example 1 has 1 message(s) after the last assistant "
        "message (the response); allowed: a conversation that ends with it"
    )


@pytest.mark.parametrize(
    "field, value, kind",
    [("output", ["yes", "no"], "list"), ("instruction", {"q": "hi"}, "dict"), ("input", True, "bool")],
)
def test_an_alpaca_field_that_is_not_text_is_one_line_as_in_chat_files(tmp_path, field, value, kind):
    alpaca(tmp_path, [{**ALPACA[0], field: value}])
    key = {"output": "response_column", "instruction": "prompt_column", "input": "input_column"}[field]
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        f"task.{key}={field}: train.json example 1 holds a {kind}, not text; allowed: a string"
    )


def test_an_alpaca_number_is_its_text(tmp_path):
    alpaca(tmp_path, [{**ALPACA[0], "output": 42}])
    raw = tasks.load(task_cfg(tmp_path))
    assert "42" in raw.train_text[0]


def test_an_unknown_answer_rule_is_one_line(tmp_path):
    assert one_line_error(tasks.check, task_cfg(alpaca(tmp_path), "task.answer_rule=fuzzy")) == (
        "task.answer_rule=fuzzy: unknown rule; allowed: exact, first_word, last_number, regex"
    )


def test_a_prompt_longer_than_max_length_names_it(tmp_path):
    cfg = task_cfg(alpaca(tmp_path), "task.max_length=8")
    raw = tasks.load(cfg)
    tok = tasks.word_tokenizer([m["content"] for p in raw.train_prompts for m in p] + raw.train_text, 64)
    # "### User:\nName the colour of the sky.\n\n### Assistant:\n": 13 tokens
    assert one_line_error(tasks.tokenize, raw, tok, cfg.max_length, cfg.template) == (
        "task.max_length=8: the prompt of train example 1 is 13 tokens; "
        "allowed: at least 14 (the prompt and one response token), or shorter prompts"
    )


@pytest.mark.parametrize(
    "override, named",
    [
        ("task.prompt_column=question", "task.prompt_column=question: no such column in train.json"),
        ("task.answer_rule=fuzzy", "task.answer_rule=fuzzy: unknown rule"),
    ],
)
def test_the_cli_stops_before_anything_runs(tmp_path, capsys, override, named):
    data, out = alpaca(tmp_path / "data"), tmp_path / "out"
    code = cli.main(["task=instruction", f"task.path={data}", override, f"results_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"peftbench: error: {named}"), err
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("write", [alpaca, chats], ids=["alpaca-json", "messages-jsonl"])
def test_a_users_own_data_trains_and_evaluates(tmp_path, write):
    out = tmp_path / "out"
    cfg = cli.checked_config(
        "task=instruction",
        f"task.path={write(tmp_path / 'data')}",
        "train.steps=3",
        "train.batch_size=2",
        "task.max_length=64",
        "task.num_generate=2",
        "task.max_new_tokens=2",
        "measure.latency_repeats=1",
        "measure.latency_length=16",
        "measure.latency_grid_batches=[1]",
        "measure.latency_grid_lengths=[16]",
        "measure.decode_tokens=0",
        f"results_dir={out}",
    )
    rec, path = app.run_job(cli.APP, cfg)
    assert rec["status"] == "ok", rec.get("error")
    m = rec["metrics"]
    for key in ("eval_generate_accuracy", "eval_generate_accuracy_initial"):
        assert 0.0 <= m[key] <= 1.0
    assert m["eval_generate_examples"] == 2 and m["eval_examples"] == 2 and len(rec["train_losses"]) == 3
    assert "eval_choice_accuracy" not in m and "forgetting_kl" not in m  # open answers; random-init model
    lines = (path.parent / rec["predictions_file"]).read_text().splitlines()
    assert rec["predictions_file"] == f"{rec['run_id']}.predictions.jsonl" and len(lines) == 2
    first = json.loads(lines[0])
    assert first["index"] == 0 and first["reference"] == "blue"
    assert set(first["final"]) == {"index", "reference", "generated", "answer", "chosen"}


# --------------------------------------------------------------------------- sentiment (built in)


def test_sentiment_asks_for_one_word_and_answers_with_the_label_word():
    raw = tasks.load(compose_config("task=sentiment", "task.num_eval=4").task)
    assert len(raw.train_text) == 8530 and set(raw.train_text) == {"negative", "positive"}
    assert raw.choices == ["negative", "positive"] and raw.eval_answers == raw.eval_text and len(raw.eval_text) == 4
    assert raw.train_prompts[0] == [
        {
            "role": "user",
            "content": "Is this movie review positive or negative? Answer with one word.\n\nReview: the film's darker "
            "moments become smoothed over by an overwhelming need to tender inspirational tidings , especially "
            "in the last few cloying moments .",
        }
    ]
    assert raw.train_text[:2] == ["negative", "positive"]


def test_a_sentiment_label_other_than_0_or_1_names_the_line(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,1\nodd,2\n")
    (tmp_path / "validation.csv").write_text("text,label\nbad,0\n")
    assert one_line_error(tasks.check, compose_config("task=sentiment", f"task.path={tmp_path}").task) == (
        "task.label_column=label: train.csv line 3 has label '2'; allowed: 0 (negative) or 1 (positive)"
    )
