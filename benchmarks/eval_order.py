"""Eval loss in the split's order against shortest first (``tasks.eval_order``), on the
``+sweep=llm`` settings: SmolLM2-135M-Instruct, the sentiment task's first 200 validation
examples, batches of 8, full logits and loss as a run computes them. Prints padded and real
tokens, then seconds per pass, interleaved (order, sorted, order, sorted ...), and the two
losses (equal up to float rounding).

    python benchmarks/eval_order.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peftbench import app, run, tasks, timing
from peftbench.train import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    cfg = app.compose("model=smollm2-135m", "task=sentiment", "task.num_eval=200", "results_dir=/tmp/eval-order")
    s = run.load_base(cfg, run.new_record(cfg), timing.PhaseClock("load"))
    _, split = tasks.tokenize(s.raw, s.tokenizer, cfg.task.max_length, cfg.task.template)
    pad, kind, bs, cpu = s.tokenizer.pad_token_id, cfg.task.kind, cfg.train.batch_size, torch.device("cpu")
    orders = {"split order": None, "shortest first": tasks.eval_order(split)}
    for name, order in orders.items():
        padded = sum(b["input_ids"].numel() for b in tasks.eval_batches(split, bs, pad, kind, order))
        print(f"{name:15s} padded tokens {padded:,} (real {sum(len(x) for x in split.ids):,})")
    took: dict[str, list[float]] = {name: [] for name in orders}
    loss: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, order in orders.items():
            t = time.perf_counter()
            loss[name] = evaluate(s.model, tasks.eval_batches(split, bs, pad, kind, order), kind, cpu)["eval_loss"]
            took[name].append(time.perf_counter() - t)
    for name in orders:
        print(
            f"{name:15s} {statistics.median(took[name]):6.1f} s (runs: {', '.join(f'{x:.1f}' for x in took[name])})"
            f"  eval loss {loss[name]!r}"
        )


if __name__ == "__main__":
    main()
