"""Timing: wall-clock on CPU, CUDA events on GPU, always after warm-up and synchronised.

Every function returns per-repeat times in milliseconds; ``stats`` (``peftbench.stats.median_iqr``,
re-exported here for the timing code) reduces them to the median and the interquartile range,
the figures peftbench reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from peftbench.stats import median_iqr as stats

__all__ = ["PhaseClock", "Stopwatch", "current_device", "repeat", "stats", "synchronize"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_device(device: torch.device) -> AbstractContextManager:
    """Make ``device`` the current CUDA device for a block (nothing off CUDA): kernels, events
    and streams that name no device belong to the current one, so ``cuda:1`` needs this."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class Stopwatch:
    """Times one region in ms: CUDA events on a GPU (recorded on ``device``'s current stream,
    read after a synchronise), ``time.perf_counter`` otherwise."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Stopwatch:
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record(torch.cuda.current_stream(self.device))
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.end_event.record(torch.cuda.current_stream(self.device))
            self.end_event.synchronize()
            self.ms = self.start_event.elapsed_time(self.end_event)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def repeat(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; times in ms."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        with Stopwatch(device) as sw:
            fn()
        out.append(sw.ms)
    return out


class PhaseClock:
    """Wall seconds per phase of a run (``time.perf_counter``), phases back to back: ``enter``
    ends the phase that runs, adding its seconds to that phase's total, and starts another; a
    phase may recur and adds up. ``phase(name)`` runs a block in ``name`` and goes back to the
    phase it interrupted. ``totals()`` ends the running phase: the totals then cover every
    second from the clock's start, so they sum to it."""

    def __init__(self, first: str) -> None:
        self.current = first
        self.since = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        self.current, self.since = name, now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        back = self.current
        self.enter(name)
        try:
            yield
        finally:
            self.enter(back)

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far, the running one included (it goes on running)."""
        self.enter(self.current)
        return dict(self.seconds)
