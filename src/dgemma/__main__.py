"""`python -m dgemma ...` runs the `dgemma` command line."""

import sys

from .cli import main

sys.exit(main())
