"""``python -m tests.bench [--quick] [--json FILE] [--plot FILE.png] | --quality | --audit-events N``: the
same as `palette bench` (its flags are defined once, by the CLI)."""

from __future__ import annotations

import sys

from adapters.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
