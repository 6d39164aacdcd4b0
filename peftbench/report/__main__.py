"""``python -m peftbench.report --results DIR [DIR ...] --out DIR``: see ``peftbench.report``."""

import sys

from peftbench.report.command import main

if __name__ == "__main__":
    sys.exit(main())
