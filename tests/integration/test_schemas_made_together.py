"""Processes that start together on a fresh database each make the tables they use, or find
them made: ``palette serve`` has no step before them that does (``palette up`` does), and several
API workers (``PALETTE_API_WORKERS``) run the API's DDL each as they start. ``CREATE ... IF NOT
EXISTS`` side by side fails with a unique violation on PostgreSQL's catalog, and that process
exited at its start."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from adapters import keyring, positions, retention
from adapters.api import idempotency
from adapters.webhooks import store as webhooks

SCHEMAS: list[Callable[[psycopg.Connection[Any]], None]] = [
    idempotency.ensure_schema, keyring.ensure_schema, webhooks.ensure_schema, positions.ensure_schema,
    retention.ensure_schema]


@pytest.mark.parametrize("ensure", SCHEMAS, ids=lambda f: f.__module__.rsplit(".", 1)[-1])
def test_four_starters_on_a_fresh_database_each_make_the_tables_or_find_them(fresh_db: str, ensure: Any) -> None:
    connections = [psycopg.connect(fresh_db, autocommit=True) for _ in range(4)]
    together = threading.Barrier(len(connections))
    failed: list[str] = []

    def start(conn: psycopg.Connection[Any]) -> None:
        together.wait()
        try:
            ensure(conn)
        except psycopg.Error as e:
            failed.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=start, args=(conn,)) for conn in connections]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for conn in connections:
            conn.close()
    assert failed == []
    with psycopg.connect(fresh_db) as conn:  # and every table is there
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
                              "'information_schema')").fetchone()
    assert tables is not None and tables[0] >= 1
