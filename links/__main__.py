"""`python -m links`: the finance CLI (cli/). The one import from links up to a composition root."""

import sys

from cli import main

sys.exit(main())
