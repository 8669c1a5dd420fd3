"""`python -m dgemma.server --model DIR [...]`: run the OpenAI-compatible server (same flags as `dgemma serve`)."""

import sys

from . import main

sys.exit(main())
