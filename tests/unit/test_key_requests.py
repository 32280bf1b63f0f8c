"""The keys asked for on one event loop (adapters.keyring.PgKeyring on ``Together``), with a
stand-in for the connection: which users each statement takes, in which order, and what every
caller gets."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import psycopg
import pytest

from adapters.keyring import KEYS_AT_ONCE, PgKeyring
from adapters.loop_pg import LoopConnections, _Connections
from application.personal import KeyDestroyed


class _Statements:
    """A connection that stores what a statement asks to make, as KEYS_FOR would, and records
    the users of each statement."""

    def __init__(self, erased: set[UUID]) -> None:
        self.stored: dict[UUID, bytes] = {}
        self.erased = erased
        self.statements: list[list[UUID]] = []
        self.closed = False
        self.broken = False
        self.info = SimpleNamespace(transaction_status=psycopg.pq.TransactionStatus.IDLE)
        self._rows: list[tuple[UUID, bytes]] = []
        self.arriving: list[Any] = []  # callbacks run while a statement is under way

    async def execute(self, _query: str, params: Any) -> _Statements:
        user_ids = params["u"] if isinstance(params, dict) else params[0]
        if isinstance(params, dict):
            self.statements.append(list(user_ids))
            for u, w in zip(user_ids, params["w"], strict=True):
                if u not in self.erased:
                    self.stored.setdefault(u, w)
            if self.arriving:
                self.arriving.pop(0)()
            await asyncio.sleep(0)
        self._rows = [(u, self.stored[u]) for u in user_ids if u in self.stored]
        return self

    async def fetchall(self) -> list[tuple[UUID, bytes]]:
        return self._rows

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def keyring(monkeypatch: pytest.MonkeyPatch) -> tuple[PgKeyring, _Statements]:
    conn = _Statements(erased=set())

    async def connect(self: _Connections) -> _Statements:
        return conn

    monkeypatch.setattr(_Connections, "_connect", connect)
    ring = PgKeyring(None, "a-development-secret-of-some-length", LoopConnections("postgresql://unused", size=1))
    return ring, conn


def test_each_statement_takes_its_users_in_id_order_once_and_answers_each_caller(
        keyring: tuple[PgKeyring, _Statements]) -> None:
    ring, conn = keyring
    users = [UUID(int=n) for n in (5, 3, 9, 3, 1)]
    conn.erased.add(UUID(int=9))

    async def scenario() -> list[Any]:
        return list(await asyncio.gather(*(ring.key_for_async(u) for u in users), return_exceptions=True))

    got = asyncio.run(scenario())
    assert conn.statements == [[UUID(int=1), UUID(int=3), UUID(int=5), UUID(int=9)]]  # one lock order, each once
    assert isinstance(got[2], KeyDestroyed)
    assert got[1] == got[3] and len({got[0], got[1], got[4]}) == 3
    assert [got[i] for i in (0, 1, 4)] == [ring._unwrap(u, conn.stored[u]) for u in (users[0], users[1], users[4])]


def test_a_key_asked_for_first_is_made_first_however_many_smaller_ids_keep_arriving(
        keyring: tuple[PgKeyring, _Statements]) -> None:
    """More than a statement's worth of asks arriving while each statement runs (an overload, or
    a client registering devices as fast as it can) delays every ask by its place in the queue,
    not by its user id: the largest id is not left waiting until the arrivals stop."""
    ring, conn = keyring
    largest = UUID(int=2**128 - 1)
    smaller = iter(range(1, 10**6))
    asks: list[asyncio.Future[bytes]] = []

    def ask_many() -> None:
        asks.extend(asyncio.ensure_future(ring.key_for_async(UUID(int=next(smaller)))) for _ in range(KEYS_AT_ONCE))

    async def scenario() -> bytes:
        conn.arriving = [ask_many, ask_many, ask_many]  # they arrive while the first three statements run
        first = asyncio.ensure_future(ring.key_for_async(largest))
        ask_many()
        key = await first
        await asyncio.gather(*asks)
        return key

    assert asyncio.run(scenario()) == ring._unwrap(largest, conn.stored[largest])
    assert largest in conn.statements[0]
    assert all(ids == sorted(ids) and len(ids) <= KEYS_AT_ONCE for ids in conn.statements)
    assert sum(map(len, conn.statements)) == 4 * KEYS_AT_ONCE + 1  # each made once
