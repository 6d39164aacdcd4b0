"""Reading records back: every record is checked against the schema on load, and a file that is
not a valid record is skipped with a one-line reason by the reader, the report, the regression
gate and resume alike."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_compare import make_record, write

from peftbench import compare, report
from peftbench.records import reader, writer

from conftest import REPO


def as_text(rec: dict) -> str:
    return json.dumps(rec)


def changed(path: str, value) -> callable:
    """A mutation that sets the dotted ``path`` of a record to ``value``."""

    def go(rec: dict) -> str:
        *parents, last = path.split(".")
        target = rec
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value
        return as_text(rec)

    return go


def deep(rec: dict) -> str:
    """JSON nested 200,000 levels deep: json.loads raises RecursionError."""
    return as_text(rec)[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}"


# (mutation of a valid record, what the skip reason must name)
WRONG_TYPES = {
    "provenance a list": (changed("provenance", [1]), "provenance"),
    "provenance a string": (changed("provenance", "x"), "provenance"),
    "config a list": (changed("config", [1]), "config"),
    "config.method a string": (changed("config.method", "lora"), "config.method"),
    "config.train a list": (changed("config.train", [30]), "config.train"),
    "config.method.rank a string": (changed("config.method.rank", "8"), "config.method.rank"),
    "config_hash a list": (changed("config_hash", ["a"]), "config_hash"),
    "run_id an integer": (changed("run_id", 5), "run_id"),
    "model a list": (changed("model", ["tiny"]), "model"),
    "status unknown": (changed("status", "done"), "status"),
    "metric a string": (changed("metrics.trainable_params", "many"), "metrics.trainable_params"),
    "metric 2**80": (changed("metrics.trainable_params", 2**80), "metrics.trainable_params"),
    "metric -2**80": (changed("metrics.peak_memory_bytes", -(2**80)), "metrics.peak_memory_bytes"),
    "metric 1.7e308": (changed("metrics.peak_memory_bytes", 1.7e308), "metrics.peak_memory_bytes"),
    "metric a bool": (changed("metrics.eval_loss", True), "metrics.eval_loss"),
    "metric a list": (changed("metrics.eval_loss", [1.0]), "metrics.eval_loss"),
    "metric NaN": (lambda r: as_text(r).replace('"eval_loss": 5.0', '"eval_loss": NaN'), "metrics.eval_loss"),
    "metrics a list": (changed("metrics", [1]), "metrics"),
    "git_sha an integer": (changed("provenance.git_sha", 5), "provenance.git_sha"),
    "launcher a list": (changed("provenance.launcher", [1]), "provenance.launcher"),
    "packages a number": (changed("provenance.packages", 5), "provenance.packages"),
    "base_weights_sha256 an integer": (changed("base_weights_sha256", 5), "base_weights_sha256"),
    "train_step_ms strings": (changed("train_step_ms", ["a"] * 25), "train_step_ms[0]"),
    "latency_grid a string": (changed("latency_grid", "abc"), "latency_grid"),
    "latency row a list": (changed("latency_grid.0", [1, 32]), "latency_grid[0]"),
    "latency batch a list": (changed("latency_grid.0.batch", [1]), "latency_grid[0].batch"),
    "latency ms a string": (
        changed("latency_grid.1.inference_latency_ms", "x"),
        "latency_grid[1].inference_latency_ms",
    ),
    "nested 200,000 deep": (deep, "nested too deeply"),
}


@pytest.fixture
def good():
    return make_record("lora", seed=2)


def write_bad(folder: Path, good: dict, mutate) -> Path:
    """``good`` under its own name, and a mutated copy named as its config's records are."""
    write(folder, good)
    bad = folder / f"20260102T000000000000-lora-tiny-llama-synthetic-lm-{good['config_hash']}.json"
    bad.write_text(mutate(json.loads(json.dumps(good))))
    return bad


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_wrong_types_are_skipped_with_the_field(tmp_path, good, case):
    mutate, names = WRONG_TYPES[case]
    bad = write_bad(tmp_path, good, mutate)
    loaded = reader.load([tmp_path])
    assert [r["run_id"] for r in loaded.records] == [good["run_id"]]
    assert [p for p, _ in loaded.skipped] == [str(bad)]
    why = loaded.skipped[0][1]
    assert names in why and "\n" not in why, why
    with pytest.raises(reader.RecordError, match=names.replace("[", r"\[")):
        reader.read(bad)


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_report_and_compare_survive_wrong_types(tmp_path, good, case, capsys):
    mutate, names = WRONG_TYPES[case]
    folder = tmp_path / "runs"
    bad = write_bad(folder, good, mutate)
    base = write(tmp_path / "base", good)
    assert compare.main([str(base), str(folder)]) == 0
    assert report.main(["--results", str(folder), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert f"peftbench.compare: skipped {bad}: " in err and f"peftbench.report: skipped {bad}: " in err


@pytest.mark.parametrize("case", ["metric a string", "config.method a string", "nested 200,000 deep"])
def test_resume_ignores_an_invalid_record_and_says_why(tmp_path, good, case):
    mutate, names = WRONG_TYPES[case]
    write_bad(tmp_path, good, mutate)
    found = reader.by_hash(tmp_path, good["config_hash"])
    assert [r["run_id"] for r in found] == [good["run_id"]]
    now = {"git_sha": "c" * 40, "code_dirty": False, "code_diff_sha256": None}
    rec, why = reader.reusable(tmp_path, good["config_hash"], now)
    assert rec is None and "skipped" in why and names in why


def test_resume_skips_a_record_that_is_only_invalid(tmp_path, good):
    (tmp_path / f"{good['run_id']}.json").write_text(changed("provenance", "x")(good))
    rec, why = reader.reusable(tmp_path, good["config_hash"], {"git_sha": None, "code_dirty": None})
    assert rec is None and "provenance" in why


def test_every_committed_record_validates():
    files = sorted((REPO / "results").rglob("*.json"))
    assert files
    loaded = reader.load([REPO / "results"])
    assert loaded.skipped == []
    # every other file is a tuned comparison's selection, kept beside its records
    assert all(Path(c).parent.name == "selection" for c in loaded.companions)
    assert len(loaded.records) + len(loaded.companions) == len(files)


def test_latency_points_read_the_grid_the_writer_writes():
    """A merging method's row holds the deployed (merged) figure and the as-trained one; any
    other method's row holds one figure. Rows of another format are no latency points."""
    merging = {
        "batch": 2,
        "length": 16,
        "inference_latency_ms": 1.5,
        "inference_latency_iqr_ms": 0.1,
        "inference_latency_unmerged_ms": 2.5,
        "inference_latency_unmerged_iqr_ms": 0.2,
        "tokens_per_s": 1.0,
    }
    plain = {
        "batch": 1,
        "length": 8,
        "inference_latency_ms": 0.5,
        "inference_latency_iqr_ms": None,
        "tokens_per_s": 1.0,
    }
    unmeasured = {**plain, "inference_latency_ms": None}
    assert reader.latency_points({"latency_grid": [merging, plain, unmeasured]}) == [
        {"batch": 2, "length": 16, "merged": True, "median_ms": 1.5, "iqr_ms": 0.1},
        {"batch": 2, "length": 16, "merged": False, "median_ms": 2.5, "iqr_ms": 0.2},
        {"batch": 1, "length": 8, "merged": False, "median_ms": 0.5, "iqr_ms": None},
    ]
    foreign = {"batch": 1, "length": 8, "merged": True, "median_ms": 3.0, "iqr_ms": 0.1}
    assert reader.latency_points({"latency_grid": [foreign]}) == []
    assert reader.latency_points({"metrics": {"latency_grid": [plain]}}) == []


# ------------------------------------------------------------------------------------ writing
@pytest.fixture
def umask():
    """Set the process umask for one test."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)], ids=["022", "002", "077"])
def test_a_record_gets_the_mode_the_umask_gives_any_new_file(tmp_path, good, umask, mask, mode):
    umask(mask)
    path = writer.write(good, str(tmp_path))
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert reader.read(path)["run_id"] == good["run_id"]


def test_stale_temp_files_are_removed_when_the_folder_is_next_written(tmp_path, good):
    killed = tmp_path / ".tmp-killed.json"  # left by a write killed two hours ago
    killed.write_text('{"half": ')
    hours_ago = time.time() - 2 * 3600
    os.utime(killed, (hours_ago, hours_ago))
    in_progress = tmp_path / ".tmp-other-job.json"  # another job of the sweep, writing now
    in_progress.write_text('{"half": ')
    writer.write(good, str(tmp_path))
    assert not killed.exists() and in_progress.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_progress.name, f"{good['run_id']}.json"]


def test_a_write_that_fails_names_the_path_and_leaves_no_temp_file(tmp_path, good, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as failed:
        writer.write(good, str(tmp_path))
    path = tmp_path / f"{good['run_id']}.json"
    assert str(failed.value) == f"cannot write {path}: No space left on device"
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(path))
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, good):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError) as failed:
        writer.write(good, str(blocker / "runs"))
    assert str(failed.value) == f"cannot write {blocker / 'runs' / good['run_id']}.json: Not a directory"


# ------------------------------------------------------------------------------ foreign files
@pytest.fixture
def foreign(tmp_path, good):
    """A results folder holding one record among files no reader can use."""
    folder = write(tmp_path / "runs", good)
    (folder / "loop.json").symlink_to("loop.json")
    (folder / "dangling.json").symlink_to("gone.json")
    os.mkfifo(folder / "fifo.json")  # reading it would block forever
    (folder / "zero.json").symlink_to("/dev/zero")  # reading it would never end
    (folder / "latin1.json").write_bytes('{"caf\xe9": 1}'.encode("latin-1"))
    (folder / "huge-int.json").write_text('{"n": ' + "9" * 5000 + "}")
    with open(folder / "huge.json", "wb") as f:  # sparse: 17 MiB that parsing would hold ~10 times over
        f.truncate(17 * 2**20)
    (folder / "dir.json").mkdir()  # a folder, searched like any other
    (folder / "locked").mkdir()
    return folder


FOREIGN = {
    "loop.json": "cannot read (Too many levels of symbolic links)",
    "dangling.json": "cannot read (No such file or directory)",
    "fifo.json": "not a regular file (a FIFO)",
    "zero.json": "not a regular file (a character device)",
    "latin1.json": "not UTF-8 text (byte 0xe9 at offset 5)",
    "huge-int.json": "not JSON (Exceeds the limit (4300 digits) for integer string conversion",
    "huge.json": "17 MiB, larger than any record (at most 16 MiB; predictions live in .jsonl files beside it)",
    "locked": "cannot list the folder (Permission denied)",
}


@pytest.fixture
def locked(monkeypatch, foreign):
    """``locked`` cannot be listed (chmod would not stop root, so os.scandir refuses it)."""
    scandir = os.scandir

    def refuse(path="."):
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    return foreign / "locked"


def test_files_no_reader_can_use_are_skipped_with_the_reason(foreign, locked, good):
    loaded = reader.load([foreign])
    assert [r["run_id"] for r in loaded.records] == [good["run_id"]]
    skipped = {Path(p).name: why for p, why in loaded.skipped}
    assert set(skipped) == set(FOREIGN)
    for name, why in FOREIGN.items():
        assert skipped[name].startswith(why), (name, skipped[name])


def test_report_and_compare_survive_foreign_files(foreign, locked, tmp_path, good, capsys):
    base = write(tmp_path / "base", good)
    assert compare.main([str(base), str(foreign)]) == 0
    assert report.main(["--results", str(foreign), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    for name in FOREIGN:
        for tool in ("compare", "report"):
            assert f"peftbench.{tool}: skipped {foreign / name}: " in err


@pytest.mark.parametrize("name", ["fifo.json", "zero.json", "loop.json"])
def test_a_foreign_file_named_on_the_command_line_is_one_line_exit_2(foreign, tmp_path, good, name):
    base = write(tmp_path / "base", good)
    proc = subprocess.run(
        [sys.executable, "-m", "peftbench.compare", str(base), str(foreign / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"peftbench.compare: error: current {foreign / name}: {FOREIGN[name]}\n"
