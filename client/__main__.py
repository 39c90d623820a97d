"""`python -m client` runs the CLI."""

import sys

from client.cli import main

sys.exit(main())
