"""`python -m mptlike.train [overrides]`, the same as `mptlike-train`."""

import sys

from mptlike.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
