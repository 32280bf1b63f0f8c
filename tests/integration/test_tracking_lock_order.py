"""A batch locks its streams' tracking rows in stream id order, whatever plan PostgreSQL picks:
a scan in the table's order locked them in that order, an index scan in the ids' order, and two
batches of one model (the live projector's and a sweep's, say) that took the two plans could each
hold a row the other waited for (a deadlock, seen in the suite on users_tracking)."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

from adapters.settings import Settings
from domain.contracts.envelope import EventEnvelope
from projections.models import READ_MODELS
from projections.schema import ensure_schema
from projections.store import _tracking_query, apply_batch
from tests.waiting import wait_until

USERS = READ_MODELS["users"]


def test_a_scan_in_the_tables_order_still_locks_the_tracking_rows_in_stream_id_order(
        settings: Settings, conn: psycopg.Connection[Any]) -> None:
    ensure_schema(conn)
    url = settings.effective_database_url
    # In the table's order, ``later`` (the larger id) comes first: it is inserted first.
    later, earlier = uuid.UUID(f"ff{uuid.uuid4().hex[2:]}"), uuid.UUID(f"00{uuid.uuid4().hex[2:]}")
    conn.execute("INSERT INTO palette_read.users_tracking (stream_id, version) VALUES (%s, 1)", [later])
    conn.execute("INSERT INTO palette_read.users_tracking (stream_id, version) VALUES (%s, 1)", [earlier])
    errors: list[BaseException] = []
    try:
        # The holder closes first (the last entered), whatever happens: the batch's statement then
        # ends, and its connection can close.
        with psycopg.connect(url) as batch, psycopg.connect(url) as other, psycopg.connect(url) as holder:
            holder.execute("SELECT 1 FROM palette_read.users_tracking WHERE stream_id = %s FOR UPDATE", [earlier])
            batch.execute("SET enable_indexscan = off")  # the plan of a batch of many streams: a scan
            batch.execute("SET enable_bitmapscan = off")

            def lock_both() -> None:
                try:
                    batch.execute(_tracking_query(USERS), [[later, earlier]]).fetchall()
                except BaseException as e:  # noqa: BLE001 - reported by the test
                    errors.append(e)

            locking = threading.Thread(target=lock_both)
            locking.start()
            pid = batch.info.backend_pid
            wait_until(lambda: conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                            [pid]).fetchone() == (True,),
                       timeout_s=30, what="the batch to wait for the row the holder locked")
            # Waiting for ``earlier``, the batch holds nothing after it: ``later`` is free.
            with other.transaction():
                assert other.execute("SELECT 1 FROM palette_read.users_tracking WHERE stream_id = %s "
                                     "FOR UPDATE NOWAIT", [later]).fetchall() == [(1,)]
            holder.rollback()
            locking.join(timeout=30)
            batch.rollback()
        assert not errors and not locking.is_alive()
    finally:
        conn.execute("DELETE FROM palette_read.users_tracking WHERE stream_id = ANY(%s)", [[later, earlier]])


def _user_events(user: uuid.UUID, grants: int) -> list[EventEnvelope]:
    registered = EventEnvelope(id=1, stream_id=user, stream_type="User", version=1, type="Registered",
                               timestamp=datetime.now(UTC), data={"plan": "free"})
    return [registered, *(EventEnvelope(id=1 + v, stream_id=user, stream_type="User", version=1 + v,
                                        type="CreditsGranted", timestamp=datetime.now(UTC), data={"amount": 10})
                          for v in range(1, grants + 1))]


def test_two_batches_of_a_new_stream_one_behind_the_other_leave_it_as_the_longer_one_folded_it(
        settings: Settings, conn: psycopg.Connection[Any]) -> None:
    """A stream no batch has tracked yet has no row to lock: a second writer (a sweep, another
    projector) that read it as absent while the first one's batch ran wrote its shorter fold over
    the first one's, tracking included, and the events in between were never folded again."""
    ensure_schema(conn)
    url = settings.effective_database_url
    user = uuid.uuid4()
    errors: list[BaseException] = []
    try:
        with psycopg.connect(url, autocommit=True) as first, psycopg.connect(url, autocommit=True) as second:
            with first.transaction():  # the longer batch, not committed yet
                apply_batch(first, _user_events(user, 3), [USERS])

                def behind() -> None:  # the broker's copy of the stream's first two events
                    try:
                        apply_batch(second, _user_events(user, 1), [USERS])
                    except BaseException as e:  # noqa: BLE001 - reported by the test
                        errors.append(e)

                folding = threading.Thread(target=behind)
                folding.start()
                pid = second.info.backend_pid
                wait_until(lambda: conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity "
                                                "WHERE pid = %s", [pid]).fetchone() == (True,),
                           timeout_s=30, what="the second batch to wait for the first one's stream")
            folding.join(timeout=30)
        assert not errors and not folding.is_alive()
        assert conn.execute("SELECT version FROM palette_read.users_tracking WHERE stream_id = %s",
                            [user]).fetchone() == (4,)
        assert conn.execute("SELECT credits FROM palette_read.users WHERE id = %s", [user]).fetchone() == (30,)
    finally:
        conn.execute("DELETE FROM palette_read.users_tracking WHERE stream_id = %s", [user])
        conn.execute("DELETE FROM palette_read.users WHERE id = %s", [user])
