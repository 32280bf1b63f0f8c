"""catchup_events (tests/bench/recovery.py): the events written while the projector was stopped,
counted as stored, not as the distance between two head positions."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg import sql

from application.services import PaletteService
from tests.bench.recovery import _head, events_between
from tests.bench.relay import EVENTS_TABLE


def test_the_catch_up_backlog_counts_the_events_stored_not_the_positions_taken(
        conn: psycopg.Connection[Any], service: PaletteService) -> None:
    before = _head(conn)
    user = service.register(f"catchup-{uuid.uuid4().hex}").value[0]
    # Positions no event holds, as a rolled-back insert leaves them.
    conn.execute("SELECT nextval(pg_get_serial_sequence(%s, 'notification_id')) FROM generate_series(1, 5)",
                 [EVENTS_TABLE.as_string(conn)])
    service.create_job(user, "interior", 2)
    head = _head(conn)
    row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE notification_id > %s").format(EVENTS_TABLE),
                       [before]).fetchone()
    stored = row[0] if row else 0
    assert 0 < stored == events_between(conn, before, head) < head - before
    assert events_between(conn, head, head) == 0
