"""The structure the code keeps: layers with no import back up (``lint-imports``), the config
layer's declared values equal to what the runtime accepts, the launcher above the run with the
rank passed down, the estimator tracing the run's own step, and a map of every test file."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftbench import app, config, launch, models, precision, quantize, ranks, run, train
from peftbench.estimate import cost

ROOT = Path(__file__).resolve().parent.parent


def compose_config(*overrides: str, name: str = "config"):
    return app.compose(*overrides, config_name=name)


def test_the_import_layers_contract_holds():
    """pyproject.toml's import-linter contract: no module imports from a layer above its own."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    done = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_no_project_module_is_imported_inside_a_function():
    """Imports of peftbench and methods are at the top of each module: a function-level import
    would hide an arrow (or a circle) from the contract."""
    found = []
    for path in [*ROOT.joinpath("peftbench").rglob("*.py"), *ROOT.joinpath("methods").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                names = [sub.module or ""] if isinstance(sub, ast.ImportFrom) else []
                names += [a.name for a in sub.names] if isinstance(sub, ast.Import) else []
                if any(n.split(".")[0] in ("peftbench", "methods") for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert found == []


def test_the_config_layer_declares_what_the_runtime_accepts():
    """The config layer checks values against tuples it declares itself (it imports no runtime
    module); they are the runtime's own."""
    assert set(precision.MIXED) == set(config.MIXED_PRECISIONS) <= set(config.PRECISIONS)
    assert tuple(quantize.SCHEMES) == config.QUANTIZE_SCHEMES
    assert cost.PRECISIONS == (*config.PRECISIONS, config.MASTER)
    source = (ROOT / "peftbench" / "config.py").read_text()
    for runtime in ("precision", "quantize", "ranks", "launch", "run", "train"):
        assert not re.search(rf"^from peftbench(\.| import .*\b){runtime}\b", source, re.M), runtime


def test_levers_are_built_once_from_a_run_or_an_estimate_alike():
    run_cfg = compose_config("method=lora", "train.grad_accum=2", "train.batch_size=4", "train.precision=bf16")
    lev = config.levers(run_cfg)
    assert (lev.precision, lev.grad_accum, lev.batch_size, lev.world_size) == ("bf16", 2, 4, 1)
    assert lev.lr == run_cfg.method.lr  # train.lr null: the method's default
    assert config.levers(compose_config("method=lora", "train.lr=0.5")).lr == 0.5
    est = compose_config(
        "method=full", "train.precision=fp32", "train.batch_size=4", "parallel=ddp", "parallel.nproc=2", name="estimate"
    )
    lev = config.levers(est)
    assert (lev.precision, lev.batch_size, lev.world_size, lev.rank_batch, lev.grad_clip) == ("fp32", 4, 2, 2, 1.0)


def test_the_run_never_starts_ranks_itself():
    """``run.execute`` of a distributed config without its rank is refused: only the launcher
    (above the run) starts ranks and passes each its ``ranks.Rank``."""
    cfg = compose_config("method=lora", "parallel=ddp", "parallel.nproc=2", "train.steps=1")
    with pytest.raises(RuntimeError, match="its ranks are started by peftbench.launch"):
        run.execute(cfg, run.new_record(cfg))
    assert launch.execute.__module__ == "peftbench.launch"
    assert not any(isinstance(v, ranks.Rank) for v in vars(ranks).values())  # no module-level rank


def test_the_estimator_traces_the_step_the_run_takes(monkeypatch):
    """The estimate's traced step and the calibration's real step go through the training
    loop's own ``train.OptimizerStep``."""
    calls = []
    real = train.OptimizerStep.__call__

    def spy(self, *args, **kwargs):
        calls.append(self.probe)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(train.OptimizerStep, "__call__", spy)
    cfg = compose_config("model=tiny-llama", "method=lora", "train.precision=fp32", "seq_length=16", name="estimate")
    lev = config.levers(cfg)
    spec, vocab = cost.model_spec(cfg)
    model = cost.prepare(models.build(spec, "causal-lm", vocab, 0, 0), cfg, lev)
    got = cost.tracked_step(model, lev, cost.micro_batches(lev, 16, vocab))
    assert len(calls) == 1 and isinstance(calls[0], cost.TraceProbe)
    assert got["memory_activations_bytes"] > 0 and got["flops"] > 0
    assert all(p.grad is None for p in model.parameters())  # the step zeroed its gradients
    est = cost.estimate(cfg)
    assert len(calls) == 3  # the estimate traces the same step at 2 and 3 layers
    assert est["metrics"]["train_flops_per_step"] > 0


def test_every_test_file_is_in_the_architecture_map():
    """docs/ARCHITECTURE.md's map names every test file, so a newcomer finds what pins what."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if f"({'../tests/'}{p.name})" not in doc]
    assert missing == []
