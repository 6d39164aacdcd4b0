"""``python -m peftbench.estimate``: see ``peftbench.estimate``."""

import sys

from peftbench.estimate.cli import main

if __name__ == "__main__":
    sys.exit(main())
