"""A database that stops answering without closing its connections (PostgreSQL stopped with
SIGSTOP, a stalled disk, a network dropping packets) held the group committer's writer in its
statement, and every request waiting on the writer with it, and a statement on an event loop's
own connections (a keyed POST's Idempotency-Key claim): seen live, GET /me, GET /jobs/{id},
POST /jobs and confirm-upload had no answer after 140 s of a frozen PostgreSQL under `palette up`.
Real PostgreSQL behind a proxy that freezes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from eventsourcing.persistence import OperationalError
from psycopg_pool import PoolTimeout

from adapters.bootstrap import event_store_env
from adapters.loop_pg import LoopConnections
from adapters.pg_streams import insert_in_one_round_trip, pg_stream_loader
from adapters.settings import Settings
from adapters.system import RandomIds, SystemClock
from application.executors import GroupCommitter
from application.services import PaletteApplication, PaletteService
from domain.user import User
from tests.frozen_pg import FreezingProxy, freezing_proxy
from tests.keys import process_keys
from tests.waiting import wait_until

BOUND_S = 1.0  # the callers' bound in these tests (the API's is ANSWER_WITHIN_S)


@pytest.fixture
def proxy(settings: Settings) -> Iterator[FreezingProxy]:
    with freezing_proxy(settings.pg_port) as p:
        yield p


@pytest.fixture
def clock() -> list[float]:
    return [0.0]


@pytest.fixture
def committer(settings: Settings, schema: str, proxy: FreezingProxy, clock: list[float]) -> Iterator[GroupCommitter]:
    app = PaletteApplication(env={**event_store_env(settings, schema=schema), "POSTGRES_PORT": str(proxy.port)})
    assert insert_in_one_round_trip(app)
    runs = GroupCommitter(app, pg_stream_loader(app), monotonic=lambda: clock[0]).start()
    runs.answer_within_s = BOUND_S
    yield runs
    proxy.thaw()
    runs.stop()
    app.close()


def _balance(user: Any) -> int:
    assert isinstance(user, User)
    return user.balance


def _stored_balance(settings: Settings, schema: str, user_id: Any) -> int:
    """The user's balance as the store holds it, read past the proxy."""
    app = PaletteApplication(env=event_store_env(settings, schema=schema))
    try:
        return _balance(app.repository.get(user_id))
    finally:
        app.close()


def _answered_within(call: Any, limit_s: float) -> tuple[Any, float]:
    """What ``call()`` answered (or raised), and how long it took; the test's own guard past
    ``limit_s`` raises TimeoutError."""
    async def timed() -> tuple[Any, float]:
        started = time.monotonic()
        try:
            answer = await asyncio.wait_for(call(), limit_s)
        except OperationalError as e:
            answer = e
        return answer, time.monotonic() - started
    return asyncio.run(timed())


def test_a_read_waits_for_a_frozen_database_only_as_long_as_its_bound(committer, proxy, settings, schema):
    service = PaletteService(committer.app, committer, SystemClock(), RandomIds(), **process_keys())
    user_id = service.register("a-device").value[0]
    service.grant_credits(user_id, 3, "support")
    committer.cache.evict([user_id])  # its next read loads it from the database
    proxy.freeze()
    answer, took = _answered_within(lambda: committer.read_async(user_id, _balance), 30)
    assert isinstance(answer, OperationalError) and took < BOUND_S + 2
    proxy.thaw()
    answer, _ = _answered_within(lambda: committer.read_async(user_id, _balance), 30)
    assert answer == _stored_balance(settings, schema, user_id)  # the writer recovered


def test_a_command_whose_caller_gave_up_is_not_saved_once_the_database_thaws(committer, proxy, clock, settings,
                                                                             schema):
    service = PaletteService(committer.app, committer, SystemClock(), RandomIds(), **process_keys())
    user_id = service.register("a-device").value[0]
    before = _stored_balance(settings, schema, user_id)
    committer.cache.evict([user_id])
    proxy.freeze()
    held = _answered_within(lambda: committer.read_async(user_id, _balance), 30)[0]  # holds the writer
    grant = _answered_within(lambda: service.run(service.grant_credits_command(user_id, 5, "support")), 30)[0]
    assert isinstance(held, OperationalError) and isinstance(grant, OperationalError)
    clock[0] += 60  # the database stayed frozen a minute
    proxy.thaw()
    assert service.grant_credits(user_id, 1, "after").value == before + 1  # the grant refused, not saved late
    assert _stored_balance(settings, schema, user_id) == before + 1


def test_a_statement_on_the_loops_own_connection_ends_within_its_bound(settings, proxy):
    url = settings.effective_database_url.replace(f":{settings.pg_port}/", f":{proxy.port}/")
    connections = LoopConnections(url, timeout_s=BOUND_S)

    async def scenario() -> tuple[float, Any]:
        async with connections.connection() as conn:
            await conn.execute("SELECT 1")  # one idle connection now, taken by the next block
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            async with connections.connection() as conn:
                await conn.execute("SELECT 1")
        took = time.monotonic() - started
        proxy.thaw()
        async with connections.connection() as conn:
            row = await (await conn.execute("SELECT 2")).fetchone()
        await connections.close()
        return took, row

    took, row = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert took < BOUND_S + 12  # psycopg tries to cancel the statement for up to 10 s
    assert row == (2,)


def test_a_read_of_the_read_models_waits_for_a_frozen_database_only_as_long_as_the_writers_bound(settings, proxy):
    """The read models' pool (GET /jobs, /rules, the ledger) waited its library's 30 s for a
    connection, and a new connection to a frozen server without end: with each one held by a
    statement the server never answers, the next read answered 503 only after 30 s."""
    import threading

    from adapters.bootstrap import read_pool
    from application.executors import ANSWER_WITHIN_S

    url = settings.effective_database_url.replace(f":{settings.pg_port}/", f":{proxy.port}/")
    pool = read_pool(url, size=1)
    try:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        proxy.freeze()
        holding = threading.Thread(target=_read, args=(pool,), daemon=True)  # answered after the thaw
        holding.start()  # takes the one connection into a statement that is not answered
        wait_until(lambda: pool.get_stats()["pool_available"] == 0, 10, "the connection taken")
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            _read(pool)
        assert time.monotonic() - started < ANSWER_WITHIN_S + 2
    finally:
        proxy.thaw()
        holding.join(timeout=30)
        pool.close()


def _read(pool: Any) -> Any:
    with pool.connection() as conn:
        return conn.execute("SELECT 1").fetchone()
