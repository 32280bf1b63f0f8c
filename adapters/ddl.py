"""Schema statements that several processes run as they start: under a lock of their own.

``CREATE SCHEMA/TABLE ... IF NOT EXISTS`` run side by side on a fresh database fails with a
unique violation on PostgreSQL's catalog (``pg_type``, ``pg_namespace``): the loser's process
exited at its start. Each set of statements takes a transaction-scoped advisory lock named
after it, so the second starter waits and then finds every object made.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def run_locked(conn: Any, name: str, statements: Iterable[Any]) -> None:
    """Run ``statements`` in one transaction on ``conn`` (a psycopg connection) holding the
    advisory lock ``name`` names."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [name])
        for statement in statements:
            conn.execute(statement)
