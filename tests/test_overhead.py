"""Where a run's wall time goes, and the overhead cut: wall seconds per phase that sum to the run's
wall time, the base model's zero-shot figures computed once and reused (equal to the recomputed
ones to the bit), a damaged cache entry computed again, and the quality-only profile."""

from __future__ import annotations

import json

import pytest
from test_instruction import alpaca

from peftbench import app, cli, report
from peftbench.config import to_container
from peftbench.quality import zero_shot
from peftbench.records import config_hash

from conftest import TINY_RUN

INITIAL = ("eval_loss_initial", "eval_generate_accuracy_initial", "eval_generate_examples_initial")


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    """A zero-shot cache of this test's own (beside, not inside, its results folder)."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("PEFTBENCH_CACHE", str(root))
    return root / "zero-shot"


def instruction_run(tmp_path, *overrides: str) -> dict:
    """A tiny instruction-tuning run (its own Alpaca data, a random-init model) in this process."""
    data = tmp_path / "data"
    if not data.exists():
        alpaca(data)
    cfg = cli.checked_config(
        "task=instruction",
        f"task.path={data}",
        "train.steps=2",
        "train.batch_size=2",
        "train.timing_warmup=0",
        "task.max_length=64",
        "task.num_generate=2",
        "task.max_new_tokens=3",
        "measure.latency_repeats=1",
        "measure.latency_length=16",
        "measure.latency_grid_batches=[1]",
        "measure.latency_grid_lengths=[16]",
        "measure.decode_tokens=2",
        "measure.decode_repeats=1",
        f"results_dir={tmp_path / 'out'}",
        *overrides,
    )
    rec, _ = app.run_job(cli.APP, cfg)
    assert rec["status"] == "ok", rec.get("error")
    return rec


def test_the_phases_sum_to_the_wall_time(tmp_path, cache):
    rec = instruction_run(tmp_path, "method=lora")
    phases = rec["phase_s"]
    assert {"load", "zero_shot", "train", "eval", "latency", "decode", "checkpoint", "writing", "other"} <= set(phases)
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(rec["wall_s"], rel=1e-9, abs=1e-9)
    assert phases["other"] < 0.2 * rec["wall_s"]  # checks and record creation: small
    assert "forgetting" not in phases  # a random-init model forgets nothing measurable


def test_zero_shot_figures_are_computed_once_and_reused_to_the_bit(tmp_path, cache):
    first = instruction_run(tmp_path, "method=lora")
    assert first["zero_shot"]["source"] == "computed" and first["zero_shot"]["on"] == "the base model"
    assert len(list(cache.glob("*.json"))) == 1
    again = instruction_run(tmp_path, "method=full")  # another identity at initialisation
    assert again["zero_shot"] == {**first["zero_shot"], "source": "reused"}
    fresh = instruction_run(tmp_path, "method=full", "measure.reuse_zero_shot=false")
    assert fresh["zero_shot"]["source"] == "computed"
    for key in INITIAL:
        assert again["metrics"][key] == first["metrics"][key] == fresh["metrics"][key], key
    # the predictions before training come along: the same rows in every predictions file
    rows = [
        [json.loads(line)["initial"] for line in (tmp_path / "out" / r["predictions_file"]).read_text().splitlines()]
        for r in (first, again, fresh)
    ]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == 2


def test_a_method_that_changes_the_model_at_init_computes_its_own(tmp_path, cache):
    instruction_run(tmp_path, "method=lora")
    rec = instruction_run(tmp_path, "method=prompt")
    assert rec["zero_shot"]["source"] == "computed" and rec["zero_shot"]["on"] == "the model with the method applied"


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_its_figures_are_shared_by_the_same_initial_state_only(tmp_path, cache, method):
    """Prefix and prompt tuning's zero-shot figures are their initial state's: the trials of a
    learning-rate search (same seed, other rates) share one entry, equal to the bit to figures
    computed afresh; another seed or another number of virtual tokens is another state."""
    first = instruction_run(tmp_path, f"method={method}", "train.lr=0.01")
    other_lr = instruction_run(tmp_path, f"method={method}", "train.lr=0.1")
    assert first["zero_shot"]["source"] == "computed"
    assert other_lr["zero_shot"] == {**first["zero_shot"], "source": "reused"}
    fresh = instruction_run(tmp_path, f"method={method}", "train.lr=0.1", "measure.reuse_zero_shot=false")
    for key in INITIAL:
        assert other_lr["metrics"][key] == first["metrics"][key] == fresh["metrics"][key], key
    for changed in ("seed=1", "method.num_virtual_tokens=3"):
        rec = instruction_run(tmp_path, f"method={method}", "train.lr=0.1", changed)
        assert rec["zero_shot"]["source"] == "computed", changed
        assert rec["zero_shot"]["key"] != first["zero_shot"]["key"], changed


def test_other_evaluation_settings_are_another_entry(tmp_path, cache):
    a = instruction_run(tmp_path, "method=lora")
    b = instruction_run(tmp_path, "method=lora", "task.max_new_tokens=4")
    assert a["zero_shot"]["key"] != b["zero_shot"]["key"] and b["zero_shot"]["source"] == "computed"


def test_a_damaged_entry_is_computed_again_and_rewritten(tmp_path, cache, capsys):
    first = instruction_run(tmp_path, "method=lora")
    entry = cache / f"{first['zero_shot']['key']}.json"
    body = json.loads(entry.read_text())
    body["metrics"]["eval_loss_initial"] += 1.0  # a figure changed behind the digest's back
    entry.write_text(json.dumps(body))
    again = instruction_run(tmp_path, "method=full")
    assert again["zero_shot"]["source"] == "computed"
    assert again["metrics"]["eval_loss_initial"] == first["metrics"]["eval_loss_initial"]
    assert f"zero-shot cache entry {entry} is damaged" in capsys.readouterr().err
    entry.write_text(entry.read_text()[:40])  # truncated
    assert zero_shot.load(first["zero_shot"]["key"]) is None
    assert instruction_run(tmp_path, "method=full")["zero_shot"]["source"] == "computed"
    assert zero_shot.load(first["zero_shot"]["key"]) is not None  # rewritten whole


def test_the_quality_profile_measures_no_latency_decode_or_checkpoint(tiny_run, cache):
    rec, _ = tiny_run("method=lora", "measure.profile=quality")
    m = rec["metrics"]
    assert m["eval_loss"] > 0 and m["train_step_ms_median"] > 0
    absent = ("inference_latency_ms", "decode_ms_per_token", "checkpoint_bytes", "inference_flops", "train_mfu")
    assert not any(k in m for k in absent)  # missing, never 0
    assert rec.get("latency_grid") is None and not {"latency", "decode", "checkpoint"} & set(rec["phase_s"])
    assert rec["config"]["measure"]["profile"] == "quality"


def test_the_new_measure_keys_at_their_defaults_hash_as_before_they_existed():
    resolved = to_container(app.compose("method=lora", *TINY_RUN))
    added = ("profile", "reuse_zero_shot")
    before = {**resolved, "measure": {k: v for k, v in resolved["measure"].items() if k not in added}}
    assert config_hash(resolved) == config_hash(before)
    quality = {**resolved, "measure": {**resolved["measure"], "profile": "quality"}}
    assert config_hash(quality) != config_hash(resolved)


def test_a_bad_profile_is_one_line(capsys):
    assert cli.main(["measure.profile=fast"]) == app.EXIT_CONFIG
    assert "measure.profile=fast: allowed: full, quality" in capsys.readouterr().err


def test_the_report_says_where_the_time_went_and_shows_skipped_figures_as_missing(tiny_run, tmp_path, cache):
    tiny_run("method=lora")
    rec, path = tiny_run("method=full", "measure.profile=quality")
    text = report.build([str(path.parent)], tmp_path / "report").read_text()
    table = text.split("### Where the time went", 1)[1].split("\n\n###", 1)[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "latency" in rows["run"] and "zero_shot" in rows["run"]
    assert f"{rec['wall_s']:,.1f}" in rows["full"]
    assert "| - |" in rows["full"]  # the quality profile has no latency phase: missing, not 0
    header, full = [line for line in text.split("## ", 2)[2].splitlines() if line.startswith(("| run", "| full"))][:2]
    cells = dict(zip(header.split(" | "), full.split(" | ")))
    latency = next(v for k, v in cells.items() if "latency" in k)
    assert latency == "-"  # the group's main table: full has no latency figure, shown as missing


@pytest.mark.parametrize("kind", ["causal-lm", "classification"])
def test_the_eval_loss_batched_shortest_first_equals_the_splits_order(kind):
    """Evaluation.loss batches the examples shortest first (less padding to compute): the eval
    loss is the split's-order figure up to float rounding, and a classifier's predictions and
    references come back in the split's order, as the paired comparisons read them."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from test_lora import tiny_bert, tiny_llama

    from peftbench import run, tasks
    from peftbench.train import evaluate

    model = tiny_llama() if kind == "causal-lm" else tiny_bert()  # seeded, in eval mode
    lengths = [5, 17, 3, 11, 9, 2, 14, 7, 12, 4, 16]
    ids = [torch.randint(1, 60, (n,)).tolist() for n in lengths]
    if kind == "causal-lm":
        split = tasks.Split(ids, None, [1 + n // 2 for n in lengths])  # prompts take no loss
    else:
        split = tasks.Split(ids, [int(x) for x in torch.randint(0, 3, (len(ids),))])
    assert tasks.eval_order(split) == sorted(range(len(ids)), key=lambda i: lengths[i])
    padded = lambda order: sum(  # noqa: E731
        len(b["input_ids"][0]) * len(b["input_ids"]) for b in tasks.eval_batches(split, 4, 0, kind, order)
    )
    assert padded(tasks.eval_order(split)) < padded(None)
    in_order = evaluate(model, tasks.eval_batches(split, 4, 0, kind), kind, torch.device("cpu"))
    ev = run.Evaluation(
        OmegaConf.create({"task": {"kind": kind}, "train": {"batch_size": 4}}),
        SimpleNamespace(model=model, tokenizer=SimpleNamespace(pad_token_id=0), device=torch.device("cpu")),
        SimpleNamespace(precision="fp32"),
        split,
        split,
        {},
        {},
        None,
    )
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    found = ev.loss()
    hook.remove()
    assert widths == sorted(widths)
    assert sum(w * 4 for w in widths[:-1]) + widths[-1] * 3 == padded(tasks.eval_order(split))
    assert found["eval_loss"] == pytest.approx(in_order["eval_loss"], rel=1e-6)
    if kind == "classification":
        assert found["references"] == split.labels
        assert found["predictions"] == in_order["predictions"]


def test_only_the_pass_whose_memory_is_measured_keeps_the_splits_order(tmp_path, cache, monkeypatch):
    """The eval pass after training runs under the memory tracker in the split's order (the
    arrangement of every record's eval peak); the zero-shot pass runs shortest first."""
    from peftbench import run

    seen: list[bool] = []
    loss = run.Evaluation.loss

    def spy(self, split=None, measured=False, drafts=None):
        seen.append(measured)
        return loss(self, split, measured, drafts)

    monkeypatch.setattr(run.Evaluation, "loss", spy)
    instruction_run(tmp_path, "method=lora", "measure.reuse_zero_shot=false")
    assert seen == [False, True]  # zero-shot, then the measured pass after training


def test_reading_drafts_leaves_the_measured_eval_peak_unchanged():
    """The measured eval pass reads generation's drafts from each batch's logits after its
    forward and keeps no tensor of them: the eval phase's peak bytes, an exact figure of every
    record, equal those of the pass without drafts (a draft that kept a view of the logits
    would keep every batch's logits alive)."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from test_lora import tiny_llama

    from peftbench import measure, run, tasks

    model = tiny_llama()
    lengths = [5, 17, 3, 11, 9, 2, 14, 7, 12, 4, 16]
    split = tasks.Split([torch.randint(1, 60, (n,)).tolist() for n in lengths], None, [1 + n // 2 for n in lengths])
    cfg = OmegaConf.create({"task": {"kind": "causal-lm", "num_generate": None}, "train": {"batch_size": 4}})
    raw = SimpleNamespace(eval_prompts=[[]] * len(lengths), choices=None)
    s = SimpleNamespace(model=model, tokenizer=SimpleNamespace(pad_token_id=0), device=torch.device("cpu"), raw=raw)
    ev = run.Evaluation(cfg, s, SimpleNamespace(precision="fp32"), split, split, {}, {}, None)
    cpu = torch.device("cpu")
    plain = measure.phase_memory(model, cpu, "eval", lambda: ev.loss(measured=True))
    drafts: dict = {}
    drafted = measure.phase_memory(model, cpu, "eval", lambda: ev.loss(measured=True, drafts=drafts))
    assert sorted(drafts) == [i for i, n in enumerate(lengths) if 1 + n // 2 < n]  # the rows with an answer
    assert drafted == plain
