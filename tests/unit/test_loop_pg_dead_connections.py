"""LoopConnections after PostgreSQL restarted: every idle connection died with the server. Seen
live (``pg_ctl stop -m immediate`` under ``palette up``, the API left running): each of a loop's
idle connections failed the next request that took it (a 500 ``INTERNAL`` each, from the keyring's
``key_for_async`` on ``POST /auth/anon``), long after the server was back. A connection found
broken drops the loop's idle ones with it, so only the request that found it fails."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from adapters.loop_pg import LoopConnections, _Connections


class _Conn:
    def __init__(self, n: int) -> None:
        self.n = n
        self.dead = False  # its server went away
        self.closed = False
        self.info = SimpleNamespace(transaction_status=psycopg.pq.TransactionStatus.IDLE)

    @property
    def broken(self) -> bool:
        return self.dead

    rows: list[Any] = []  # what a statement answers

    async def execute(self, *_: Any) -> _Conn:
        if self.dead:
            self.closed = True
            raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
        return self

    async def fetchall(self) -> list[Any]:
        return self.rows

    async def close(self) -> None:
        self.closed = True


def test_a_broken_connection_takes_the_loops_idle_ones_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[_Conn] = []

    async def connect(self: _Connections) -> _Conn:
        made.append(_Conn(len(made)))
        return made[-1]

    monkeypatch.setattr(_Connections, "_connect", connect)
    pool = LoopConnections("postgresql://unused", size=4)

    async def use() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            await asyncio.sleep(0)

    async def scenario() -> list[str]:
        await asyncio.gather(*(use() for _ in range(4)))  # four connections, idle now
        for conn in made:
            conn.dead = True  # the server restarted
        outcomes = []
        for _ in range(4):
            try:
                await use()
                outcomes.append("ok")
            except psycopg.OperationalError:
                outcomes.append("500")
        return outcomes

    assert asyncio.run(scenario()) == ["500", "ok", "ok", "ok"]


def test_the_first_registration_after_a_restart_gets_its_key_on_a_fresh_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The keyring's statement (made-if-absent, then read: idempotent) runs once more when its
    connection turns out dead, so the request that finds the restart does not fail either."""
    import uuid

    from adapters.keyring import PgKeyring

    keyring = PgKeyring(None, "a-development-secret-of-some-length")
    user_id = uuid.uuid4()
    key = b"k" * 32
    made: list[_Conn] = []

    async def connect(self: _Connections) -> _Conn:
        made.append(_Conn(len(made)))
        made[-1].rows = [(user_id, keyring._wrap(user_id, key))]
        return made[-1]

    monkeypatch.setattr(_Connections, "_connect", connect)
    keyring.connections = LoopConnections("postgresql://unused", size=2)

    async def scenario() -> bytes:
        await keyring.key_for_async(user_id)  # a connection, idle now
        made[0].dead = True  # the server restarted
        return await keyring.key_for_async(user_id)

    assert asyncio.run(scenario()) == key


def test_a_busy_pool_is_not_waited_for_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """PoolTimeout is an OperationalError, but every connection busy is no dead connection:
    waiting ``timeout_s`` once more doubled the request's wait (20 s, not 10 s)."""
    import uuid

    from psycopg_pool import PoolTimeout

    from adapters.keyring import PgKeyring

    async def connect(self: _Connections) -> _Conn:
        return _Conn(0)

    monkeypatch.setattr(_Connections, "_connect", connect)
    keyring = PgKeyring(None, "a-development-secret-of-some-length")
    keyring.connections = LoopConnections("postgresql://unused", size=1, timeout_s=0.05)
    waits: list[int] = []
    take = _Connections.take

    async def counted_take(self: _Connections) -> Any:
        waits.append(1)
        return await take(self)

    async def scenario() -> None:
        here = keyring.connections._here()  # type: ignore[union-attr]
        held = await here.take()  # the pool's one connection is taken (a block would be bounded)
        monkeypatch.setattr(_Connections, "take", counted_take)
        with pytest.raises(PoolTimeout):
            await keyring.key_for_async(uuid.uuid4())
        await here.give(held)

    asyncio.run(scenario())
    assert waits == [1]  # one wait for a connection, not a second after the first ran out


def test_a_database_that_cannot_be_connected_to_is_not_waited_for_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect that fails (the database down; blackholed: ``timeout_s`` each) is no dead pooled
    connection either: connecting once more doubled the wait."""
    import uuid

    from adapters.keyring import PgKeyring

    connects: list[int] = []

    async def connect(self: _Connections) -> _Conn:
        connects.append(1)
        raise psycopg.OperationalError("connection timeout expired")

    monkeypatch.setattr(_Connections, "_connect", connect)
    keyring = PgKeyring(None, "a-development-secret-of-some-length")
    keyring.connections = LoopConnections("postgresql://unused", size=2)
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(keyring.key_for_async(uuid.uuid4()))
    assert connects == [1]
