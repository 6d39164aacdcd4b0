"""A short human-readable summary of one run record, printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 2**20


def _fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and scale == 1.0:
        return f"{value:,}{unit}"
    return f"{value / scale:,.{digits}f}{unit}"


def _pm(median: Any, iqr: Any, unit: str, digits: int = 1) -> str:
    """``median (IQR x)``: the spread is the interquartile range, not a standard deviation."""
    if median is None:
        return "-"
    return f"{_fmt(median, unit, digits=digits)} (IQR {_fmt(iqr, unit, digits=digits)})"


def _memory(m: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    if m.get("peak_memory_bytes") is not None:
        parts = ", ".join(
            f"{c[0].upper()} {_fmt(m.get(f'memory_{c}_bytes'), '', MIB)}"
            for c in ("weights", "gradients", "optimizer", "activations")
        )
        out.append(("peak memory, train step", f"{_fmt(m['peak_memory_bytes'], ' MiB', MIB)}  ({parts} MiB)"))
    phases = [(p, m.get(f"{p}_peak_memory_bytes")) for p in ("eval", "inference")]
    text = ", ".join(f"{p} {_fmt(v, ' MiB', MIB)}" for p, v in phases if v is not None)
    if text:
        out.append(("peak memory, no grad", text))
    cuda = [
        (p, m.get(f"cuda_{p}_max_allocated_bytes"), m.get(f"cuda_{p}_max_reserved_bytes"))
        for p in ("train", "eval", "inference")
    ]
    text = ", ".join(f"{p} {_fmt(a, '', MIB)}/{_fmt(r, '', MIB)}" for p, a, r in cuda if a is not None)
    if text:  # each phase starts with the cache emptied, so its reserved bytes are its own
        out.append(("CUDA allocated/reserved", text + " MiB (cache emptied before each phase)"))
    return out


def _throughput(m: dict[str, Any]) -> list[tuple[str, str]]:
    if m.get("train_step_ms_median") is None:
        return []
    out = [
        (
            "train step",
            f"{_pm(m.get('train_step_ms_median'), m.get('train_step_ms_iqr'), ' ms')} "
            f"over {m.get('train_timed_steps')} steps",
        ),
        (
            "train throughput",
            f"{_pm(m.get('train_tokens_per_s'), m.get('train_tokens_per_s_iqr'), ' tok/s', 0)}, "
            f"{_fmt(m.get('train_samples_per_s'), ' samples/s', digits=1)}",
        ),
    ]
    if m.get("train_mfu") is not None:
        out.append(("train MFU", _fmt(100 * m["train_mfu"], "%", digits=1)))
    return out


def _flops(m: dict[str, Any]) -> list[tuple[str, str]]:
    parts = []
    if m.get("train_flops_per_step") is not None:
        parts.append(f"train step {_fmt(m['train_flops_per_step'], ' GFLOP', 1e9)}")
    if m.get("inference_flops") is not None:
        parts.append(f"forward {_fmt(m['inference_flops'], ' GFLOP', 1e9)}")
    return [("FLOPs (matmul)", ", ".join(parts))] if parts else []


def _latency(rec: dict[str, Any], m: dict[str, Any]) -> list[tuple[str, str]]:
    point = f"batch {m.get('inference_batch')} x {m.get('inference_length')} tokens"
    text = f"{_pm(m.get('inference_latency_ms'), m.get('inference_latency_iqr_ms'), ' ms', 2)} at {point}"
    out = [("prefill latency", text)]
    if m.get("inference_latency_unmerged_ms") is not None:
        out[0] = ("prefill latency, merged", text)
        out.append(
            (
                "  unmerged",
                _pm(m["inference_latency_unmerged_ms"], m.get("inference_latency_unmerged_iqr_ms"), " ms", 2),
            )
        )
    grid = rec.get("latency_grid") or []
    if grid:
        out.append(
            (
                "  grid (b x len: ms)",
                "  ".join(f"{g['batch']}x{g['length']}: {_fmt(g['inference_latency_ms'], digits=1)}" for g in grid),
            )
        )
    if m.get("decode_ms_per_token") is not None:
        text = _pm(m["decode_ms_per_token"], m.get("decode_ms_per_token_iqr"), " ms/token", 2)
        if m.get("decode_unmerged_ms_per_token") is not None:
            text += f"; unmerged {_fmt(m['decode_unmerged_ms_per_token'], ' ms/token')}"
        out.append(("decode (KV cache)", text))
    return out


def _before_after(m: dict[str, Any]) -> list[tuple[str, str]]:
    """Quality of an instruction task and forgetting, before training -> after."""
    lines = (
        ("eval_perplexity", "eval perplexity", None),
        ("eval_generate_accuracy", "accuracy, generation", "eval_generate_examples"),
        ("eval_choice_accuracy", "accuracy, choice", "eval_generate_examples"),
        ("forgetting_kl", "forgetting KL, nats/token", None),
        ("forgetting_ce_delta", "forgetting CE delta, nats", None),
        ("skill_accuracy", "addition skill accuracy", None),
    )
    out = []
    for key, label, count in lines:
        if m.get(key) is None:
            continue
        text = _fmt(m[key], digits=3)
        if m.get(f"{key}_initial") is not None:
            text = f"{_fmt(m[f'{key}_initial'], digits=3)} -> {text}"
        out.append((label, text + (f"  ({m[count]} examples)" if count and m.get(count) else "")))
    return out


def rows(rec: dict[str, Any]) -> list[tuple[str, str]]:
    m = rec.get("metrics", {})
    out = [
        ("run", f"{rec['method']} / {rec['model']} / {rec['task']}  [{rec['status']}]"),
        (
            "trainable params",
            f"{_fmt(m.get('trainable_params'))} of {_fmt(m.get('total_params'))}"
            f" ({_fmt(m.get('trainable_percent'), '%', digits=3)})",
        ),
    ]
    out += _memory(m) + _flops(m) + _throughput(m)
    if m.get("inference_latency_ms") is not None:
        out += _latency(rec, m)
    if m.get("checkpoint_bytes") is not None:
        out.append(("checkpoint (safetensors)", _fmt(m["checkpoint_bytes"], " MiB", MIB, digits=3)))
    if m.get("eval_loss") is not None:
        out.append(
            ("eval loss", f"{_fmt(m.get('eval_loss_initial'), digits=3)} -> {_fmt(m.get('eval_loss'), digits=3)}")
        )
    if m.get("eval_accuracy") is not None:
        out.append(("eval accuracy", _fmt(m.get("eval_accuracy"), digits=3)))
    out += _before_after(m)
    if rec.get("wall_s") is not None:
        out.append(("wall time", _fmt(rec["wall_s"], " s", digits=1) + _where(rec)))
    if rec.get("zero_shot"):
        z = rec["zero_shot"]
        out.append(("zero-shot figures", f"{z['source']} on {z['on']}"))
    if rec.get("error"):
        out.append(("error", rec["error"]))
    return out


def _where(rec: dict[str, Any]) -> str:
    """``: train 60%, zero_shot 20%, ...``: where the wall time went, largest share first."""
    phases = rec.get("phase_s") or {}
    total = sum(phases.values())
    if not total:
        return ""
    shares = sorted(phases.items(), key=lambda kv: -kv[1])
    return ": " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in shares if v >= 0.005 * total)


def print_summary(rec: dict[str, Any], path: Path) -> None:
    table = rows(rec) + [("record", str(path))]
    width = max(len(k) for k, _ in table)
    print()
    for k, v in table:
        print(f"  {k:<{width}}  {v}")
    print()
