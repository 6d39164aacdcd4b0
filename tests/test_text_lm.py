"""``text-lm``: packing pinned token by token with the word-level tokenizer, the up-front checks
of a corpus folder as exact one-line errors, loading .txt/.jsonl/.csv, and a real run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from peftbench import app, cli, tasks
from peftbench.errors import ConfigError
from peftbench.tasks import RawTask
from peftbench.tasks.batching import pack_split

from conftest import compose_config

ALLOWED = "UTF-8 encoded .txt files (one text per line) or .csv/.json/.jsonl files"


def task_cfg(folder: Path, *overrides: str):
    return compose_config("task=text-lm", f"task.path={folder}", *overrides).task


def one_line_error(call, *args) -> str:
    with pytest.raises(ConfigError) as e:
        call(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def corpus(folder: Path, train: str, validation: str = "a short held out line\n") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "train.txt").write_text(train)
    (folder / "validation.txt").write_text(validation)
    return folder


# --------------------------------------------------------------------------- packing


def test_packing_joins_texts_with_eos_and_drops_the_incomplete_last_block():
    texts = ["the cat sat", "on the mat today", "a dog"]
    tok = tasks.word_tokenizer(texts, 64)
    raw = RawTask(train_text=texts, eval_text=texts[:2], train_labels=None, eval_labels=None, pack=True)
    train, ev = tasks.tokenize(raw, tok, 4)
    # stream: the cat sat [EOS] on the mat today [EOS] a dog (11 tokens); the last 3 are dropped
    assert [tok.convert_ids_to_tokens(b) for b in train.ids] == [
        ["the", "cat", "sat", "[EOS]"],
        ["on", "the", "mat", "today"],
    ]
    assert ev.ids == train.ids  # the same two texts fill the same two blocks
    assert train.ids[0][3] == tok.eos_token_id == 3 and train.labels is None and train.prompt_lengths is None
    assert len(pack_split(texts, tok, 3, "train").ids) == 3  # 11 tokens: 3 blocks of 3, 2 dropped
    assert pack_split(texts, tok, 11, "train").ids[0][-2:] == tok.convert_tokens_to_ids(["a", "dog"])  # none dropped


def test_an_eval_split_shorter_than_one_block_names_max_length():
    texts = ["the cat sat on the mat", "a dog"]
    raw = RawTask(train_text=texts * 4, eval_text=["a dog"], train_labels=None, eval_labels=None, pack=True)
    assert one_line_error(tasks.tokenize, raw, tasks.word_tokenizer(texts, 64), 8) == (
        "task.max_length=8: the eval split packs into 2 tokens, fewer than one block of the shortest allowed (8); "
        "allowed: more text in that split"
    )
    enough = RawTask(train_text=texts * 4, eval_text=texts, train_labels=None, eval_labels=None, pack=True)
    assert one_line_error(tasks.tokenize, enough, tasks.word_tokenizer(texts, 64), 16) == (
        "task.max_length=16: the eval split packs into 9 tokens, fewer than one block; allowed: at most 9"
    )


# --------------------------------------------------------------------------- up-front checks


def test_missing_folder_is_one_line(tmp_path):
    assert one_line_error(tasks.check, task_cfg(tmp_path / "nope")) == (
        f"task.path={tmp_path / 'nope'}: no such folder (allowed: a folder of train/validation "
        f".csv/.json/.jsonl/.txt files, or a hub dataset id)"
    )


def test_missing_eval_file_lists_the_files_there(tmp_path):
    (tmp_path / "train.txt").write_text("some text\n")
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        f"task.eval_split=validation: no validation.csv/.json/.jsonl/.txt in {tmp_path}; files there: train.txt"
    )


def test_missing_text_column_is_one_line(tmp_path):
    corpus(tmp_path, "some text\n")
    (tmp_path / "train.csv").write_text("body,source\nsome text,web\n")  # wins over train.txt
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        "task.text_column=text: no such column in train.csv; allowed: body, source"
    )
    tasks.check(task_cfg(tmp_path, "task.text_column=body"))


def test_non_utf8_file_names_the_file_and_line(tmp_path):
    corpus(tmp_path, "")
    (tmp_path / "train.txt").write_bytes(b"fine\n\xff\xfe bad\n")
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        f"task.path={tmp_path}: train.txt line 2: not UTF-8 text (byte 0xff); allowed: {ALLOWED}"
    )


def test_a_corpus_of_blank_lines_is_one_line(tmp_path):
    corpus(tmp_path, "\n   \n\t\n")
    assert one_line_error(tasks.check, task_cfg(tmp_path)) == (
        f"task.path={tmp_path}: train.txt holds no text; allowed: {ALLOWED} with a non-blank text"
    )


# --------------------------------------------------------------------------- loading


def test_load_skips_blank_lines_keeps_order_and_packs(tmp_path):
    corpus(tmp_path, "first line\n\n  \nsecond line\r\nthird line\n")
    raw = tasks.load(task_cfg(tmp_path))
    assert raw.train_text == ["first line", "second line", "third line"] and raw.pack
    assert raw.eval_text == ["a short held out line"] and raw.train_labels is raw.eval_labels is None
    assert tasks.load(task_cfg(tmp_path, "task.num_train=2")).train_text == ["first line", "second line"]
    assert tasks.num_train_examples(task_cfg(tmp_path)) is None  # blocks depend on the tokenizer


def test_load_reads_the_text_column_of_jsonl_and_csv(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"body": "one", "n": 1}\n{"body": "", "n": 2}\n{"body": "two", "n": 3}\n')
    (tmp_path / "validation.csv").write_text('body,n\n"three, four",1\n')
    cfg = task_cfg(tmp_path, "task.text_column=body")
    raw = tasks.load(cfg)
    assert (raw.train_text, raw.eval_text) == (["one", "two"], ["three, four"])
    (tmp_path / "validation.csv").write_text('body,n\n"",1\n')
    assert one_line_error(tasks.load, cfg) == (
        f"task.path={tmp_path}: validation.csv holds no text; allowed: {ALLOWED} with a non-blank text"
    )


# --------------------------------------------------------------------------- a real run


def test_a_run_on_a_tiny_corpus_fits_a_word_tokenizer_and_reports_eval_loss(tmp_path):
    words = "the river bank holds water while the old bank holds money and the farmer walks home".split()
    lines = [" ".join(words[i % len(words) :] + words[: i % len(words)]) for i in range(24)]
    folder = corpus(tmp_path / "corpus", "\n".join(lines[:20]) + "\n", "\n\n".join(lines[20:]) + "\n")
    cfg = cli.checked_config(
        "task=text-lm",
        f"task.path={folder}",
        "train.steps=3",
        "train.batch_size=2",
        "task.max_length=32",
        "measure.latency_repeats=2",
        "measure.latency_length=16",
        "measure.latency_grid_batches=[1]",
        "measure.latency_grid_lengths=[16]",
        "measure.decode_tokens=0",
        f"results_dir={tmp_path / 'out'}",
    )
    rec, path = app.run_job(cli.APP, cfg)
    assert rec["status"] == "ok", rec.get("error")
    assert path.is_file() and math.isfinite(rec["metrics"]["eval_loss"])
    assert len(rec["train_losses"]) == 3
