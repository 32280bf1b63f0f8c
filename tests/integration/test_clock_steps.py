"""What a wall clock stepped back (an NTP step, a VM's clock put right) must not cost, on the
real PostgreSQL: its ``now()`` then stamps new rows before the ones stamped just before the step."""

from __future__ import annotations

from uuid import uuid4

import psycopg
from psycopg_pool import ConnectionPool

from adapters import keyring
from adapters.erasure import ErasedUsers


def test_an_erasure_requested_after_the_database_clock_stepped_back_is_still_read(fresh_db: str) -> None:
    """Each refresh reads the tombstones after the newest it knows (less LATE_S): one requested
    after a step back of an hour is stamped before that, and another API process accepted the
    erased user's tokens for as long as they live."""
    before_step, after_step = uuid4(), uuid4()
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        keyring.ensure_schema(conn)
        # stamped by the clock as it read before it was stepped back an hour
        conn.execute("INSERT INTO palette_erasures (user_id, requested_at) VALUES (%s, now() + interval '1 hour')",
                     [before_step])
    with ConnectionPool(fresh_db, min_size=1, max_size=1, kwargs={"autocommit": True}, open=True) as pool:
        dropped: list[object] = []
        users = ErasedUsers(pool, token_ttl_s=7 * 86400, on_erased=dropped.append)
        users.refresh()
        assert before_step in users
        with pool.connection() as conn:
            keyring.request_erasure(conn, after_step)
        users.refresh()
        assert after_step in users
        assert set(dropped) == {before_step, after_step}  # each one's key dropped from memory
