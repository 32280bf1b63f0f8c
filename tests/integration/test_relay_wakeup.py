"""The relay wakes on commit: the statement trigger ``install_wakeup`` puts on the events table
notifies its channel, and ``PgWakeup`` answers a wait at once for a commit that wrote events,
once for every commit made since it last looked, and not for a write elsewhere."""

from __future__ import annotations

import time

import psycopg

from adapters.relay import PgWakeup, install_wakeup


def test_a_commit_that_wrote_events_wakes_the_relay_once_for_all_since_and_nothing_else_does(fresh_db: str) -> None:
    # A database of its own: the channel is shared by every writer of the session's event store.
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE stored_events (id bigserial PRIMARY KEY, topic text NOT NULL)")
        conn.execute("CREATE TABLE elsewhere (id int)")
        install_wakeup(conn, "public", "stored_events")
        wakeup = PgWakeup(fresh_db)
        try:
            # The relay's session is held in a transaction while the writes are made: PostgreSQL
            # hands it what they notified when it ends, before its answer, so each wait below
            # needs no timeout to see what came (or that nothing did).
            with wakeup.conn.transaction():
                conn.execute("INSERT INTO elsewhere VALUES (1)")
                conn.execute("DELETE FROM stored_events")
            assert wakeup.wait(0) is False  # no event written
            with wakeup.conn.transaction():
                for n in range(3):  # three commits before the relay looks
                    conn.execute("INSERT INTO stored_events (topic) VALUES (%s)", [f"t{n}"])
            assert wakeup.wait(0) is True
            assert wakeup.wait(0) is False  # one read covers them all: no wake left for each
            with wakeup.conn.transaction():
                conn.execute("INSERT INTO stored_events (topic) VALUES ('t')")
            started = time.monotonic()
            assert wakeup.wait(30) is True and time.monotonic() - started < 15  # at once, not at the timeout
        finally:
            wakeup.close()
