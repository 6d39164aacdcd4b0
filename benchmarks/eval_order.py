"""Eval loss in the split's order against shortest first (``tasks.eval_order``), on the
``+sweep=llm`` settings: SmolLM2-135M-Instruct, the sentiment task's first 200 validation
examples, batches of 8. Three arms: the split's order with every position's logits (the pass
whose memory a run measures), shortest first with every position's logits, and shortest first
with logits only where they predict a labelled token (``labelled_only``, a run's unmeasured
passes). Prints padded and real tokens, then seconds per pass, interleaved (one of each arm in
turn), and the losses (equal up to float rounding).

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
    arms = {  # name: (order, labelled_only)
        "split order": (None, False),
        "shortest first": (tasks.eval_order(split), False),
        "+ labelled logits": (tasks.eval_order(split), True),
    }
    for name, (order, _) in list(arms.items())[:2]:
        padded = sum(b["input_ids"].numel() for b in tasks.eval_batches(split, bs, pad, kind, order))
        print(f"{name:17s} padded tokens {padded:,} (real {sum(len(x) for x in split.ids):,})")
    took: dict[str, list[float]] = {name: [] for name in arms}
    loss: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (order, labelled) in arms.items():
            t = time.perf_counter()
            batches = tasks.eval_batches(split, bs, pad, kind, order)
            loss[name] = evaluate(s.model, batches, kind, cpu, labelled_only=labelled)["eval_loss"]
            took[name].append(time.perf_counter() - t)
    for name in arms:
        print(
            f"{name:17s} {statistics.median(took[name]):6.1f} s (runs: {', '.join(f'{x:.1f}' for x in took[name])})"
            f"  eval loss {loss[name]!r}"
        )


if __name__ == "__main__":
    main()
