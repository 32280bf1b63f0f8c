"""An event loop's own PostgreSQL connections (adapters.loop_pg) on the real database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

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


async def _running(watcher: psycopg.AsyncConnection[Any], pid: int, statement: str) -> bool:
    """Whether the server process ``pid`` is running ``statement`` now."""
    row = await (await watcher.execute("SELECT state = 'active' AND query = %s FROM pg_stat_activity WHERE pid = %s",
                                       [statement, pid])).fetchone()
    return bool(row and row[0])


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
        # Both slots taken as a block takes them: a block held past timeout_s is ended by it too,
        # and two held in this task raced the wait below (CancelledError, seen once in CI).
        here = connections._here()
        one, two = await here.take(), await here.take()
        assert one is not two
        with pytest.raises(PoolTimeout):
            await _pid(connections)
        freed = asyncio.create_task(_pid(connections))  # waits for a slot...
        await asyncio.sleep(0)
        await here.give(one)  # ...which this frees
        assert await freed == one.info.backend_pid
        await here.give(two)
        await connections.close()

    asyncio.run(scenario())


def test_a_caller_cancelled_mid_statement_frees_its_slot_and_its_connection_goes(settings: Settings) -> None:
    # timeout_s past the statement's 30 s: the cancel is the test's, never the block's bound
    connections = LoopConnections(settings.effective_database_url, size=1, timeout_s=60)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        before = await _pid(connections)

        async def sleeper() -> None:
            async with connections.connection() as conn:
                await conn.execute("SELECT pg_sleep(30)")

        task = asyncio.create_task(sleeper())
        # Cancelled once its statement runs on the server, not after a guessed pause.
        async with await psycopg.AsyncConnection.connect(settings.effective_database_url, autocommit=True) as watcher:
            deadline = loop.time() + 10
            while not await _running(watcher, before, "SELECT pg_sleep(30)"):
                assert loop.time() < deadline, "the statement never started"
                await asyncio.sleep(0.01)
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


def test_a_connection_left_inside_a_transaction_is_not_handed_to_the_next_caller(settings: Settings) -> None:
    connections = LoopConnections(settings.effective_database_url, size=1)

    async def scenario() -> None:
        async with connections.connection() as conn:
            await conn.execute("BEGIN")
            left = conn.info.backend_pid
        async with connections.connection() as conn:
            assert conn.info.backend_pid != left
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        await connections.close()

    asyncio.run(scenario())


def test_a_connection_in_use_when_its_loops_connections_close_is_closed_when_its_block_ends(
        settings: Settings) -> None:
    connections = LoopConnections(settings.effective_database_url)

    async def scenario() -> psycopg.AsyncConnection[Any]:
        async with connections.connection() as conn:
            await connections.close()
        return conn

    assert asyncio.run(scenario()).closed


def test_a_failed_connect_gives_its_slot_back(settings: Settings) -> None:
    """The database unreachable for a while (a restart): once it answers, the loop's requests get
    connections again, not PoolTimeout for every slot a failed connect once took."""
    connections = LoopConnections(settings.effective_database_url, size=1, timeout_s=1)
    reachable = connections.conninfo
    connections.conninfo = psycopg.conninfo.make_conninfo(reachable, dbname="palette_no_such_database")

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(psycopg.OperationalError):
                await _pid(connections)
        connections.conninfo = reachable
        assert await _pid(connections) > 0
        await connections.close()

    asyncio.run(scenario())


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


@contextlib.contextmanager
def _keyring(settings: Settings, size: int = 4) -> Iterator[tuple[Any, LoopConnections]]:
    from psycopg_pool import ConnectionPool

    from adapters.keyring import PgKeyring
    from adapters.keyring import ensure_schema as ensure_keyring

    with ConnectionPool(settings.effective_database_url, min_size=1, max_size=2,
                        kwargs={"autocommit": True}) as pool:
        with pool.connection() as conn:
            ensure_keyring(conn)
        connections = LoopConnections(settings.effective_database_url, size=size)
        yield PgKeyring(pool, settings.device_key_secret, connections), connections


def test_keys_asked_for_while_none_is_being_made_are_made_by_one_statement(settings: Settings) -> None:
    """Registrations at once share a round trip; each still gets its own key (the one stored, read
    back on the blocking path), an erased user among them KeyDestroyed and nobody else."""
    import uuid

    from application.personal import KeyDestroyed

    with _keyring(settings) as (keyring, connections):
        users = [uuid.uuid4() for _ in range(60)]
        erased = uuid.uuid4()
        keyring.destroy(erased)
        statements: list[int] = []
        make = keyring._made_together.run

        async def counted(user_ids: list[uuid.UUID]) -> list[bytes | None]:
            statements.append(len(set(user_ids)))
            return await make(user_ids)

        keyring._made_together.run = counted

        async def scenario() -> list[Any]:
            asks = [*users, erased, *users[:10]]  # some asked twice at once
            got = await asyncio.gather(*(keyring.key_for_async(u) for u in asks), return_exceptions=True)
            await connections.close()
            return got

        got = asyncio.run(scenario())
        assert statements == [61]
        assert isinstance(got[60], KeyDestroyed)
        assert got[:60] == [keyring.key(u) for u in users] and got[61:] == got[:10]
        assert len(set(got[:60])) == 60


def test_a_caller_that_goes_away_takes_no_other_callers_key_with_it(settings: Settings) -> None:
    import uuid

    with _keyring(settings) as (keyring, connections):
        users = [uuid.uuid4() for _ in range(3)]

        async def scenario() -> list[Any]:
            asks = [asyncio.ensure_future(keyring.key_for_async(u)) for u in users]
            await asyncio.sleep(0)  # every ask is waiting on the statement
            asks[0].cancel()
            got = await asyncio.gather(*asks, return_exceptions=True)
            await connections.close()
            return got

        got = asyncio.run(scenario())
        assert isinstance(got[0], asyncio.CancelledError)
        assert got[1:] == [keyring.key(u) for u in users[1:]]
        assert keyring.key(users[0]) is not None  # made all the same, for the next ask


def test_two_loops_making_the_same_keys_in_opposite_orders_agree(settings: Settings) -> None:
    """Two API processes registering the same devices at once (retries): the statements take their
    rows in user id order, so neither waits on the other in a cycle, and both get the stored keys."""
    import threading
    import uuid

    users = [uuid.uuid4() for _ in range(200)]
    results: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)
    with _keyring(settings) as (keyring, _):
        def run(n: int) -> None:
            async def asks() -> list[bytes]:
                order = users if n == 0 else users[::-1]
                return list(await asyncio.gather(*(keyring.key_for_async(u) for u in order)))

            try:
                start.wait()
                got = asyncio.run(asks())
                results[n] = got if n == 0 else got[::-1]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(n,)) for n in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert results[0] == results[1] == [keyring.key(u) for u in users]


def _wait_for_a_key_statement_to_wait(watch: psycopg.Connection[Any], failure: str) -> None:
    """Until one keyring statement (KEY_FOR or KEYS_FOR) waits on a row lock (10 s at most)."""
    import time

    deadline = time.monotonic() + 10
    while watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE %s", ["WITH %palette_user_keys%"]).fetchone() != (1,):
        assert time.monotonic() < deadline, failure


@pytest.mark.parametrize("on_the_loop", [True, False])
def test_a_key_asked_for_while_an_erasure_destroys_it_is_not_made_again(settings: Settings, on_the_loop: bool) -> None:
    """A registration of a user whose erasure is destroying the key (its transaction holds the
    deleted row): the statement waits for the erasure, and once it commits, inserts anew (its
    snapshot saw neither the tombstone nor the delete). The key made so is undone: the caller gets
    KeyDestroyed and the erased user has no key stored."""
    import threading
    import uuid

    from adapters.keyring import request_erasure
    from application.personal import KeyDestroyed

    with _keyring(settings) as (keyring, connections):
        user = uuid.uuid4()
        keyring.key_for(user)
        got: list[Any] = []

        def ask() -> None:
            async def on_loop() -> bytes:
                try:
                    return await keyring.key_for_async(user)
                finally:
                    await connections.close()

            try:
                got.append(asyncio.run(on_loop()) if on_the_loop else keyring.key_for(user))
            except KeyDestroyed as e:
                got.append(e)

        with psycopg.connect(settings.effective_database_url) as erasure, \
                psycopg.connect(settings.effective_database_url, autocommit=True) as watch:
            request_erasure(erasure, user)
            erasure.execute("DELETE FROM palette_user_keys WHERE user_id = %s", [user])  # as destroy does
            asking = threading.Thread(target=ask)
            asking.start()
            _wait_for_a_key_statement_to_wait(watch, "the registration never waited on the erasure")
            erasure.commit()
            asking.join()
        assert [type(g) for g in got] == [KeyDestroyed]
        assert keyring.key(user) is None


def test_a_key_another_process_makes_while_the_statement_waits_is_the_one_handed_out(settings: Settings) -> None:
    """Another process's statement has made a user's key, not committed yet: the loop's statement
    waits on it and then makes nothing for that user, and its snapshot, older than that commit,
    does not see the key: it is read again, never taken for an erasure (KeyDestroyed)."""
    import threading
    import uuid

    with _keyring(settings) as (keyring, connections):
        made_elsewhere, mine = sorted([uuid.uuid4(), uuid.uuid4()])
        wrapped = keyring._candidate(made_elsewhere)
        got: list[Any] = []

        def ask() -> None:
            async def on_loop() -> list[bytes]:
                try:
                    return list(await asyncio.gather(*(keyring.key_for_async(u) for u in (made_elsewhere, mine))))
                finally:
                    await connections.close()

            got.extend(asyncio.run(on_loop()))

        with psycopg.connect(settings.effective_database_url) as other, \
                psycopg.connect(settings.effective_database_url, autocommit=True) as watch:
            other.execute("INSERT INTO palette_user_keys (user_id, wrapped) VALUES (%s, %s)", [made_elsewhere, wrapped])
            asking = threading.Thread(target=ask)
            asking.start()
            _wait_for_a_key_statement_to_wait(watch, "the loop's statement never waited on the other one")
            other.commit()
            asking.join()
        assert got == [keyring._unwrap(made_elsewhere, wrapped), keyring.key(mine)]


def test_a_stored_key_that_does_not_open_fails_its_own_registration_only(settings: Settings) -> None:
    """A row wrapped under another key-encryption key (another secret, a damaged row) fails the
    registrations of its user, not those of every user whose key the same statement made."""
    import uuid

    from cryptography.exceptions import InvalidTag

    from adapters.keyring import PgKeyring

    with _keyring(settings) as (keyring, connections):
        foreign = uuid.uuid4()
        PgKeyring(keyring.pool, "another-secret-of-some-length-entirely").key_for(foreign)
        others = [uuid.uuid4() for _ in range(10)]

        async def scenario() -> list[Any]:
            try:
                return list(await asyncio.gather(*(keyring.key_for_async(u) for u in (foreign, *others)),
                                                 return_exceptions=True))
            finally:
                await connections.close()

        got = asyncio.run(scenario())
        assert isinstance(got[0], InvalidTag)
        assert got[1:] == [keyring.key(u) for u in others]
