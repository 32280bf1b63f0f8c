"""The README's benchmark table is what `python -m tests.bench.readme docs/bench.json` makes: each
figure of the committed run beside what tests/bench/report.py says it measures, so a label
changed in the code is changed in the README (its figures come from the run, never by hand)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.report import markdown

ROOT = Path(__file__).parents[2]


def test_the_readme_table_is_the_committed_run_with_the_labels_of_the_code() -> None:
    table = markdown(json.loads((ROOT / "docs" / "bench.json").read_text()))
    readme = (ROOT / "README.md").read_text()
    assert table in readme
