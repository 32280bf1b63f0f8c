"""JSON log lines and their rendering on the terminal."""

from __future__ import annotations

import json
import logging

import psycopg
import pytest

from adapters.logs import JsonLines, bound
from infra.supervisor import readable


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            import sys

            exc_info = sys.exc_info()
    record = logging.LogRecord("palette.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_record_is_one_json_line_with_the_ids_bound_around_it():
    fmt = JsonLines("dispatcher")
    with bound(job_id="j-1", user_id="u-1"):
        line = fmt.format(_record("sent %d task(s)", 3, request_id="r-9"))
    outside = json.loads(fmt.format(_record("later")))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["msg"] == "sent 3 task(s)" and entry["level"] == "warning" and entry["process"] == "dispatcher"
    assert (entry["job_id"], entry["user_id"], entry["request_id"]) == ("j-1", "u-1", "r-9")
    assert "job_id" not in outside and "user_id" not in outside  # unbound on leaving


def test_a_traceback_stays_inside_its_line():
    line = JsonLines("api").format(_record("failed", exc=True))
    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exc"]


def test_the_terminal_shows_json_lines_readably_and_other_lines_as_they_came():
    line = JsonLines("gpu").format(_record("item %s failed", "7", exc=True, job_id="j-2"))
    shown = readable(line.encode() + b"\n")
    first, *rest = shown.splitlines()
    assert first == "WARNING palette.test: item 7 failed job_id=j-2"
    assert rest and all(row.startswith("    ") for row in rest)
    for raw in (b"2026-12-01 LOG:  database system is ready\n", b"{not json\n", b'{"no": "msg"}\n'):
        assert readable(raw) == raw.decode()


def test_the_dictionary_each_api_worker_applies_makes_json_lines_and_quiets_the_libraries():
    """What uvicorn applies in every API worker process (its log_config): loggers made before it
    (uvicorn's) still log, as JSON lines; the libraries' info lines are dropped."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import logging, logging.config\n"
            "early = logging.getLogger('uvicorn.error')\n"
            "from adapters.logs import dict_config\n"
            "logging.config.dictConfig(dict_config('api'))\n"
            "early.warning('worker %d up', 2)\n"
            "logging.getLogger('kafka.conn').info('hidden')\n"
            "logging.getLogger('palette.api').info('shown')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["logger"], e["msg"], e["process"], e["level"]) for e in lines] == [
        ("uvicorn.error", "worker 2 up", "api", "warning"), ("palette.api", "shown", "api", "info")]


@pytest.mark.parametrize(("said", "reason"), [
    # the events' insert function (adapters.pg_streams): its LOCK TABLE waited out lock_timeout
    ('canceling statement due to lock timeout\n'
     'CONTEXT:  SQL statement "LOCK TABLE public.stored_events IN EXCLUSIVE MODE"\n'
     'PL/pgSQL function palette_insert_events_uuid(stored_event_uuid[]) line 1 at SQL statement',
     "canceling statement due to lock timeout"),
    # a deadlock's DETAIL runs over two lines, naming the processes
    ('deadlock detected\nDETAIL:  Process 1 waits for ShareLock on transaction 7; blocked by process 2.\n'
     'Process 2 waits for ShareLock on transaction 8; blocked by process 1.\nHINT:  See server log for query details.',
     "deadlock detected"),
    # a QUERY line quotes the statement, literals and all
    ("could not extend file \"base/1/2\": No space left on device\nHINT:  Check free disk space.\n"
     "QUERY:  insert into t values ('a literal, a secret')\nCONTEXT:  PL/pgSQL function f() line 3 at PERFORM",
     'could not extend file "base/1/2": No space left on device'),
])
def test_the_reason_is_the_message_not_a_line_of_the_blocks_that_follow_it(said: str, reason: str) -> None:
    """PostgreSQL's DETAIL, HINT, QUERY and CONTEXT come after its message, in that order, and a
    block may run over several lines: the reason is what comes before the first of them."""
    from adapters.logs import driver_reason

    assert driver_reason(psycopg.OperationalError(said)) == reason
