"""Logs: one JSON object per line from every process (``palette serve``), with the ids a reader
follows a request or a job by.

Each line holds ``ts`` (UTC, ISO 8601), ``level``, ``process``, ``logger`` and ``msg``, then
whichever of ``request_id``, ``user_id``, ``job_id`` and ``trace_id`` are known: set for the
duration of a request or a task in :data:`CONTEXT` (``with bound(job_id=...)``), or passed as
``extra=`` to one call. Secrets are never put in a record (tests/test_secrets_not_logged.py scans
every record the suites make). ``palette up`` renders the lines readably on the terminal (the
supervisor); the files under the data directory keep them as written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

FIELDS = ("request_id", "user_id", "job_id", "trace_id")
CONTEXT: dict[str, ContextVar[str | None]] = {name: ContextVar(f"palette_{name}", default=None) for name in FIELDS}


@contextlib.contextmanager
def bound(**ids: object) -> Iterator[None]:
    """Every record made inside carries these ids (None values are left out)."""
    tokens = [(CONTEXT[name], CONTEXT[name].set(None if value is None else str(value)))
              for name, value in ids.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class JsonLines(logging.Formatter):
    """A record as one line of JSON (a traceback goes in ``exc``, newlines escaped)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "process": self.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None) or CONTEXT[name].get()
            if value:
                entry[name] = str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(process: str, level: int = logging.INFO) -> None:
    """Route every logger of this process (uvicorn's and the libraries' too) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(process))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("kafka", "urllib3", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
