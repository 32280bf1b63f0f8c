"""PgStreamVersions' batching and failure handling on one event loop, its database round trip
scripted (the query itself is tested on PostgreSQL in tests/integration/test_current_views_postgres.py):
one query serves every caller that arrived while the one before ran, and whatever a query does
(fails, hangs, is cancelled) every caller gets an answer or VersionUnknown, never a hang."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import pytest

from adapters.pg_streams import PgStreamVersions, _LoopVersions
from application.ports import VersionUnknown

UNKNOWN = VersionUnknown.__name__
NEVER_S = 30.0  # a hang detector, not a speed limit: every answer here comes within milliseconds


def versions(query: Callable[[list[UUID]], Awaitable[dict[UUID, int]]], monkeypatch: pytest.MonkeyPatch,
             **kwargs: Any) -> PgStreamVersions:
    async def scripted(self: _LoopVersions, ids: list[UUID]) -> dict[UUID, int]:
        return await query(ids)

    monkeypatch.setattr(_LoopVersions, "_versions", scripted)
    recorder: Any = SimpleNamespace(datastore=SimpleNamespace(schema="public"), events_table_name="events")
    return PgStreamVersions("postgresql://unused", recorder, **kwargs)


async def answers(calls: list[Awaitable[int]]) -> list[int | str]:
    done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), NEVER_S)
    return [type(r).__name__ if isinstance(r, BaseException) else r for r in done]


def test_callers_arriving_during_a_query_share_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[list[UUID]] = []
    store = {i: n for n, i in enumerate(uuid4() for _ in range(10))}

    async def query(ids: list[UUID]) -> dict[UUID, int]:
        batches.append(ids)
        await asyncio.sleep(0.01)
        return {i: store[i] for i in ids if i in store}

    v = versions(query, monkeypatch, max_batch=4)
    ids = list(store)

    async def script() -> list[int | str]:
        first = asyncio.ensure_future(v.current(ids[0]))
        await asyncio.sleep(0)  # the first query is running
        return await answers([first, *(v.current(i) for i in ids[1:]), v.current(ids[1]), v.current(uuid4())])

    assert asyncio.run(script()) == [*range(10), 1, 0]
    assert [len(b) for b in batches] == [1, 4, 4, 2]  # 9 distinct ids and one unknown after the first, by 4


def test_a_failing_query_fails_every_caller_waiting_and_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    async def query(ids: list[UUID]) -> dict[UUID, int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("not a psycopg error")

    v = versions(query, monkeypatch, max_batch=2, pause_s=60)

    async def script() -> tuple[list[int | str], list[int | str]]:
        first = await answers([v.current(uuid4()) for _ in range(5)])
        return first, await answers([v.current(uuid4())])

    during, paused = asyncio.run(script())
    assert during == [UNKNOWN] * 5 and paused == [UNKNOWN]
    assert calls == 1  # the rest of the queue was failed with it, and the pause asks nothing


def test_a_query_over_its_time_fails_its_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    async def query(ids: list[UUID]) -> dict[UUID, int]:
        await asyncio.sleep(NEVER_S * 2)
        return {}

    v = versions(query, monkeypatch, timeout_s=0.05)
    assert asyncio.run(answers([v.current(uuid4()) for _ in range(3)])) == [UNKNOWN] * 3


def test_close_answers_the_callers_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    async def query(ids: list[UUID]) -> dict[UUID, int]:
        await asyncio.sleep(NEVER_S * 2)
        return {}

    v = versions(query, monkeypatch)

    async def script() -> list[int | str]:
        waiting = [asyncio.ensure_future(v.current(uuid4())) for _ in range(3)]
        await asyncio.sleep(0.01)
        await v.close()
        return await answers(waiting)

    assert asyncio.run(script()) == [UNKNOWN] * 3


def test_each_loop_has_its_own_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second loop (another thread's) neither drops the first one's callers nor answers them."""
    known = uuid4()

    async def query(ids: list[UUID]) -> dict[UUID, int]:
        await asyncio.sleep(0.01)
        return {known: 3}

    v = versions(query, monkeypatch)

    async def other() -> list[int | str]:
        return await answers([v.current(known)])

    async def script() -> tuple[list[int | str], list[int | str]]:
        mine = [asyncio.ensure_future(v.current(known)) for _ in range(2)]
        await asyncio.sleep(0)
        theirs = await asyncio.to_thread(asyncio.run, other())
        return await answers(mine), theirs

    assert asyncio.run(script()) == ([3, 3], [3])
