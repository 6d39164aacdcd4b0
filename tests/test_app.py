"""The app layer's promises, for both commands: every bad value is one line, exit 2 and no record,
however it is given; an unusable results folder is found before anything runs; a record that
cannot be written is one line and exit 1, and a sweep still prints its summary; the dry run
makes every check the real build makes; launchers that lose jobs do not take the sweep down."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import methods
from peftbench import app, cli, models
from peftbench.errors import ConfigError
from peftbench.estimate import cli as estimate_app
from peftbench.records import writer

from conftest import REPO, TINY_RUN

TINY = list(TINY_RUN)
ESTIMATE_TINY = ["model=tiny-llama", "train.batch_size=2", "seq_length=16", "train.precision=fp32"]


def one_error_line(capsys, prog: str = "peftbench") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def json_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.json")) if folder.exists() else []


# ------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    "args,expected",
    [
        (["+foo=1"], "foo=1: no such key in the config"),
        (["++foo=1"], "foo=1: no such key in the config"),
        (["+train.bogus=3"], "train.bogus=3: no such key in the config"),
        (["device=cuda"], "device=cuda: CUDA is not available on this machine"),
        (["device=cuda:7"], "device=cuda:7: CUDA is not available on this machine"),
        (["device=gpu"], "device=gpu: allowed: auto, cpu, cuda or cuda:N"),
        (["train.steps=3", "train.batch_size=64"], "train.batch_size=64: larger than the 16 training examples"),
        (["seed=18446744073709551616"], "seed=18446744073709551616: must be an integer from 0 to 9223372036854775807"),
        (["seed=-1"], "seed=-1: must be an integer from 0"),
        (["model.init_seed=99999999999999999999"], "model.init_seed=99999999999999999999: must be an integer"),
        (["task.vocab_size=0"], "task.vocab_size=0:"),
        (["train.lr=inf"], "train.lr=inf: must be a finite number"),
        (["train.weight_decay=nan"], "train.weight_decay=nan: must be a finite number"),
        (["train.batch_size=4", "train.batch_size=abc"], "train.batch_size=abc: Value 'abc'"),
        (["train.lr=${nope}"], "train.lr=${nope}: Interpolation key 'nope' not found"),
        (['method.target_modules=["q_pr[oj"]'], "method.target_modules=q_pr[oj: not a valid regular expression"),
    ],
)
def test_bad_values_are_one_line_exit_2_and_no_record(args, expected, tmp_path, capsys):
    assert cli.main([*TINY, *args, f"results_dir={tmp_path}"]) == app.EXIT_CONFIG
    assert expected in one_error_line(capsys)
    assert not json_files(tmp_path)


def test_a_config_group_can_still_be_added_with_plus():
    jobs = app.check_jobs(cli.APP, ["-m", "+sweep=methods"])
    assert [j.label.split("/")[0] for j in jobs] == sorted(methods.REGISTRY)
    assert not isinstance(app.check_jobs(cli.APP, ["++train.steps=3"]), int)  # a key the schema has


def test_cuda_index_beyond_the_visible_devices(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.main(["device=cuda:7", f"results_dir={tmp_path}"]) == app.EXIT_CONFIG
    assert "device=cuda:7: this machine has 2 CUDA device(s); allowed: cuda, cuda:0..cuda:1" in one_error_line(capsys)


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["train.batch_size=100000000000000000"],
            "train.batch_size=100000000000000000: train.batch_size x seq_length must be <=",
        ),
        (["+foo=1"], "foo=1: no such key in the config"),
        (["seq_length=4096", "model=gpt3-175b"], "seq_length=4096: 4096 tokens exceed the model's context of 2048"),
    ],
)
def test_estimator_bad_values(args, expected, tmp_path, capsys):
    assert estimate_app.main([*args, f"results_dir={tmp_path}"]) == app.EXIT_CONFIG
    assert expected in one_error_line(capsys, "peftbench.estimate")
    assert not json_files(tmp_path)


# ------------------------------------------------------------------------ results folder
@pytest.mark.parametrize("main,prog", [(cli.main, "peftbench"), (estimate_app.main, "peftbench.estimate")])
def test_results_dir_that_is_a_file(main, prog, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([f"results_dir={afile}"]) == app.EXIT_CONFIG
    assert f"results_dir={afile}: not a folder; allowed: a folder that can be written" in one_error_line(capsys, prog)
    assert main([f"results_dir={afile}/sub"]) == app.EXIT_CONFIG
    assert f"({afile} is a file)" in one_error_line(capsys, prog)


def test_results_dir_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    """A read-only location (as root, permissions do not stop a write: the probe is made to fail)."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(app.tempfile, "TemporaryFile", read_only)
    assert cli.main([f"results_dir={tmp_path}/new"]) == app.EXIT_CONFIG
    line = one_error_line(capsys)
    assert f"results_dir={tmp_path}/new: cannot write in {tmp_path} (Read-only file system)" in line
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_results_dir_without_write_permission(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert cli.main([f"results_dir={locked}"]) == app.EXIT_CONFIG
    assert "cannot write in" in one_error_line(capsys)


def disk_full(monkeypatch) -> None:
    def write(record, results_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(results_dir))

    monkeypatch.setattr(writer, "write", write)


def test_a_record_that_cannot_be_written_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    disk_full(monkeypatch)
    assert estimate_app.main([*ESTIMATE_TINY, f"results_dir={tmp_path}"]) == app.EXIT_FAILED
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"peftbench.estimate: error: cannot write the record {tmp_path}: No space left on device"]


def test_a_sweep_whose_records_cannot_be_written_still_prints_its_summary(tmp_path, monkeypatch, capsys):
    disk_full(monkeypatch)
    argv = ["-m", *ESTIMATE_TINY, "method=lora,full", f"results_dir={tmp_path}"]
    assert estimate_app.main(argv) == app.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 2
    assert "sweep of 2 job(s): 0 ran ok, 0 reused, 0 failed, 2 without a record" in err
    assert err.count("  missing  ") == 2


# -------------------------------------------------------------------- one config builder
def model_cfg(**kw):
    base = {
        "name": "m",
        "name_or_path": None,
        "arch": {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        "init_seed": 0,
        "dtype": "float32",
    }
    return OmegaConf.create({**base, **kw})


def pretrained_folder(tmp_path: Path, vocab: int) -> str:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    return str(tmp_path)


BUILD_CHECKS = {
    "vocabulary smaller than the tokenizer": (
        lambda p: model_cfg(arch={"model_type": "llama", "vocab_size": 10}),
        "causal-lm",
        100,
        "model.arch.vocab_size=10: smaller than",
    ),
    "no model_type": (lambda p: model_cfg(arch={"hidden_size": 32}), "causal-lm", 100, "model.arch.model_type=null"),
    "unknown model_type": (
        lambda p: model_cfg(arch={"model_type": "nope"}),
        "causal-lm",
        100,
        "model.arch.model_type=nope",
    ),
    "encoder for a causal LM": (
        lambda p: model_cfg(arch={"model_type": "bert"}),
        "causal-lm",
        100,
        "a bert encoder cannot run a causal-lm task",
    ),
    "no config.json": (
        lambda p: model_cfg(name_or_path=str(p / "none")),
        "causal-lm",
        100,
        "cannot load its config.json",
    ),
    "embedding smaller than the tokenizer": (
        lambda p: model_cfg(name_or_path=pretrained_folder(p, 50)),
        "causal-lm",
        100,
        "its embedding has 50 rows but the tokenizer has 100 tokens",
    ),
}


@pytest.mark.parametrize("case", list(BUILD_CHECKS))
def test_every_check_of_the_real_build_fires_in_the_dry_run(case, tmp_path):
    make, kind, vocab, expected = BUILD_CHECKS[case]
    cfg = make(tmp_path)
    with pytest.raises(ConfigError) as real:
        models.build(cfg, kind, vocab, 0, 2)
    with pytest.raises(ConfigError) as dry:
        models.build_meta(cfg, kind, vocab)
    assert expected in str(real.value)
    assert str(dry.value) == str(real.value)


def test_the_dry_run_uses_the_word_tokenizer_size_for_a_checkpoint_without_one(tmp_path, capsys):
    """A local checkpoint saved without a tokenizer gets the word-level one: its size is checked
    against the embedding before the run, not when the real model is built."""
    folder = pretrained_folder(tmp_path / "ckpt", 50)
    assert cli.main([f"model.name_or_path={folder}", "task.vocab_size=100", f"results_dir={tmp_path}"]) == 2
    assert "its embedding has 50 rows but the tokenizer has 100 tokens" in one_error_line(capsys)


# ---------------------------------------------------------------------- launchers (slow)
def launch(module: str, tmp_path: Path, *argv: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", module, "-m", *argv, f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_estimate_sweep_under_joblib_with_a_failing_job(tmp_path):
    """A job that fails at run time (planted through sitecustomize in every process) is recorded
    as failed; the table comes from the records on disk, and the exit status is 1."""
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(
        "import peftbench.estimate.cost as cost\n"
        "real = cost.trace_model\n"
        "def planted(model, cfg, lev=None):\n"
        "    if cfg.model.name == 'tiny-gpt2':\n"
        "        raise RuntimeError('planted failure')\n"
        "    return real(model, cfg, lev)\n"
        "cost.trace_model = planted\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(plant), str(REPO)])}
    proc = launch(
        "peftbench.estimate",
        tmp_path / "out",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model=tiny-llama,tiny-gpt2",
        "method=lora",
        "train.batch_size=2",
        "seq_length=16",
        env=env,
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    recs = {r["model"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json"))}
    assert recs["tiny-llama"]["status"] == "ok"
    assert recs["tiny-gpt2"]["status"] == "failed" and "planted failure" in recs["tiny-gpt2"]["error"]
    assert "ESTIMATES" in out and "tiny-llama" in out and "tiny-gpt2" in out
    assert "sweep of 2 job(s): 1 ran ok, 0 reused, 1 failed, 0 without a record" in err
    assert "Traceback" not in err


SLOW_STEPS = (
    "import os, time\n"
    "from pathlib import Path\n"
    "import peftbench.train as train\n"
    "real = train.OptimizerStep.__call__\n"
    "def planted(self, micro, shares):\n"
    "    out = real(self, micro, shares)\n"
    "    Path(os.environ['PLANT_DIR'], f'training-{os.getpid()}').touch()\n"
    "    time.sleep(0.25)\n"
    "    return out\n"
    "train.OptimizerStep.__call__ = planted\n"
)


def kill_first_job(results: Path, plant: Path, proc: subprocess.Popen) -> str:
    """SIGKILL the process of the first job seen training (it announces each optimizer step in
    ``plant``, and every step takes at least 0.25 s, so the job cannot have ended); its config hash."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for flag in sorted(plant.glob("training-*")):
            pid = flag.name.split("-", 1)[1]
            found = list(results.glob(f".running-*-{pid}"))
            if found:
                _, chash, _ = found[0].name.rsplit("-", 2)
                os.kill(int(pid), signal.SIGKILL)
                assert not list(results.glob("*.json")) or chash not in {
                    json.loads(p.read_text())["config_hash"] for p in results.glob("*.json")
                }, "the job ended before it was killed"
                return chash
        time.sleep(0.1)
    raise AssertionError("no job started training")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_killed_job_does_not_take_the_sweep_down(launcher, tmp_path):
    """joblib (loky) stops the jobs running beside a dead worker: those are lost with it, and the
    jobs it never started run afterwards; submitit's other jobs go on. Either way: a summary that
    names the lost job as missing, the others recorded, exit status 1, no traceback."""
    results = tmp_path / "out"
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(SLOW_STEPS)
    env = {"PYTHONPATH": os.pathsep.join([str(plant), str(REPO)]), "PLANT_DIR": str(plant)}
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    proc = launch(
        "peftbench",
        results,
        f"hydra/launcher={launcher}",
        *extra,
        "method=lora",
        "rank=2,4,8",
        "train.steps=40",
        *TINY,
        env=env,
    )
    killed = kill_first_job(results, plant, proc)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 1, err[-3000:]
    assert "the launcher failed" in err and "Traceback" not in err
    assert f"missing  lora/tiny-llama/synthetic-lm [{killed}]" in err
    recs = [json.loads(p.read_text()) for p in results.glob("*.json")]
    assert recs and all(r["status"] == "ok" for r in recs)
    assert killed not in {r["config_hash"] for r in recs}
    missing = err.count("  missing  ")
    assert f"sweep of 3 job(s): {3 - missing} ran ok" in err
    if launcher == "submitit_local":
        assert missing == 1 and len(recs) == 2
    assert not list(results.glob(".running-*"))


def test_a_transformers_outside_the_tested_range_is_one_warning_line(monkeypatch, capsys):
    """The range is the package's own requirement (pyproject.toml, what CI tests); outside it the
    command says so once on stderr and goes on."""
    from peftbench import app

    meta, tf = app.importlib.metadata, app.transformers  # the objects the app reads, whatever else re-imported
    monkeypatch.setattr(meta, "requires", lambda name: ["torch>=2.4", "transformers>=5.12,<5.25"])
    monkeypatch.setattr(tf, "__version__", "5.25.0")
    line = app.untested_transformers()
    assert line is not None and "\n" not in line
    assert line.startswith("peftbench: warning: transformers 5.25.0 is outside the tested range ")
    assert "<5.25" in line and ">=5.12" in line
    monkeypatch.setattr(app, "check_jobs", lambda a, argv: app.EXIT_CONFIG)  # stop right after the check
    assert app.main(app.App("p", "config", print, dict, print, print), ["x=1"]) == app.EXIT_CONFIG
    assert capsys.readouterr().err.strip() == line
    for inside in ("5.12.1", "5.24.0"):
        monkeypatch.setattr(tf, "__version__", inside)
        assert app.untested_transformers() is None
    monkeypatch.setattr(meta, "requires", lambda name: (_ for _ in ()).throw(meta.PackageNotFoundError(name)))
    assert app.untested_transformers() is None  # run from a source tree, uninstalled
