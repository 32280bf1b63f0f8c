"""A process opening the event store asks eventsourcing to create its tables only when they are
not there (eventsourcing's CREATE TYPE then fails, and PostgreSQL logs an ERROR for it)."""

from __future__ import annotations

import uuid

import psycopg

from adapters.bootstrap import event_store_env
from adapters.settings import Settings
from application.services import PaletteApplication


def test_tables_are_created_once_in_a_schema_whose_name_needs_quoting(settings: Settings) -> None:
    schema = f"Store{uuid.uuid4().hex[:8]}"  # upper case: folded to lower unless quoted
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        assert "CREATE_TABLE" not in event_store_env(settings, schema=schema)  # empty: created
        PaletteApplication(env=event_store_env(settings, pool_size=1, schema=schema)).close()
        assert event_store_env(settings, schema=schema)["CREATE_TABLE"] == "n"
    finally:
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
