"""No secret value in any log: every process's log of the whole session (this module runs after
the end-to-end and integration suites, which try bad tokens, forged callbacks and crashes), and
every record the test process itself logged."""

from __future__ import annotations

from pathlib import Path

from adapters.settings import SECRET_FIELDS
from infra.stack import EmbeddedStack
from tests import figures
from tests.conftest import RECORDS


def test_no_secret_value_appears_in_any_captured_log(apps: EmbeddedStack) -> None:
    values = {name: str(getattr(apps.settings, name)) for name in SECRET_FIELDS}
    assert all(len(v) >= 16 for v in values.values()), "secrets too short to search for meaningfully"
    logs = sorted(Path(apps.log_dir).glob("*.log*"))  # the rotated ones (x.log.1, ...) too
    assert {p.name.split(".")[0] for p in logs} >= {"postgres", "s3", "broker", "api", "relay", "projector"}
    scanned = 0
    for path in logs:
        text = path.read_text(errors="replace")
        scanned += len(text)
        for name, value in values.items():
            assert value not in text, f"{name} appears in {path.name}"
    for record in RECORDS:
        for name, value in values.items():
            assert value not in record, f"{name} appears in a log record of the test process"
    figures.add("log bytes scanned for secrets (0 found)", scanned + sum(len(r) for r in RECORDS))
