"""A process opening the event store asks eventsourcing to create its tables only when they are
not there (eventsourcing's CREATE TYPE then fails, and PostgreSQL logs an ERROR for it), and then
each type once."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from adapters.bootstrap import event_store_env, open_event_store
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


def _log_after(settings: Settings, opened: Callable[[], None]) -> str:
    """What PostgreSQL logged while ``opened`` ran: its log from the end it had, up to a marker
    raised after it (the marker's arrival, not a wait, says the log holds everything before)."""
    log = Path(settings.data_dir) / "logs" / "postgres.log"
    start = log.stat().st_size
    opened()
    marker = f"marker-{uuid.uuid4().hex}"
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(f"DO $$ BEGIN RAISE WARNING '{marker}'; END $$")
    for _ in range(500):
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        if marker in text:
            return text
        time.sleep(0.01)
    raise AssertionError("the marker never reached PostgreSQL's log")


@pytest.mark.parametrize("type_made_before", [False, True])
def test_a_fresh_store_is_made_without_an_error_in_postgresql_log(settings: Settings, type_made_before: bool) -> None:
    """eventsourcing gives the events and the snapshots one composite type and creates it with
    each; the second's "already exists" was an ERROR in a newcomer's first `make run` log. With
    the type made before (a store from before snapshots), neither recorder may create it."""
    schema = f"fresh{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        if type_made_before:
            conn.execute(f'CREATE TYPE "{schema}".stored_event_uuid AS '
                         "(originator_id uuid, originator_version bigint, topic text, state bytea)")
    try:
        logged = _log_after(settings, lambda: open_event_store(settings, pool_size=1, schema=schema).close())
        assert "ERROR" not in logged, logged
        assert event_store_env(settings, schema=schema)["CREATE_TABLE"] == "n"  # both tables made
        app = open_event_store(settings, pool_size=1, schema=schema)  # and opened again as made
        app.close()
    finally:
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_a_password_with_url_characters_reaches_eventsourcing_as_it_is(tmp_path: Path) -> None:
    from adapters.settings import load_settings

    password = "p@ss w/rd%:?"
    env = event_store_env(load_settings(data_dir=tmp_path, pg_password=password, pg_port=1))
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_PORT"]) == ("palette", password, "1")


def test_opening_the_store_retries_a_catalog_conflict_of_processes_starting_together(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent DDL on PostgreSQL's catalog fails ("tuple concurrently updated"): the other
    process has made the tables by then, and a retry opens the store."""
    from eventsourcing.persistence import InternalError

    import adapters.bootstrap as bootstrap

    real, calls = bootstrap.event_store_env, []

    def conflicting(*args: object, **kwargs: object) -> dict[str, str]:
        calls.append(1)
        if len(calls) <= 2:
            raise InternalError("tuple concurrently updated")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bootstrap, "event_store_env", conflicting)
    open_event_store(settings, pool_size=1).close()
    assert len(calls) == 3


def test_the_event_store_connects_with_every_parameter_its_url_gives(settings: Settings) -> None:
    """eventsourcing's settings name the target alone (host, port, database, user, password): its
    pool connected with libpq's defaults whatever else the URL said, sslmode=prefer where it said
    verify-full, and without the keepalives or client certificate given there."""
    name = f"palette-{uuid.uuid4().hex[:8]}"
    url = f"{settings.effective_database_url}?application_name={name}&tcp_user_timeout=30000"
    app = open_event_store(settings.model_copy(update={"database_url": url}), pool_size=1)
    try:
        for recorder in (app.recorder, app.snapshots.recorder if app.snapshots else None):
            assert recorder is not None
            with recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
                row = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                assert row.fetchone() == {"application_name": name}
                with socket.socket(fileno=os.dup(conn.fileno())) as client:
                    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
    finally:
        app.close()
