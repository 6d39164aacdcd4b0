"""``python -m peftbench.tune``: see ``peftbench.tune.cli``."""

from __future__ import annotations

import sys

from peftbench.tune.cli import main

if __name__ == "__main__":
    sys.exit(main())
