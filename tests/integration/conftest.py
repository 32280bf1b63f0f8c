"""Fixtures several integration modules share: the service on the session stack's event store
(one load-decide-save per command) and an autocommit connection to its database."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from adapters.bootstrap import event_store_env
from adapters.settings import Settings
from adapters.system import RandomIds, SystemClock
from application.executors import DirectExecutor
from application.services import PaletteApplication, PaletteService
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
