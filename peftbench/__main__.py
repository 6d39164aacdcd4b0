"""Command line: ``python -m peftbench method=lora rank=8`` (Hydra overrides; ``-m`` sweeps).

Before Hydra runs anything, every job's config is composed and checked here, so that a bad
value (``rank=abc``, ``method=nope``, ``method.dropout=1.5``) ends in one line naming the key,
the value and what is allowed, exit status 2, and no record written.
"""

from __future__ import annotations

import sys

from peftbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
