"""Seen callback signatures: a replay inside the window is refused, and rows past two windows are
pruned on a clock, not by chance."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from adapters.api.callback_signatures import KEEP_S, PRUNE_EVERY_S, CallbackSignatures
from adapters.api.idempotency import ensure_schema, unflushed
from adapters.settings import Settings


class StoppedClock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def url(settings: Settings) -> str:
    """The database's URL, with the API's tables made."""
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        ensure_schema(conn)
    return settings.effective_database_url


def test_rows_past_two_windows_go_with_the_first_fresh_signature_once_the_interval_has_passed(url: str) -> None:

    def seen_ago(seconds: float, count: int = 1) -> list[str]:
        names = [f"test-{uuid.uuid4().hex}" for _ in range(count)]
        with psycopg.connect(url, autocommit=True) as conn:
            for name in names:
                conn.execute("INSERT INTO palette_api.callback_signatures (signature, seen_at) "
                             "VALUES (%s, now() - make_interval(secs => %s))", [name, seconds])
        return names

    def held(names: list[str]) -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM palette_api.callback_signatures WHERE signature = ANY(%s)",
                               [names]).fetchone()
        return int(row[0]) if row else 0

    async def scenario() -> None:
        clock = StoppedClock()
        signatures = CallbackSignatures(unflushed(url), batch=2, clock=clock)  # 2: several statements
        try:
            stale, young = seen_ago(KEEP_S + 1, count=5), seen_ago(KEEP_S - 60)
            first = f"test-{uuid.uuid4().hex}"
            assert await signatures.first_use(first)  # the first fresh one prunes what was left before
            assert signatures.pruning is not None and await signatures.pruning >= len(stale)
            assert (held(stale), held(young), held([first])) == (0, 1, 1)
            late = seen_ago(KEEP_S + 1)
            assert not await signatures.first_use(first)  # a replay, refused
            clock.t += PRUNE_EVERY_S - 0.001
            pruned = signatures.pruning
            assert await signatures.first_use(f"test-{uuid.uuid4().hex}")
            assert signatures.pruning is pruned and held(late) == 1  # not yet: at most once an interval
            clock.t += 0.001
            assert await signatures.first_use(f"test-{uuid.uuid4().hex}")
            assert signatures.pruning is not pruned and await signatures.pruning >= 1
            assert (held(late), held(young)) == (0, 1)
        finally:
            await signatures.close()
            await signatures.connections.close()

    asyncio.run(scenario())


def test_callbacks_at_once_are_recorded_by_one_statement_and_a_replay_among_them_is_refused(url: str) -> None:
    seen_before = f"test-{uuid.uuid4().hex}"
    fresh = [f"test-{uuid.uuid4().hex}" for _ in range(40)]

    async def scenario() -> tuple[list[bool], list[int]]:
        signatures = CallbackSignatures(unflushed(url))
        statements: list[int] = []
        record = signatures._recorded_together.run

        async def counted(batch: list[str]) -> list[bool]:
            statements.append(len(batch))
            return await record(batch)

        signatures._recorded_together.run = counted
        try:
            assert await signatures.first_use(seen_before)
            asked = [*fresh, seen_before, fresh[0], fresh[1]]  # a replay of an old one, two of new ones
            got = await asyncio.gather(*(signatures.first_use(s) for s in asked))
            return list(got), statements
        finally:
            await signatures.close()
            await signatures.connections.close()

    got, statements = asyncio.run(scenario())
    assert statements == [1, 43]
    assert got == [True] * 40 + [False, False, False]
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM palette_api.callback_signatures WHERE signature = ANY(%s)",
                           [fresh]).fetchone()
    assert row == (40,)
