"""make_backlog (tests/bench/core.py), which writes the logs of `palette bench` and of
`--audit-events N`: the sessions are handed to its threads as they take them, so N sizes no queue,
and an interrupt (Ctrl-C; SIGTERM is palette's Terminated) stops it after the sessions under way."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from adapters.settings import Settings
from application.services import PaletteService
from domain.contracts.streams import topic_prefix
from tests.bench.core import make_backlog
from tests.bench.relay import EVENTS_TABLE
from tests.waiting import wait_until

CHILD = """
import signal
import sys
from adapters.settings import Settings
from application.services import PaletteService
from tests.bench.core import make_backlog

# Ctrl-C as a terminal delivers it: a suite started in the background (`make test &`, a CI's
# runner) hands its children SIGINT ignored, and Python then raises no KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
settings = Settings.model_validate_json(sys.stdin.read())
print("started", flush=True)
make_backlog(settings, 10**12)
"""
# The interrupt while make_backlog still starts its threads (each submit starts one, the first
# already running sessions): the child interrupts itself after the second.
WHILE_STARTING = """
import os
import signal
from tests.bench import core

submit, submitted = core.ThreadPoolExecutor.submit, []


def interrupting_submit(self, *args, **kwargs):
    future = submit(self, *args, **kwargs)
    submitted.append(future)
    if len(submitted) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return future


core.ThreadPoolExecutor.submit = interrupting_submit
"""


def _streams_begun(conn: psycopg.Connection[Any], stream_type: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE originator_version = 1 AND topic LIKE %s").format(
        EVENTS_TABLE), [topic_prefix(stream_type) + "%"]).fetchone()
    return int(row[0]) if row else 0


def test_a_backlog_runs_each_session_once(settings: Settings, conn: psycopg.Connection[Any],
                                         service: PaletteService) -> None:
    """``service``: the main event store's tables made."""
    before = _streams_begun(conn, "Job")
    make_backlog(settings, 6 * 45)  # more sessions than threads
    assert _streams_begun(conn, "Job") - before == 45


@pytest.mark.parametrize("when", ["sessions under way", "threads starting"])
def test_an_interrupted_backlog_stops_after_the_sessions_under_way(settings: Settings, conn: psycopg.Connection[Any],
                                                                  service: PaletteService, when: str) -> None:
    """``service``: the main event store's tables made, whose Job streams tell the sessions begun.
    An interrupt while the threads were still being started (under load, seconds after the first
    ran sessions) came before the stop was armed: every thread went on for good."""
    before = _streams_begun(conn, "Job")
    child = subprocess.Popen([sys.executable, "-c", (WHILE_STARTING if when == "threads starting" else "") + CHILD],
                             cwd=Path(__file__).parents[2], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(settings.model_dump_json())
        child.stdin.close()
        assert child.stdout.readline().strip() == "started"
        if when == "sessions under way":
            # (and, before, a queue of sessions still being filled): the interrupt is not to land
            # while the child still opens its event store, where it stopped anyway
            wait_until(lambda: _streams_begun(conn, "Job") > before, 60, "the backlog's sessions under way")
            child.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=30)
        stopped_s = time.monotonic() - t0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert stopped_s < 30, "make_backlog went on after the interrupt"
    assert child.returncode != 0 and child.stderr is not None and "KeyboardInterrupt" in child.stderr.read()
