"""The harness's error types and how a failure is said in one line; imported by every layer,
importing nothing of the project.

``ConfigError``: a configuration value that cannot work (exit status 2 before any job runs, or a
``failed`` record naming the key when it is found inside a run). ``RecordElsewhere``: a process
did its share of a run whose record another process writes.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and what
    is allowed, in one line."""


class RecordElsewhere(Exception):
    """This process did its share of a run whose record another process writes (a node other
    than node 0 of a run across several nodes). ``ok``: whether its share succeeded; the
    message says what it did. The job leaves a share file instead of a record
    (``peftbench.app.share_file``), so this node's command still knows how its part ended."""

    def __init__(self, message: str, ok: bool) -> None:
        super().__init__(message)
        self.ok = ok


def one_line(text: Any) -> str:
    """``text`` with every run of white space (newlines too) folded to one space."""
    return " ".join(str(text).split())


def failure(e: BaseException) -> str:
    """A run-time failure in one line (a config error is already one line)."""
    return one_line(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {one_line(e)}"
