"""Sweeps: sweep configs, resume (skip, force, retry), failure isolation, the sweep summary,
and the joblib / submitit launchers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftbench import app, cli
from peftbench.config import MeasureConfig
from peftbench.records import reader as records

from conftest import REPO

# Tiny runs: a few steps on a few short examples, one latency point, no decode measurement.
TINY = [
    "train.steps=3",
    "train.batch_size=2",
    "train.timing_warmup=2",
    "task.num_train=16",
    "task.num_eval=4",
    "task.max_length=32",
    "measure.latency_repeats=2",
    "measure.latency_warmup=1",
    "measure.latency_length=16",
]
_MEASURE = {f.name for f in dataclasses.fields(MeasureConfig)}
TINY += [
    o
    for o in ("measure.latency_grid_batches=[1]", "measure.latency_grid_lengths=[16]", "measure.decode_tokens=0")
    if o.split("=")[0].split(".")[1] in _MEASURE
]
# lr 1e30 with full fine-tuning: the first update blows every weight up (norms and embeddings
# too), so the loss is NaN at step 1 (run time, after the config check passed): the planted
# failure. With LoRA alone the norms can keep the activations finite, depending on the CPU's
# kernels (an Intel Xeon did, an AMD EPYC did not), so it does not fail everywhere.
NAN_LR = "1e30"


@pytest.fixture
def code(monkeypatch):
    """A fixed code version, so that resume does not depend on this checkout's git state."""
    state = {"git_sha": "0" * 40, "code_dirty": False, "code_diff_sha256": None}
    monkeypatch.setattr(records, "code_state", lambda: dict(state))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    return state


def by_hash(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in sorted(folder.glob("*.json")):
        rec = json.loads(f.read_text())
        out.setdefault(rec["config_hash"], []).append(rec["status"])
    return out


@pytest.mark.slow  # four real runs: ~30 s on an idle 2-core machine, minutes on a busy one
def test_resume_skip_force_retry_and_failure_isolation(tmp_path, code, capsys):
    argv = ["-m", "method=full", f"train.lr=1e-3,{NAN_LR}", *TINY, f"results_dir={tmp_path}"]
    # 1) one job fails at run time (NaN loss); the other still runs; the sweep exits 1
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 ran ok, 0 reused, 1 failed, 0 without a record" in err
    assert "training loss is nan" in err
    runs = by_hash(tmp_path)
    ok_hash = next(h for h, s in runs.items() if s == ["ok"])
    bad_hash = next(h for h, s in runs.items() if s == ["failed"])
    ok_file = next(tmp_path.glob(f"*-{ok_hash}.json"))
    rec = json.loads(ok_file.read_text())
    assert rec["provenance"]["launcher"] == {"name": "BasicLauncher", "parallel": False, "sweep_jobs": 2}
    assert rec["provenance"]["git_sha"] == "0" * 40

    # 2) the same sweep again: the ok run is reused, the failed one retried
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert f"reusing {ok_file}" in out
    assert "0 ran ok, 1 reused, 1 failed" in err
    assert by_hash(tmp_path) == {ok_hash: ["ok"], bad_hash: ["failed", "failed"]}

    # 3) force=true re-runs it (a single run: exit 0)
    single = ["method=full", "train.lr=1e-3", *TINY, f"results_dir={tmp_path}"]
    assert cli.main([*single, "force=true"]) == 0
    assert by_hash(tmp_path)[ok_hash] == ["ok", "ok"]

    # 4) other code (a new commit, or other uncommitted changes) makes the records stale
    newest = records.reusable(tmp_path, ok_hash, dict(code))[0]
    assert newest["run_id"] == max(records.stamp(r) + r["run_id"][21:] for r in records.by_hash(tmp_path, ok_hash))
    rec, why = records.reusable(tmp_path, ok_hash, {**code, "git_sha": "1" * 40})
    assert rec is None and "made at commit 0000000000" in why
    rec, why = records.reusable(tmp_path, ok_hash, {**code, "code_dirty": True, "code_diff_sha256": "d" * 64})
    assert rec is None and "uncommitted changes" in why

    # the report reads these real records: the failed run is listed, not plotted
    from peftbench import report

    md = report.build([tmp_path], tmp_path / "report").read_text()
    assert "## Failed runs (not plotted)" in md and "training loss is nan" in md


def test_same_code_policy():
    clean = {"git_sha": "a" * 40, "code_dirty": False, "code_diff_sha256": None}
    dirty = {"git_sha": "a" * 40, "code_dirty": True, "code_diff_sha256": "f" * 64}

    def rec(**prov):
        return {"provenance": prov}

    assert records.same_code(rec(**clean), clean)[0]
    assert not records.same_code(rec(**{**clean, "git_sha": "b" * 40}), clean)[0]
    assert not records.same_code(rec(**clean), dirty)[0]
    assert not records.same_code(rec(**dirty), clean)[0]
    assert records.same_code(rec(**dirty), dirty)[0]
    assert not records.same_code(rec(**{**dirty, "code_diff_sha256": "e" * 64}), dirty)[0]
    # a dirty record without a fingerprint (made outside the CLI) is never reused
    assert not records.same_code(rec(git_sha="a" * 40, git_dirty=True), dirty)[0]
    # another commit with the same measured code (a commit of docs, tests or results): reused
    tree = {**clean, "code_tree": "1" * 64}
    assert records.same_code(rec(**{**tree, "git_sha": "b" * 40}), tree)[0]
    assert records.same_code(
        rec(**{**tree, "git_sha": "b" * 40, **dirty, "code_tree": "1" * 64}), {**dirty, "code_tree": "1" * 64}
    )[0]
    good, why = records.same_code(rec(**{**tree, "git_sha": "b" * 40, "code_tree": "2" * 64}), tree)
    assert not good and "measured code differs" in why
    assert not records.same_code(rec(**{**clean, "git_sha": "b" * 40}), tree)[0]  # an older record: no tree


def test_code_tree_ignores_everything_but_the_measured_code(tmp_path, monkeypatch):
    """The fingerprint changes with a commit to peftbench/, methods/, conf/ or pyproject.toml,
    not with one to tests, docs or results (a real git repository)."""
    repo = tmp_path / "repo"
    for d in ("peftbench", "methods", "conf", "tests", "docs"):
        (repo / d).mkdir(parents=True)
        (repo / d / "a.py").write_text(f"# {d}\n")
    (repo / "pyproject.toml").write_text("[project]\n")

    def git(*a):
        subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", "--allow-empty")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
    import peftbench.records as package

    monkeypatch.setattr(package, "REPO", repo)  # where git runs
    monkeypatch.setattr(records, "REPO", repo)  # where untracked files are read
    first = records.code_state()
    (repo / "docs" / "a.py").write_text("# changed docs\n")
    (repo / "tests" / "a.py").write_text("# changed tests\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "docs and tests")
    second = records.code_state()
    assert second["git_sha"] != first["git_sha"] and second["code_tree"] == first["code_tree"]
    assert records.same_code({"provenance": first}, second)[0]
    (repo / "methods" / "a.py").write_text("# changed method\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "method")
    third = records.code_state()
    assert third["code_tree"] != first["code_tree"] and not records.same_code({"provenance": first}, third)[0]


def test_a_job_without_record_is_reported(tmp_path, capsys):
    job = app.Job(("method=lora",), str(tmp_path), "0123456789", False, "lora/tiny-llama/synthetic-lm")
    assert app.summarize(cli.APP, [job], "20000101T000000000000") == 1
    assert "missing  lora/tiny-llama/synthetic-lm [0123456789]: no record written" in capsys.readouterr().err


def jobs(*argv: str) -> list[cli.Job]:
    out = app.check_jobs(cli.APP, list(argv))
    assert not isinstance(out, int), out
    return out


def test_sweep_configs_expand():
    import methods as registry

    methods = jobs("-m", "+sweep=methods")
    assert [j.label.split("/")[0] for j in methods] == sorted(registry.REGISTRY)  # method=glob(*): every method
    ranks = jobs("-m", "+sweep=ranks")
    assert [j.overrides[:2] for j in ranks] == [("method=lora", f"rank={r}") for r in (1, 2, 4, 8, 16, 32)]
    # the same config reached through two sweeps has one hash: resume works across them
    assert methods[sorted(registry.REGISTRY).index("lora")].config_hash == ranks[3].config_hash
    # the command line wins over a sweep config's params
    assert [j.overrides[0] for j in jobs("-m", "+sweep=methods", "method=lora,full")] == ["method=lora", "method=full"]


def test_table1_arms():
    from conftest import compose_config

    # the arms on a small GPT-2 (the sweep's own model=gpt2-medium is the models' concern)
    table = jobs("-m", "+sweep=table1", "model=tiny-gpt2")
    assert len(table) == 4 and len({j.config_hash for j in table}) == 4
    arms = []
    for j in table:
        cfg = compose_config(*j.overrides)
        assert cfg.train.steps == 0
        arms.append((cfg.method.name, cfg.method.get("variant")))
    assert arms == [("full", None), ("lora", None), ("adapter", "houlsby"), ("adapter", "pfeiffer")]


def test_bad_sweep_value_is_one_line_before_anything_runs(tmp_path, capsys):
    assert cli.main(["-m", "method=lora", "rank=4,0", f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftbench: error:")
    assert not list(tmp_path.glob("*.json"))


def launch(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "peftbench",
            "-m",
            *argv,
            *TINY,
            f"results_dir={tmp_path}",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    proc = launch(tmp_path, "hydra/launcher=submitit_local", "method=lora")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 ran ok" in proc.stderr
    (rec,) = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    assert rec["status"] == "ok"
    assert rec["provenance"]["launcher"]["name"] == "LocalLauncher"


@pytest.mark.slow
def test_joblib_launcher_marks_parallel_timings(tmp_path):
    proc = launch(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=lora", "rank=2,4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ran ok" in proc.stderr
    recs = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    assert len(recs) == 2
    assert all(
        r["provenance"]["launcher"] == {"name": "JoblibLauncher", "parallel": True, "sweep_jobs": 2} for r in recs
    )
