"""`python -m adapters.cli`: what the `palette` script runs."""

import sys

from adapters.cli import main

sys.exit(main())
