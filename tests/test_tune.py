"""The tuned comparison (``python -m peftbench.tune``, ``peftbench.tune.plan``,
``peftbench.report.tuned``): the rate is selected on validation and the finals are scored on
test, a best rate at a grid edge is flagged, a re-run does only what is missing, the paired
comparison gives the known answer on made-up predictions, and bad input is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from peftbench import stats
from peftbench.records import reader
from peftbench.report import tuned
from peftbench.tasks import data as task_data
from peftbench.tune import cli as tune_cli
from peftbench.tune import plan

from conftest import TINY_RUN

# ------------------------------------------------------------------------ data and runs


def write_split(folder: Path, name: str, rows: list[tuple[str, int]]) -> None:
    lines = ["text,label"] + [f"{t},{label}" for t, label in rows]
    (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def sentences(tmp_path) -> Path:
    """A small two-class corpus with train, validation and test splits (disjoint sentences)."""
    good = "good fine great lovely warm bright".split()
    bad = "bad poor awful dull cold grim".split()
    folder = tmp_path / "data"
    folder.mkdir()
    for name, n in (("train", 24), ("validation", 8), ("test", 10)):
        rows = []
        for i in range(n):
            words, label = (good, 1) if i % 2 == 0 else (bad, 0)
            rows.append((f"{name} {words[i % 6]} film {words[(i + 1) % 6]} story {i}", label))
        write_split(folder, name, rows)
    return folder


def run_args(data: Path) -> list[str]:
    return [
        "model=tiny-llama",
        "task=text-classification",
        f"task.path={data}",
        "train.steps=3",
        *TINY_RUN,
    ]


def tune_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"results_dir={tmp_path / 'tuned'}",
        "tune.methods=[lora]",
        "tune.grid=[0.1,1.0,10.0]",
        "tune.seeds=[0,1]",
        "tune.objective=eval_loss",
        *extra,
    ]


# ------------------------------------------------------------------------ end to end


def test_selection_reads_validation_never_test_and_finals_read_test(sentences, tmp_path, monkeypatch, capsys):
    loaded: list[str] = []
    real_load = task_data.load_file
    monkeypatch.setattr(task_data, "load_file", lambda cfg, split, f: loaded.append(split) or real_load(cfg, split, f))
    at_selection: list[int] = []
    real_write = plan.write_selection
    monkeypatch.setattr(plan, "write_selection", lambda d, sel: at_selection.append(len(loaded)) or real_write(d, sel))

    status = tune_cli.main([*tune_args(tmp_path), *run_args(sentences)])
    assert status == 0, capsys.readouterr().err[-2000:]
    trials_loads = loaded[: at_selection[0]]
    assert "validation" in trials_loads and "test" not in trials_loads
    assert "test" in loaded[at_selection[0] :]

    root = tmp_path / "tuned"
    sel = json.loads((root / "selection" / "lora.json").read_text())
    assert sel["split"] == "validation" and sel["objective"] == "eval_loss" and sel["direction"] == "lower"
    assert [t["lr"] for t in sel["trials"]] == [1e-4, 1e-3, 1e-2]  # LoRA's default 1e-3 x the grid
    trials = {r["run_id"]: r for r in map(json.loads, map(Path.read_text, (root / "trials").glob("*.json")))}
    assert len(trials) == 3
    for t in sel["trials"]:  # the objective is the trial's validation figure, as recorded
        rec = trials[t["run_id"]]
        assert rec["config"]["task"]["eval_split"] == "validation" and rec["config"]["measure"]["profile"] == "quality"
        assert t["objective"] == rec["metrics"]["eval_loss"]
    best = min(sel["trials"], key=lambda t: t["objective"])
    assert sel["selected_lr"] == best["lr"]
    finals = [json.loads(p.read_text()) for p in (root / "final").glob("*.json")]
    assert sorted(r["config"]["seed"] for r in finals) == [0, 1]
    assert all(r["config"]["task"]["eval_split"] == "test" and r["train_lr"] == sel["selected_lr"] for r in finals)
    assert all(r["metrics"]["eval_examples"] == 10 for r in finals)  # all of the test split
    out = capsys.readouterr().out
    assert "TUNED COMPARISON" in out and "measured on 10 test examples" in out
    walls = [r["wall_s"] for r in [*trials.values(), *finals]]
    assert f"wall time: 3 trials {sum(walls[:3]) / 60:.1f} min, 2 finals {sum(walls[3:]) / 60:.1f} min" in out
    # the whole comparison reads back as records plus its selection files, nothing skipped
    everything = reader.load([root])
    assert everything.skipped == [] and len(everything.records) == 5
    assert everything.companions == [str(root / "selection" / "lora.json")]


def test_a_rerun_does_only_what_is_missing(sentences, tmp_path, capsys):
    args = [*tune_args(tmp_path), *run_args(sentences)]
    assert tune_cli.main(args) == 0
    root = tmp_path / "tuned"
    first = {p.name for p in root.rglob("*.json")}
    victim_trial = sorted((root / "trials").glob("*.json"))[1]
    victim_final = sorted((root / "final").glob("*.json"))[0]
    victim_trial.unlink()
    victim_final.unlink()
    capsys.readouterr()
    assert tune_cli.main(args) == 0
    err = capsys.readouterr().err
    assert "sweep of 3 job(s): 1 ran ok, 2 reused" in err
    assert "sweep of 2 job(s): 1 ran ok, 1 reused" in err
    second = {p.name for p in root.rglob("*.json")}
    assert first - second == {victim_trial.name, victim_final.name} and len(second - first) == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["tune.methods=[nope]"], "tune.methods=nope: allowed: "),
        (["tune.grid=[1.0]"], "tune.grid=[1.0]: at least 2 positive multiples"),
        (["tune.objective=accuracy"], "tune.objective=accuracy: allowed: eval_loss"),
        (["tune.trial.seed=3"], "tune.trial=seed=3: key=value run overrides; method, train.lr, seed"),
        (["train.lr=0.1"], "train.lr=0.1: set by the search"),
        (["-m"], "-m: flags are not taken"),
        (["rank=abc"], "rank=abc"),
        (["model=tiny-llama"], "task=synthetic-lm: generates its data, so its validation and test splits"),
        (["tune.trials=1"], "tune.trials=1: null (as many as tune.grid has rates) or an integer >= 2"),
        (["tune.search=random"], "tune.search=random: allowed: grid, optuna"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, argv, message):
    status = tune_cli.main([f"results_dir={tmp_path / 'tuned'}", "tune.methods=[lora]", *argv, *TINY_RUN])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("peftbench.tune: error: "), err
    assert message in err[0]
    assert not (tmp_path / "tuned").exists()


# ------------------------------------------------------------------------ the Optuna search


def test_the_optuna_search_runs_on_the_tiny_model_and_resumes(sentences, tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # in the dev extra, so CI runs this
    args = [*tune_args(tmp_path, "tune.search=optuna", "tune.trials=3"), *run_args(sentences)]
    assert tune_cli.main(args) == 0, capsys.readouterr().err[-2000:]
    err = capsys.readouterr().err
    assert "lora: 3 Optuna (TPE) trials, lr log-uniform in [0.0001, 0.01] (default 0.001)" in err
    root = tmp_path / "tuned"
    sel = json.loads((root / "selection" / "lora.json").read_text())
    lrs = [t["lr"] for t in sel["trials"]]
    assert sel["search"] == "optuna" and sel["range"] == pytest.approx([1e-4, 1e-2]) and len(lrs) == 3
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 3 and lrs == sorted(lrs)
    # each trial is a record on validation at its rate, and the best of them is chosen
    trials = [json.loads(p.read_text()) for p in (root / "trials").glob("*.json")]
    assert sorted(r["config"]["train"]["lr"] for r in trials) == pytest.approx(lrs)
    assert {r["config"]["task"]["eval_split"] for r in trials} == {"validation"}
    best = min(trials, key=lambda r: r["metrics"]["eval_loss"])
    assert sel["selected_lr"] == pytest.approx(best["config"]["train"]["lr"])
    assert sel["selected_objective"] == best["metrics"]["eval_loss"]
    finals = [json.loads(p.read_text()) for p in (root / "final").glob("*.json")]
    assert {r["config"]["train"]["lr"] for r in finals} == {float(plan.lr_text(sel["selected_lr"]))}
    assert not list(root.rglob(".job-*"))  # the ledger is removed once read
    # the same command again: the sampler asks for the same rates, every record is reused
    assert tune_cli.main(args) == 0
    err = capsys.readouterr().err
    assert "sweep of 3 job(s): 0 ran ok, 3 reused" in err and "sweep of 2 job(s): 0 ran ok, 2 reused" in err
    again = json.loads((root / "selection" / "lora.json").read_text())
    assert [t["lr"] for t in again["trials"]] == lrs and again["selected_lr"] == sel["selected_lr"]


def test_the_main_command_returns_the_objective_to_optunas_sweeper(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from peftbench import cli

    out = tmp_path / "runs"
    argv = [
        "-m",
        "train.lr=tag(log,interval(1e-4,1e-2))",
        "train.steps=3",
        *TINY_RUN,
        "objective=eval_loss",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"results_dir={out}",
    ]
    assert cli.main(argv) == 0
    assert "sweep of 3 job(s): 3 ran ok, 0 reused" in capsys.readouterr().err
    recs = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(recs) == 3 and len({r["config"]["train"]["lr"] for r in recs}) == 3
    best = min(recs, key=lambda r: r["metrics"]["eval_loss"])
    found = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert f"best_value: {best['metrics']['eval_loss']}" in found  # what each job returned
    # the objective names what a job returns, not what it runs: the same config hash
    assert best["config"]["objective"] == "eval_loss"
    assert best["config_hash"] == plan.config_hash(
        [f"train.lr={best['config']['train']['lr']!r}", "train.steps=3", *TINY_RUN]
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "objective=null: the OptunaSweeper chooses each job from the figures of the earlier ones"),
        (["objective=eval_loss", "hydra.sweeper.direction=maximize"], "hydra.sweeper.direction=maximize: "),
        (["objective=accuracy"], "objective=accuracy: allowed: null or eval_loss"),
    ],
)
def test_a_searching_sweep_without_a_usable_objective_is_one_line(tmp_path, capsys, extra, message):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from peftbench import cli

    argv = ["-m", "train.lr=tag(log,interval(1e-4,1e-2))", "hydra/sweeper=optuna", *TINY_RUN, *extra]
    assert cli.main([*argv, f"results_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftbench: error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_a_job_returns_its_objective_only_when_it_is_a_finite_figure_of_an_ok_run():
    from peftbench import app

    ok = {"status": "ok", "metrics": {"eval_loss": 0.25, "eval_accuracy": 0.5}}
    assert app.objective_value(ok, "eval_loss") == 0.25 and app.objective_value(ok, None) is None
    assert app.objective_value({**ok, "status": "failed"}, "eval_loss") is None
    assert app.objective_value({"status": "ok", "metrics": {"eval_loss": math.nan}}, "eval_loss") is None
    assert app.objective_value(ok, "eval_perplexity") is None and app.objective_value(None, "eval_loss") is None


def test_an_optuna_best_near_an_end_of_its_range_is_flagged():
    from omegaconf import OmegaConf

    t = OmegaConf.create({"objective": "eval_loss", "grid": [0.1, 10], "seeds": [0], "search": "optuna"})
    # range 1e-4..1e-2: two decades; 10% of it is a factor of 10**0.2 = 1.58 from either end
    near_low = plan.select(t, "lora", 1e-3, [trial(1.5e-4, 0.5), trial(1e-3, 0.7), trial(3e-3, 0.9)])
    assert near_low["at_edge"] == "lowest"
    inside = plan.select(t, "lora", 1e-3, [trial(1.7e-4, 0.5), trial(1e-3, 0.7), trial(3e-3, 0.9)])
    assert inside["at_edge"] is None  # lowest tried, but not near the range's end
    near_high = plan.select(t, "lora", 1e-3, [trial(2e-3, 0.9), trial(7e-3, 0.5)])
    assert near_high["at_edge"] == "highest"


# ------------------------------------------------------------------------ selection


def trial(lr: float, loss: float | None, status: str = "ok") -> tuple[float, dict]:
    return lr, {"status": status, "run_id": f"r{lr}", "metrics": {"eval_loss": loss}, "config": {"task": {}}}


def settings(objective: str = "eval_loss"):
    from omegaconf import OmegaConf

    return OmegaConf.create({"objective": objective, "grid": [0.1, 1, 10], "seeds": [0, 1, 2]})


def test_a_best_rate_at_an_edge_is_flagged():
    low = plan.select(settings(), "lora", 1e-3, [trial(1e-4, 0.5), trial(1e-3, 0.7), trial(1e-2, 0.9)])
    assert low["selected_lr"] == 1e-4 and low["at_edge"] == "lowest"
    high = plan.select(settings(), "lora", 1e-3, [trial(1e-4, 0.9), trial(1e-3, 0.7), trial(1e-2, 0.5)])
    assert high["at_edge"] == "highest"
    inside = plan.select(settings(), "lora", 1e-3, [trial(1e-4, 0.9), trial(1e-3, 0.5), trial(1e-2, 0.7)])
    assert inside["selected_lr"] == 1e-3 and inside["at_edge"] is None
    assert "widen the grid" in tuned.selection_line(low) and "widen the grid" not in tuned.selection_line(inside)


def test_failed_and_non_finite_trials_are_never_selected():
    sel = plan.select(settings(), "full", 5e-5, [trial(5e-6, 0.9), trial(5e-5, None, "failed"), trial(5e-4, math.inf)])
    assert sel["selected_lr"] == 5e-6 and [t["objective"] for t in sel["trials"]] == [0.9, None, None]
    none = plan.select(settings(), "full", 5e-5, [(5e-6, None), trial(5e-5, None, "failed")])
    assert none["selected_lr"] is None and "nothing selected" in tuned.selection_line(none)


def test_an_accuracy_objective_is_maximised():
    def acc(lr, a):
        return lr, {"status": "ok", "run_id": str(lr), "metrics": {"eval_accuracy": a}, "config": {"task": {}}}

    sel = plan.select(settings("eval_accuracy"), "lora", 1e-3, [acc(1e-4, 0.6), acc(1e-3, 0.8), acc(1e-2, 0.7)])
    assert sel["direction"] == "higher" and sel["selected_lr"] == 1e-3


def test_rates_are_the_grid_times_the_default():
    assert plan.rates(1e-3, [10, 0.1, 1, 0.3, 3]) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert plan.rates(5e-5, [0.3]) == [1.5e-5]


# ------------------------------------------------------------------------ paired comparison


def made_up(tmp_path: Path, methods: dict[str, list[list[int]]]) -> Path:
    """A comparison folder with one selection per method and one final record + predictions file
    per seed, each example right (1) or wrong (0) as given."""
    root = tmp_path / "made-up"
    for d in ("selection", "final"):
        (root / d).mkdir(parents=True)
    for m, seeds in methods.items():
        sel = {
            "kind": "lr-selection",
            "method": m,
            "selected_lr": 1e-3,
            "seeds": list(range(len(seeds))),
            "trials": [{"lr": 1e-3, "objective": 0.5, "run_id": None}],
            "at_edge": None,
            "objective": "eval_loss",
            "direction": "lower",
        }
        (root / "selection" / f"{m}.json").write_text(json.dumps(sel))
        for s, right in enumerate(seeds):
            run_id = f"20260101T00000{s}000000-{m}-s{s}"
            rows = [{"index": i, "reference": 1, "predicted": 1 if r else 0} for i, r in enumerate(right)]
            (root / "final" / f"{run_id}.predictions.jsonl").write_text(
                "".join(
                    json.dumps({"index": i, "reference": 1, "initial": None, "final": row}) + "\n"
                    for i, row in enumerate(rows)
                )
            )
            rec = {
                "schema_version": 1,
                "kind": "measured",
                "status": "ok",
                "run_id": run_id,
                "method": m,
                "model": "tiny",
                "task": "t",
                "config_hash": f"{m}{s}",
                "train_lr": 1e-3,
                "created_utc": f"2026-01-01T00:00:0{s}",
                "predictions_file": f"{run_id}.predictions.jsonl",
                "config": {
                    "seed": s,
                    "method": {"name": m},
                    "task": {"path": "p", "eval_split": "test", "num_eval": None},
                },
                "metrics": {"eval_accuracy": sum(right) / len(right), "eval_examples": len(right)},
            }
            (root / "final" / f"{run_id}.json").write_text(json.dumps(rec))
    return root


def test_identical_methods_are_not_distinguishable(tmp_path):
    right = [1] * 700 + [0] * 300
    rows, why = tuned.compare(tuned.load(made_up(tmp_path, {"a": [right], "b": [right]})), resamples=2000)
    assert why is None and rows[1].paired.diff == 0 and rows[1].p_holm == 1 and rows[1].distinguishable is False


def test_sixty_more_right_of_a_thousand_is_distinguishable(tmp_path):
    a = [1] * 800 + [0] * 200
    b = [1] * 740 + [0] * 260
    t = tuned.load(made_up(tmp_path, {"a": [a, a, a], "b": [b, b, b]}))
    rows, why = tuned.compare(t, resamples=2000)
    assert why is None and [r.method for r in rows] == ["a", "b"]
    assert rows[0].spread.mean == pytest.approx(0.8) and rows[0].spread.n == 3
    assert rows[1].paired.diff == pytest.approx(-0.06) and rows[1].paired.high < 0 and rows[1].distinguishable
    assert "worse than the best" in tuned.text(t)


def test_a_loss_is_compared_over_seeds_with_welch(tmp_path):
    """Perplexity runs keep no per-example losses: each method against the best by Welch's t-test
    on the seeds' eval losses (lower is better), Holm-adjusted, and the report says so."""
    right = [1] * 10
    root = made_up(tmp_path, {"a": [right] * 3, "b": [right] * 3, "c": [right] * 3})
    losses = {"a": [3.00, 3.01, 3.02], "b": [3.50, 3.52, 3.54], "c": [3.00, 3.02, 3.04]}
    for p in (root / "final").glob("*.json"):
        rec = json.loads(p.read_text())
        rec["metrics"] = {"eval_loss": losses[rec["method"]][rec["config"]["seed"]], "eval_examples": 10}
        rec.pop("predictions_file")
        p.write_text(json.dumps(rec))
    t = tuned.load(root)
    rows, why = tuned.compare(t)
    assert why is None and [r.method for r in rows] == ["a", "c", "b"]
    b, c = rows[2], rows[1]
    assert b.paired.diff == pytest.approx(0.51) and b.paired.low > 0 and b.distinguishable
    assert c.paired.diff == pytest.approx(0.01) and c.paired.low < 0 < c.paired.high and c.distinguishable is False
    assert b.p_holm == pytest.approx(min(1.0, 2 * stats.welch(losses["b"], losses["a"]).p))  # the smaller of two
    assert "Welch's t-test" in tuned.text(t)


def test_different_example_sets_are_never_compared(tmp_path):
    root = made_up(tmp_path, {"a": [[1, 0, 1]], "b": [[1, 1, 0]]})
    for p in (root / "final").glob("*-b-*.json"):
        if not p.name.endswith(".predictions.jsonl"):
            rec = json.loads(p.read_text())
            rec["config"]["task"]["eval_split"] = "validation"
            p.write_text(json.dumps(rec))
    rows, why = tuned.compare(tuned.load(root))
    assert "different splits or example sets" in why and all(r.paired is None for r in rows)


def test_the_report_leads_with_the_tuned_comparison_and_tabulates_only_the_finals(tmp_path):
    from peftbench.report import command

    a = [1] * 80 + [0] * 20
    b = [1] * 70 + [0] * 30
    root = made_up(tmp_path, {"a": [a, a], "b": [b, b]})
    for m in ("a", "b"):  # two finite trials each: the sensitivity plot
        p = root / "selection" / f"{m}.json"
        sel = json.loads(p.read_text())
        sel["objective"] = "eval_loss"
        sel["trials"] = [{"lr": 1e-4, "objective": 0.7, "run_id": None}, {"lr": 1e-3, "objective": 0.5, "run_id": None}]
        p.write_text(json.dumps(sel))
    for f in (root / "final").glob("*.json"):  # cost figures: the Pareto plots
        rec = json.loads(f.read_text())
        big = rec["method"] == "a"
        rec["metrics"].update(peak_memory_bytes=(300 if big else 100) * 2**20, train_step_ms_median=50.0)
        rec["config"]["train"] = {"steps": 10}
        f.write_text(json.dumps(rec))
    (root / "trials").mkdir()
    trial_rec = json.loads(next((root / "final").glob("*-a-s0.json")).read_text())
    trial_rec.update(run_id="20250101T000000000000-a-trial", config_hash="trial")
    trial_rec["config"]["task"]["eval_split"] = "validation"
    (root / "trials" / "trial.json").write_text(json.dumps(trial_rec))
    page = command.build([str(root)], tmp_path / "report")
    text = page.read_text()
    assert text.index("## Tuned comparison") < text.index("\n## ", text.index("## Tuned comparison") + 5)
    assert "| a | 0.001 | 2 | 0.8000 ± 0.0000 | 2 |" in text and "widen the grid" not in text
    assert "| best | - | 300.0 | 50 | - | - |" in text  # no parameter, checkpoint or forgetting figures
    for name in ("memory", "time"):
        assert (tmp_path / "report" / f"tuned-pareto-{name}-{root.name}.png").is_file()
    assert (tmp_path / "report" / f"tuned-sensitivity-{root.name}.png").is_file()
    csv = (tmp_path / "report" / "records.csv").read_text().splitlines()
    assert len(csv) == 1 + 4  # the four finals; the validation trial is not tabulated


def test_the_report_never_puts_figures_from_different_splits_side_by_side(tmp_path):
    from peftbench.report import command

    root = made_up(tmp_path, {"a": [[1, 0, 1, 1]], "b": [[1, 1, 0, 0]]})
    for p in (root / "final").glob("*-b-*.json"):
        rec = json.loads(p.read_text())
        rec["config"]["task"]["eval_split"] = "validation"
        p.write_text(json.dumps(rec))
    text = command.build([str(root / "final")], tmp_path / "report").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert any(h.endswith(", test, 4 examples") for h in headings), headings
    assert any(h.endswith(", validation, 4 examples") for h in headings), headings
    # one split alone: the heading as before, without the eval set
    text = command.build(
        [str(root / "final" / next(p.name for p in (root / "final").glob("*-a-*.json")))], tmp_path / "one"
    ).read_text()
    assert not any("examples" in line for line in text.splitlines() if line.startswith("## "))


# ------------------------------------------------------------------------ learning curve


def test_the_learning_curve_adds_up_to_the_run_and_leaves_training_alone(tiny_run):
    plain, _ = tiny_run("method=lora", "train.steps=5")
    rec, _ = tiny_run("method=lora", "train.steps=5", "measure.curve_every=2")
    curve = rec["learning_curve"]
    m = rec["metrics"]
    assert curve["split"] == "validation" and curve["examples"] == 4 and curve["every"] == 2
    assert [p["step"] for p in curve["points"]] == [2, 4, 5]  # every 2 steps and the last
    last = curve["points"][-1]
    # the last point's FLOPs and seconds are the run's: FLOPs per token x every token trained,
    # the median step x the steps (the report's training time)
    assert last["train_flops"] == m["train_flops_per_token"] * last["padded_tokens"]
    assert last["train_s"] == pytest.approx(m["train_step_ms_median"] * 5 / 1000)
    assert last["padded_tokens"] <= 5 * 2 * 32  # 5 steps of 2 rows of at most 32 tokens
    tokens = [p["padded_tokens"] for p in curve["points"]]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    # on every eval example, the last point is the final eval loss of the same model
    assert last["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-6)
    # training is untouched, and the curve's time is its own phase
    assert rec["train_losses"] == plain["train_losses"]
    assert rec["phase_s"]["curve"] > 0 and sum(rec["phase_s"].values()) == pytest.approx(rec["wall_s"], rel=1e-6)
    assert "learning_curve" not in plain and plain["config_hash"] != rec["config_hash"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["measure.curve_every=-1"], "measure.curve_every=-1: must be >= 0"),
        (["measure.curve_examples=0"], "measure.curve_examples=0: must be >= 1"),
        (
            ["measure.curve_every=2", "parallel=ddp"],
            "measure.curve_every=2: a learning curve is taken in a one-process",
        ),
    ],
)
def test_bad_curve_settings_are_one_line(overrides, message, tmp_path, capsys):
    from peftbench import cli

    status = cli.main([*overrides, *TINY_RUN, f"results_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err


def test_quality_at_the_same_compute_from_the_learning_curves(tmp_path):
    """Method a is cheap (its last step at 30 FLOPs, 3 s), b dear; at a's budget b is read off
    its curve between the points around it."""
    from peftbench.report import command

    root = made_up(tmp_path, {"a": [[1, 0], [1, 1]], "b": [[1, 1], [0, 1]]})
    shapes = {"a": ([10, 20, 30], [1, 2, 3], [3.0, 2.0, 1.0]), "b": ([20, 40, 60], [2, 4, 6], [2.5, 1.5, 0.5])}
    for f in (root / "final").glob("*.json"):
        rec = json.loads(f.read_text())
        flops, secs, loss = shapes[rec["method"]]
        shift = 0.1 * rec["config"]["seed"]  # seeds differ: the curve is their mean
        rec["learning_curve"] = {
            "split": "test",
            "examples": 64,
            "every": 5,
            "points": [
                {
                    "step": 5 * (i + 1),
                    "padded_tokens": 100 * (i + 1),
                    "train_flops": x,
                    "train_s": s,
                    "eval_loss": y + shift,
                }
                for i, (x, s, y) in enumerate(zip(flops, secs, loss))
            ],
        }
        f.write_text(json.dumps(rec))
    flops, seconds, rows = tuned.compute_matched(tuned.load(root))
    assert (flops, seconds) == (30, 3)
    got = {c.method: (last, at_f, at_s) for c, last, at_f, at_s in rows}
    assert got["a"] == pytest.approx((1.05, 1.05, 1.05))
    assert got["b"] == pytest.approx((0.55, 2.05, 2.05))  # 2.5 - (30 - 20) / 20, plus the seeds' mean shift
    assert tuned.at_budget([10, 20], [1, 2], 5) is None  # below the curve's first point: unknown
    text = command.build([str(root)], tmp_path / "report").read_text()
    assert "| b | 0.5500 | 2.0500 | 2.0500 |" in text
    assert (tmp_path / "report" / f"tuned-curve-flops-{root.name}.png").is_file()
