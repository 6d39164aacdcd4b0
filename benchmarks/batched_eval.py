"""Speed of batched instruction evaluation (``peftbench.quality.generation.evaluate``) on
SmolLM2-135M and the ``sentiment`` task, and a check that batching changes no result.

    python benchmarks/batched_eval.py                         # 48 prompts, batch sizes 1, 8, 16
    python benchmarks/batched_eval.py --examples 16 --rounds 1 --new-tokens 16

The model, tokenizer and prompts come from the harness exactly as a run builds them
(``cli.checked_config``, ``run.setup``, ``tasks.tokenize``; the prompts of
``run.instruction_quality``: the first ``--examples`` validation examples cut at their prompt
length). Each timing is the wall time (seconds) of one whole ``evaluate`` call: greedy
generation of up to ``--new-tokens`` tokens (default: the task's ``max_new_tokens``) and
choice scoring. One batch of each size is run untimed first (warm-up); the timed calls are interleaved
(1, 8, 16, 1, 8, 16, ...), so that machine drift hits every batch size alike, and the median
per batch size is reported with the speed-up over batch size 1. The generated texts and the
chosen answers of every batch size are compared with those of batch size 1, and so are the
choice log-probabilities of the first ``--score-examples`` prompts (max absolute difference,
nats). About 10 minutes on 2 idle CPU cores with the defaults (the batch-size-1 calls take most).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from peftbench import cli, run, tasks  # noqa: E402
from peftbench.quality import generation  # noqa: E402
from peftbench.tasks import answers  # noqa: E402


def load(examples: int) -> tuple[Any, Any, list[list[int]], list[str]]:
    """The config, the setup (model, tokenizer, device) and the first ``examples`` validation
    prompts (token ids) with their reference answers, as a sentiment run builds them."""
    cfg = cli.checked_config("model=smollm2-135m", "task=sentiment", "method=full", "measure.forgetting=false")
    s = run.setup(cfg, run.new_record(cfg))
    _, ev = tasks.tokenize(s.raw, s.tokenizer, cfg.task.max_length, cfg.task.template)
    assert ev.prompt_lengths is not None and s.raw.eval_answers is not None  # an instruction task
    prompts = [ev.ids[i][: ev.prompt_lengths[i]] for i in range(examples)]
    return cfg, s, prompts, list(s.raw.eval_answers[:examples])


def timed(call: Any, device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``call()`` (the device synchronised on both sides) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--score-examples", type=int, default=16, help="prompts whose choice scores are compared")
    args = parser.parse_args(argv)
    cfg, s, prompts, refs = load(args.examples)
    model, tok, device = s.model.to(s.device).eval(), s.tokenizer, s.device
    new_tokens = args.new_tokens or cfg.task.max_new_tokens
    extract = answers.rule(cfg.task.answer_rule, cfg.task.answer_regex)
    lengths = [len(p) for p in prompts]
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), ")
    print(f"up to {new_tokens} new tokens, choices {list(s.raw.choices or [])}, {torch.get_num_threads()} threads")

    def evaluate(bs: int) -> Any:
        return generation.evaluate(model, tok, prompts, refs, extract, new_tokens, s.raw.choices, device, batch_size=bs)

    for bs in args.sizes:  # warm-up, untimed: one batch of each size
        generation.evaluate(model, tok, prompts[:bs], refs[:bs], extract, new_tokens, s.raw.choices, device, bs)
    seconds: dict[int, list[float]] = {bs: [] for bs in args.sizes}
    results: dict[int, Any] = {}  # the outputs of the first round, compared below
    for r in range(args.rounds):
        for bs in args.sizes:
            took, out = timed(lambda bs=bs: evaluate(bs), device)
            seconds[bs].append(took)
            results.setdefault(bs, out)
            print(f"round {r}: batch_size={bs:3d}  {took:7.2f} s", flush=True)
    report(args.sizes, seconds, results)
    compare_scores(model, tok, prompts[: args.score_examples], s.raw.choices, device, args.sizes)


def report(sizes: list[int], seconds: dict[int, list[float]], results: dict[int, Any]) -> None:
    """Median seconds per batch size, speed-up over the first size, and output equality with it."""
    first = sizes[0]
    base = statistics.median(seconds[first])
    _, want = results[first]
    print(f"\n{'batch_size':>10} {'median s':>9} {'speed-up':>9}  generated = bs{first}  chosen = bs{first}  metrics")
    for bs in sizes:
        med = statistics.median(seconds[bs])
        found, pred = results[bs]
        same_text = pred.generated == want.generated
        same_choice = pred.chosen == want.chosen
        print(f"{bs:>10} {med:>9.2f} {base / med:>8.2f}x  {same_text!s:>14}  {same_choice!s:>11}  {found}")


def compare_scores(model: Any, tok: Any, prompts: list[list[int]], choices: Any, device: Any, sizes: list[int]) -> None:
    """Max absolute difference (nats) of the choice log-probabilities of each batch size from
    those of one prompt at a time."""
    if not choices:
        return
    ids = generation.choice_ids(tok, list(choices))
    one = torch.tensor([generation.choice_logprobs(model, p, ids, device) for p in prompts])
    for bs in sizes:
        batched = [
            s
            for lo in range(0, len(prompts), bs)
            for s in generation.choice_logprobs_batch(model, prompts[lo : lo + bs], ids, device)
        ]
        gap = float((torch.tensor(batched) - one).abs().max())
        print(f"choice log-probs, batch_size={bs}: max |batched - one by one| = {gap:.2e} nats")


if __name__ == "__main__":
    main(sys.argv[1:])
