import sys

from links.cli import main

sys.exit(main())
