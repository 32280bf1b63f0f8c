"""/me's kept views on the real event store: PgStreamVersions answers each stream's version as
the aggregates know it, batched, and a write by another process (another service on the same
store) is seen by the next read, never hidden by the kept view."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import psycopg
import pytest

from adapters.bootstrap import event_store_env
from adapters.pg_streams import PgStreamVersions, pg_stream_loader, pg_stream_versions
from adapters.settings import Settings
from adapters.system import RandomIds, SystemClock
from application.executors import GroupCommitter
from application.ports import VersionUnknown
from application.services import PaletteApplication, PaletteService
from tests.keys import process_keys


@pytest.fixture
def grouped(settings: Settings) -> Iterator[PaletteService]:
    """A service as the API builds it: group committer, versions on a connection of its own."""
    app = PaletteApplication(env=event_store_env(settings))
    committer = GroupCommitter(app, pg_stream_loader(app)).start()
    yield PaletteService(app, committer, SystemClock(), RandomIds(),
                         versions=pg_stream_versions(app, settings.effective_database_url), **process_keys())
    committer.stop()
    app.close()


def test_versions_are_the_aggregates_own_batched_and_zero_for_no_stream(
        service: PaletteService, grouped: PaletteService) -> None:
    users = [service.register(f"versions-{uuid4()}").value[0] for _ in range(5)]
    for n, user_id in enumerate(users):
        for _ in range(n):
            service.grant_credits(user_id, 1, "test")
    expected = {u: service.app.repository.get(u).version for u in users}
    nobody = uuid4()
    versions = grouped.user_views.versions if grouped.user_views is not None else None
    assert versions is not None

    async def ask() -> list[int]:
        try:
            return await asyncio.gather(*(versions.current(u) for u in [*users, nobody] * 20))
        finally:
            await versions.close()

    answers = asyncio.run(ask())
    assert answers == [*(expected[u] for u in users), 0] * 20
    assert len(set(expected.values())) == 5  # the streams really differ


def test_a_write_by_another_process_is_seen_by_the_next_read(service: PaletteService,
                                                              grouped: PaletteService) -> None:
    user_id = grouped.register(f"views-{uuid4()}").value[0]
    views = grouped.user_views
    assert views is not None

    async def script() -> list[int]:
        try:
            seen = [(await grouped.get_user_async(user_id)).granted]
            seen.append((await grouped.get_user_async(user_id)).granted)  # unchanged: the kept view
            service.grant_credits(user_id, 7, "another process")  # not through this committer
            seen.append((await grouped.get_user_async(user_id)).granted)
            seen.append((await grouped.get_user_async(user_id)).granted)
            return seen
        finally:
            await views.versions.close()

    first, kept, after, again = asyncio.run(script())
    granted = service.get_user(user_id).granted
    assert first == kept == granted - 7 and after == again == granted
    assert views.hits == 2 and views.misses == 2


def test_a_store_it_cannot_reach_fails_fast_with_version_unknown(grouped: PaletteService) -> None:
    recorder = grouped.app.recorder
    versions = PgStreamVersions("postgresql://nobody@127.0.0.1:9/none?connect_timeout=2", recorder)  # type: ignore[arg-type]

    async def ask() -> None:
        await asyncio.gather(*(versions.current(uuid4()) for _ in range(3)))

    with pytest.raises(VersionUnknown):
        asyncio.run(ask())


def test_a_dropped_versions_connection_costs_one_read_through_then_reconnects(
        grouped: PaletteService, conn: psycopg.Connection[Any]) -> None:
    user_id = grouped.register(f"views-drop-{uuid4()}").value[0]
    views = grouped.user_views
    assert views is not None and isinstance(views.versions, PgStreamVersions)
    versions = views.versions
    versions.pause_s = 0  # no pause after the failure: the next read may ask again at once

    async def script() -> list[int]:
        try:
            credits = [(await grouped.get_user_async(user_id)).credits]
            credits.append((await grouped.get_user_async(user_id)).credits)  # kept: its connection is open
            backend = versions.backend_pid
            assert backend is not None
            conn.execute("SELECT pg_terminate_backend(%s)", [backend])
            credits.append((await grouped.get_user_async(user_id)).credits)  # the query fails: read through
            credits.append((await grouped.get_user_async(user_id)).credits)  # a new connection: kept again
            assert versions.backend_pid not in (None, backend)
            return credits
        finally:
            await versions.close()

    assert asyncio.run(script()) == [grouped.get_user(user_id).credits] * 4
    assert (views.hits, views.misses) == (2, 2)
