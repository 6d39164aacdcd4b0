"""Re-measure the LoRA paper's Table 1 (Hu et al. 2021): forward latency of GPT-2 medium with
and without adapter layers, here on this machine (the paper: a GPU, batch 1, 128 tokens).

    python benchmarks/table1.py                      # gpt2-medium, CPU, points 1x128 and 4x128
    python benchmarks/table1.py --model tiny-gpt2 --points 1x32 --rounds 3 --out /tmp/t1.md

Every variant is composed, checked and built by the normal harness (``train.steps=0``, the
same config path as ``python -m peftbench``): the base model (``method=full``, not trained),
LoRA merged, and bottleneck adapters in the Pfeiffer-like (one per layer, "AdapterL") and
Houlsby-like (two per layer, "AdapterH") variants. All variants live in ONE process and are
timed in interleaved rounds (every round times each variant, in a rotated order), so that
machine drift hits all of them alike; the overhead is the median over rounds of each round's
variant / base ratio. The Markdown table goes to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

# The paper's Table 1, batch 1 x 128 tokens on an NVIDIA Quadro RTX8000: ms and overhead.
PAPER = {"base": (19.8, 0.0), "lora": (19.8, 0.0), "adapter-l": (23.9, 20.7), "adapter-h": (25.8, 30.3)}
PAPER_ADAPTER_PARAMS = 11e6  # |Theta| of the paper's adapters in that column

VARIANTS = [  # key, label, overrides (the bottleneck is added per model)
    ("base", "Base / Fine-Tune (method=full, not trained)", ["method=full"]),
    ("lora", "LoRA, merged (method=lora)", ["method=lora"]),
    ("adapter-l", "AdapterL-like (method=adapter variant=pfeiffer)", ["method=adapter", "method.variant=pfeiffer"]),
    ("adapter-h", "AdapterH-like (method=adapter variant=houlsby)", ["method=adapter", "method.variant=houlsby"]),
]


def compose(overrides: list[str]) -> Any:
    """The config ``python -m peftbench <overrides>`` would run, checked as the CLI checks it."""
    from peftbench import cli

    return cli.checked_config(*overrides)


def bottleneck_for(cfg: Any, per_layer: int, target_params: float) -> int:
    """Bottleneck m giving about ``target_params`` adapter parameters: each adapter has
    2 d m + m + d, with ``per_layer`` adapters in each of the model's layers."""
    arch = cfg.model.arch
    d = arch.get("n_embd") or arch.get("hidden_size")
    layers = arch.get("n_layer") or arch.get("num_hidden_layers")
    return max(1, round((target_params / (per_layer * layers) - d) / (2 * d + 1)))


def build(model: str, device: str, bottleneck: dict[str, int | None], extra: list[str]) -> dict[str, dict]:
    """Every variant set up by the harness, merged where its method merges."""
    from peftbench.run import new_record, setup

    built = {}
    for key, label, overrides in VARIANTS:
        ov = [f"model={model}", "train.steps=0", f"device={device}", *overrides, *extra]
        if key.startswith("adapter"):
            per_layer = 1 if key == "adapter-l" else 2
            probe = compose(ov)
            m = bottleneck.get(key)
            if m is None and model == "gpt2-medium":  # the paper's adapter size
                m = bottleneck_for(probe, per_layer, PAPER_ADAPTER_PARAMS)
            if m is not None:
                ov.append(f"method.bottleneck={m}")
        cfg = compose(ov)
        rec = new_record(cfg)
        s = setup(cfg, rec)
        merged = bool(s.method.merge(s.model))
        s.model.eval()
        built[key] = {
            "label": label,
            "setup": s,
            "merged": merged,
            "cfg": cfg,
            "trainable": rec["metrics"]["trainable_params"],
            "total": rec["metrics"]["total_params"],
        }
        print(
            f"built {key}: {rec['metrics']['total_params']:,} params, {rec['metrics']['trainable_params']:,} "
            f"trainable{' (merged)' if merged else ''}",
            flush=True,
        )
    return built


def time_point(
    built: dict[str, dict], batch: int, length: int, rounds: int, per_round: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Interleaved timing at one point; per variant: median/IQR ms and overhead vs base (%)."""
    from peftbench.measure import latency_inputs
    from peftbench.timing import Stopwatch, stats, synchronize

    keys = list(built)
    any_setup = built[keys[0]]["setup"]
    inputs = latency_inputs(len(any_setup.tokenizer), batch, length, any_setup.device)
    times: dict[str, list[float]] = {k: [] for k in keys}
    ratios: dict[str, list[float]] = {k: [] for k in keys}
    with torch.no_grad():
        for k in keys:
            for _ in range(warmup):
                built[k]["setup"].model(**inputs)
        synchronize(any_setup.device)
        for r in range(rounds):
            order = keys[r % len(keys) :] + keys[: r % len(keys)]
            this_round: dict[str, float] = {}
            for k in order:
                model = built[k]["setup"].model
                ms = []
                for _ in range(per_round):
                    with Stopwatch(any_setup.device) as sw:
                        model(**inputs)
                    ms.append(sw.ms)
                times[k] += ms
                this_round[k] = statistics.median(ms)
            for k in keys:
                ratios[k].append(this_round[k] / this_round["base"])
    out = {}
    for k in keys:
        st, rt = stats(times[k]), stats(ratios[k])
        out[k] = {
            "median_ms": st["median"],
            "iqr_ms": st["iqr"],
            "overhead_percent": 100 * (rt["median"] - 1),
            "overhead_iqr_percent": 100 * rt["iqr"],
        }
    return out


def markdown(built: dict, results: dict[tuple[int, int], dict], args: argparse.Namespace) -> str:
    from peftbench.records import writer as record

    s = next(iter(built.values()))["setup"]
    prov = record.provenance(s.device)
    points = list(results)
    head = "| variant | trainable params | " + " | ".join(f"{b}x{n}: ms (IQR) | overhead" for b, n in points)
    head += " | paper, 1x128 on GPU: ms | paper overhead |"
    rule = "|" + "---|" * (2 + 2 * len(points) + 2)
    lines = [
        f"# LoRA paper Table 1, re-measured ({s.device.type}, model={args.model})",
        "",
        f"Device: {prov['device_name']}; torch {prov['packages']['torch']}, {torch.get_num_threads()} threads; "
        f"{args.rounds} interleaved rounds x {args.per_round} forward passes per variant and point "
        f"after {args.warmup} warm-up passes. Overhead: median over rounds of (variant / base) - 1, "
        "IQR in brackets. Paper: Hu et al. 2021, Table 1 (GPT-2 medium, NVIDIA Quadro RTX8000, batch 1, "
        "128 tokens, adapters with about 11M parameters).",
        "",
        head,
        rule,
    ]
    for key, b in built.items():
        cells = []
        for p in points:
            r = results[p][key]
            cells.append(f"{r['median_ms']:.2f} ({r['iqr_ms']:.2f})")
            cells.append("-" if key == "base" else f"{r['overhead_percent']:+.1f}% ({r['overhead_iqr_percent']:.1f})")
        paper_ms, paper_pct = PAPER[key]
        lines.append(
            f"| {b['label']} | {b['trainable']:,} | " + " | ".join(cells) + f" | {paper_ms} | {paper_pct:+.1f}% |"
        )
    lines += [
        "",
        "Random-init weights (latency does not depend on their values). The paper measured a GPU, "
        "where batch-1 latency is dominated by kernel launches, so adapters' few extra small layers "
        "weigh more there than on a CPU, where the work of the big matrix products dominates.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-medium", help="model preset (conf/model/<name>.yaml)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--points", default="1x128,4x128", help="batch x length points, comma-separated")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=2, help="timed passes per variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--bottleneck-l",
        type=int,
        default=None,
        help="AdapterL bottleneck (default: ~11M params on gpt2-medium, else the method's default)",
    )
    p.add_argument(
        "--bottleneck-h",
        type=int,
        default=None,
        help="AdapterH bottleneck (default: ~11M params on gpt2-medium, else the method's default)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=str(REPO / "docs" / "table1-cpu.md"))
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every variant")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    points = [tuple(int(v) for v in pt.lower().split("x")) for pt in args.points.split(",")]
    bottleneck = {"adapter-l": args.bottleneck_l, "adapter-h": args.bottleneck_h}

    from peftbench.errors import ConfigError

    try:
        built = build(args.model, args.device, bottleneck, args.overrides)
    except ConfigError as e:
        print(f"table1: error: {e}", file=sys.stderr)
        return 2
    results = {}
    for b, n in points:
        results[(b, n)] = time_point(built, b, n, args.rounds, args.per_round, args.warmup)
        print(
            f"{b}x{n}: "
            + ", ".join(
                f"{k} {r['median_ms']:.2f} ms ({r['overhead_percent']:+.1f}%)" for k, r in results[(b, n)].items()
            ),
            flush=True,
        )
    text = markdown(built, results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print("\n" + text + f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
