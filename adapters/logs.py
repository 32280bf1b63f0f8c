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
import logging.config
import re
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# Libraries whose INFO lines say what this process's own lines say already (or nothing to an operator).
NOISY_LOGGERS = ("kafka", "urllib3", "botocore", "boto3", "s3transfer", "httpx", "httpcore")
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


def dict_config(process: str, level: int = logging.INFO) -> dict[str, Any]:
    """Every logger of a process (uvicorn's and the libraries' too) to stderr as JSON lines, as a
    ``logging.config.dictConfig`` dictionary: what uvicorn applies in each API worker process it
    starts (its ``log_config``), and :func:`configure` in this one."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonLines, "process": process}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        # httpx logs every request it makes at INFO (the GPU worker's callbacks, each already a
        # line of the worker's own): half of gpu.log was those.
        "loggers": {noisy: {"level": "WARNING"} for noisy in NOISY_LOGGERS},
    }


def configure(process: str, level: int = logging.INFO) -> None:
    """Route every logger of this process to stderr as JSON lines."""
    logging.config.dictConfig(dict_config(process, level))


_BLOCKS = ("DETAIL:", "HINT:", "QUERY:", "CONTEXT:")  # what PostgreSQL says after an error's message


def driver_reason(e: BaseException) -> str:
    """The driver's last line (``password authentication failed for user ...``), a password
    in it masked (libpq quotes a connection string it cannot parse, or the host name an unescaped
    ``@`` in a password made), or the error's class."""
    lines = str(e).strip().splitlines()
    # PostgreSQL's DETAIL, HINT, QUERY and CONTEXT blocks follow its message, in that order, each
    # maybe over several lines (a PL/pgSQL function's CONTEXT, a deadlock's DETAIL): the message
    # is what comes before the first. "HINT:  Check free disk space." hid "could not extend file
    # ...: No space left on device"; a QUERY line quotes its statement, literals included.
    first = next((i for i, x in enumerate(lines) if x.lstrip().startswith(_BLOCKS)), len(lines))
    lines = lines[:first] or lines
    if not lines:
        return type(e).__name__
    line = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", lines[-1].strip())
    line = re.sub(r'"[^"]*@[^"]*"', '"***"', line)  # a host name holding part of a URL's password
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", line, flags=re.IGNORECASE)[:200]
