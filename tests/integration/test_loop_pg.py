"""An event loop's own PostgreSQL connections (adapters.loop_pg) on the real database."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from adapters.loop_pg import LoopConnections
from adapters.settings import Settings


async def _pid(connections: LoopConnections) -> int:
    async with connections.connection() as conn:
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        return int(row[0])


def test_a_connection_is_kept_for_the_next_use_and_one_whose_statement_failed_is_not(settings: Settings) -> None:
    connections = LoopConnections(settings.effective_database_url, size=1)

    async def scenario() -> None:
        first = await _pid(connections)
        assert await _pid(connections) == first
        for _ in range(3):  # each failure gives its slot back: size 1 would otherwise wait forever
            with pytest.raises(psycopg.errors.DivisionByZero):
                async with connections.connection() as conn:
                    await conn.execute("SELECT 1 / 0")
        assert await _pid(connections) != first
        await connections.close()

    asyncio.run(scenario())


def test_at_most_size_connections_are_open_and_a_caller_waits_only_until_the_timeout(settings: Settings) -> None:
    connections = LoopConnections(settings.effective_database_url, size=2, timeout_s=0.3)

    async def scenario() -> None:
        held = contextlib.AsyncExitStack()
        one = await held.enter_async_context(connections.connection())
        two = await held.enter_async_context(connections.connection())
        assert one is not two
        with pytest.raises(PoolTimeout):
            await _pid(connections)
        freed = asyncio.create_task(_pid(connections))  # waits for a slot...
        await asyncio.sleep(0)
        await held.aclose()  # ...which this frees
        assert await freed in {one.info.backend_pid, two.info.backend_pid}
        await connections.close()

    asyncio.run(scenario())


def test_a_caller_cancelled_mid_statement_frees_its_slot_and_its_connection_goes(settings: Settings) -> None:
    connections = LoopConnections(settings.effective_database_url, size=1, timeout_s=5)

    async def scenario() -> None:
        before = await _pid(connections)

        async def sleeper() -> None:
            async with connections.connection() as conn:
                await conn.execute("SELECT pg_sleep(30)")

        task = asyncio.create_task(sleeper())
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        after = await asyncio.wait_for(_pid(connections), 5)  # not behind the sleeping statement
        assert after != before
        await connections.close()

    asyncio.run(scenario())


def test_unflushed_connections_commit_without_waiting_for_the_flush(settings: Settings) -> None:
    async def setting(flushed: bool) -> str:
        connections = LoopConnections(settings.effective_database_url, flushed=flushed)
        try:
            async with connections.connection() as conn:
                row = await (await conn.execute("SHOW synchronous_commit")).fetchone()
                assert row is not None
                return str(row[0])
        finally:
            await connections.close()

    assert asyncio.run(setting(flushed=False)) == "off"
    assert asyncio.run(setting(flushed=True)) == "on"


def test_each_event_loop_has_connections_of_its_own_and_an_ended_loops_are_closed(settings: Settings) -> None:
    import time

    connections = LoopConnections(settings.effective_database_url, size=1)
    first = asyncio.run(_pid(connections))  # that loop closes with its connection still idle
    second = asyncio.run(_pid(connections))  # a new loop never touches the old loop's connection...
    assert second != first
    assert len(connections._by_loop) == 1
    with psycopg.connect(settings.effective_database_url, autocommit=True) as watcher:
        deadline, alive = time.monotonic() + 10, True
        while alive and time.monotonic() < deadline:  # ...but closes it (its server process ends)
            alive = watcher.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [first]).fetchone() is not None
        assert not alive


def test_keys_made_on_the_loop_are_the_keyrings_even_made_at_once_and_never_for_an_erased_user(
    settings: Settings,
) -> None:
    import uuid

    from psycopg_pool import ConnectionPool

    from adapters.keyring import PgKeyring
    from adapters.keyring import ensure_schema as ensure_keyring
    from application.personal import KeyDestroyed

    with ConnectionPool(settings.effective_database_url, min_size=2, max_size=2,
                        kwargs={"autocommit": True}) as pool:
        with pool.connection() as conn:
            ensure_keyring(conn)
        connections = LoopConnections(settings.effective_database_url, size=4)
        keyring = PgKeyring(pool, settings.device_key_secret, connections)
        users = [uuid.uuid4() for _ in range(20)]
        erased = uuid.uuid4()
        keyring.destroy(erased)

        async def scenario() -> list[set[bytes]]:
            made = [set(await asyncio.gather(*(keyring.key_for_async(u) for _ in range(4)))) for u in users]
            with pytest.raises(KeyDestroyed):
                await keyring.key_for_async(erased)
            await connections.close()
            return made

        made = asyncio.run(scenario())
        assert all(len(keys) == 1 for keys in made)  # four makers at once agree on one key
        assert [keyring.key(u) for u in users] == [keys.pop() for keys in made]  # the stored one, read back
