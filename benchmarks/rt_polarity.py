"""Real-data check: all-MiniLM-L6-v2 on rt-polarity (movie-review sentence polarity).

Each method given on the command line runs through the ordinary peftbench harness with the
recipe of the data's README: max length 64 tokens, batch 32, 250 AdamW steps, seed 0, the
method's default learning rate, accuracy on validation.csv. Prints a table (method, trainable
parameters, validation accuracy, seconds per training step) and leaves one run record per
method, plus ``rt_polarity_summary.json``, in the results folder.

    python benchmarks/rt_polarity.py                      # every method (conf/method/*.yaml)
    python benchmarks/rt_polarity.py lora --set rank=16   # any extra Hydra override
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "rt-polarity"


def all_methods() -> list[str]:
    """Every method a run can name (``conf/method/*.yaml``), full fine-tuning first: a new
    method joins this benchmark without an edit here."""
    names = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    return sorted(names, key=lambda n: n != "full")


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def overrides(method: str, data: Path, results: Path, steps: int, extra: list[str]) -> list[str]:
    """The Hydra overrides of one method's run (the README's recipe, then ``extra``)."""
    return [
        f"method={method}",
        "model=minilm",
        "task=text-classification",
        f"task.path={data}",
        "task.max_length=64",
        "task.eval_split=validation",
        "train.batch_size=32",
        f"train.steps={steps}",
        "seed=0",
        f"results_dir={results}",
        *extra,
    ]


def compose(args: list[str]) -> Any:
    """The config ``python -m peftbench <args>`` would run, checked as the CLI checks it."""
    from peftbench import cli

    return cli.checked_config(*args)


def run_method(
    method: str,
    data: Path = DATA,
    results: Path = REPO / "results" / "rt-polarity",
    steps: int = 250,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run one method and return a table row (its record's path included)."""
    from peftbench.cli import run_and_write as run

    rec, path = run(compose(overrides(method, data, results, steps, list(extra))))
    m = rec["metrics"]
    step_ms = m.get("train_step_ms_median")
    return {
        "method": method,
        "status": rec["status"],
        "error": rec["error"],
        "trainable_params": m.get("trainable_params"),
        "val_accuracy": m.get("eval_accuracy"),
        "s_per_step": step_ms / 1e3 if step_ms is not None else None,
        "lr": rec.get("train_lr"),
        "record": str(path),
    }


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = ["| method | trainable params | val accuracy | s/step |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        acc = fmt(r["val_accuracy"], ".3f") if r["status"] == "ok" else f"failed: {r['error']}"
        lines.append(f"| {r['method']} | {fmt(r['trainable_params'], ',')} | {acc} | {fmt(r['s_per_step'], '.3f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "methods",
        nargs="*",
        default=all_methods(),
        help="method names, as for method=<name> (default: every conf/method option, full first)",
    )
    p.add_argument("--data", type=Path, default=DATA, help="folder with train.csv and validation.csv")
    p.add_argument(
        "--results",
        type=Path,
        default=REPO / "results" / "rt-polarity",
        help="folder for the run records and the summary",
    )
    p.add_argument("--steps", type=int, default=250, help="training steps (README recipe: 250)")
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override, repeatable (e.g. --set rank=16)",
    )
    args = p.parse_args(argv)
    if not (args.data / "train.csv").is_file():
        print(f"rt_polarity: error: --data={args.data}: no train.csv there", file=sys.stderr)
        return 2
    rows = []
    for method in args.methods:
        print(f"== {method}", flush=True)
        rows.append(run_method(method, args.data, args.results, args.steps, tuple(args.extra)))
    args.results.mkdir(parents=True, exist_ok=True)
    summary = args.results / "rt_polarity_summary.json"
    summary.write_text(json.dumps({"steps": args.steps, "overrides": args.extra, "rows": rows}, indent=2))
    print(table(rows))
    print(f"records: {args.results}  summary: {summary}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
