"""``python -m tests.bench.readme docs/bench.json``: the README's benchmark table from a run's JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.bench.report import markdown

if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
