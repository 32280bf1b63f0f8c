"""Fixtures several integration modules share: the service on the session stack's event store
(one load-decide-save per command), an autocommit connection to its database, and a schema of
the test's own for an event store out of reach of the session's relay and workers, and a database
of the test's own with an application on it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from adapters.bootstrap import event_store_env
from adapters.settings import Settings
from adapters.system import RandomIds, SystemClock
from application.executors import DirectExecutor
from application.services import PaletteApplication, PaletteService
from projections.schema import ensure_schema
from tests.keys import process_keys


@pytest.fixture(scope="module")
def service(settings: Settings) -> Iterator[PaletteService]:
    app = PaletteApplication(env=event_store_env(settings))
    yield PaletteService(app, DirectExecutor(app), SystemClock(), RandomIds(), **process_keys())
    app.close()


@pytest.fixture
def conn(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as c:
        yield c


@pytest.fixture
def schema(settings: Settings) -> Iterator[str]:
    """An empty schema, dropped with all it holds after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(settings.effective_database_url, autocommit=True) as c:
        c.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(settings.effective_database_url, autocommit=True) as c:
        c.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def fresh_db(settings: Settings) -> Iterator[str]:
    """The URL of a database of its own, made empty for the test and dropped after it."""
    name = f"fresh_{uuid.uuid4().hex[:12]}"
    base = settings.effective_database_url
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield urlunsplit(urlsplit(base)._replace(path=f"/{name}"))
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def own_log(settings: Settings, fresh_db: str) -> Iterator[tuple[str, PaletteApplication]]:
    """A database of its own (event log and read models) and an application on it: what the test
    writes, folds or rebuilds there reaches neither the session's log nor its read models."""
    app = PaletteApplication(env=event_store_env(settings.model_copy(update={"database_url": fresh_db}), pool_size=2))
    try:
        with psycopg.connect(fresh_db, autocommit=True) as c:
            ensure_schema(c)
        yield fresh_db, app
    finally:
        app.close()
