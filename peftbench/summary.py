"""A short human-readable summary of one run record, printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and scale == 1.0:
        return f"{value:,}{unit}"
    return f"{value / scale:,.{digits}f}{unit}"


def rows(rec: dict[str, Any]) -> list[tuple[str, str]]:
    m = rec.get("metrics", {})
    out = [
        ("run", f"{rec['method']} / {rec['model']} / {rec['task']}  [{rec['status']}]"),
        ("trainable params", f"{_fmt(m.get('trainable_params'))} of {_fmt(m.get('total_params'))}"
                             f" ({_fmt(m.get('trainable_percent'), '%', digits=3)})"),
        ("peak memory (train step)", _fmt(m.get("peak_memory_bytes", m.get("peak_memory_tracked_bytes")), " MiB", 2**20)),
        ("train throughput", f"{_fmt(m.get('train_tokens_per_s'), ' tok/s', digits=0)}, "
                             f"{_fmt(m.get('train_samples_per_s'), ' samples/s', digits=1)}"),
        ("train step (median, IQR)", f"{_fmt(m.get('train_step_ms_median'), ' ms', digits=1)} "
                                     f"± {_fmt(m.get('train_step_ms_iqr'), ' ms', digits=1)}"),
        ("inference latency", f"{_fmt(m.get('inference_latency_ms'), ' ms')} at batch "
                              f"{m.get('inference_batch')} x {m.get('inference_length')} tokens"),
    ]
    if m.get("inference_latency_unmerged_ms") is not None:
        out.append(("  unmerged", _fmt(m.get("inference_latency_unmerged_ms"), " ms")))
    out.append(("eval loss", f"{_fmt(m.get('eval_loss_initial'), digits=3)} -> {_fmt(m.get('eval_loss'), digits=3)}"))
    if m.get("eval_accuracy") is not None:
        out.append(("eval accuracy", _fmt(m.get("eval_accuracy"), digits=3)))
    if rec.get("error"):
        out.append(("error", rec["error"]))
    return out


def print_summary(rec: dict[str, Any], path: Path) -> None:
    table = rows(rec) + [("record", str(path))]
    width = max(len(k) for k, _ in table)
    print()
    for k, v in table:
        print(f"  {k:<{width}}  {v}")
    print()
