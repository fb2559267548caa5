"""`python -m mptlike.data` is `mptlike-prep`."""

import sys

from mptlike.data.prep import main

sys.exit(main())
