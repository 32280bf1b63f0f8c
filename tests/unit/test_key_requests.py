"""The keys asked for on one event loop (adapters.keyring._KeyRequests), with a stand-in for the
statement that makes them: which asks each statement takes, and what every caller gets."""

from __future__ import annotations

import asyncio
from uuid import UUID

from adapters.keyring import KEYS_AT_ONCE, _KeyRequests


def test_a_key_asked_for_first_is_made_first_however_many_smaller_ids_keep_arriving() -> None:
    """More than a statement's worth of asks arriving while each statement runs (an overload, or
    a client registering devices as fast as it can) delays every ask by its place in the queue,
    not by its user id: the largest id is not left waiting until the arrivals stop."""
    largest = UUID(int=2**128 - 1)
    statements: list[list[UUID]] = []
    smaller = iter(range(1, 10**6))
    asks: list[asyncio.Future[bytes]] = []

    async def scenario() -> None:
        def ask_many() -> None:
            asks.extend(asyncio.ensure_future(requests.key(UUID(int=next(smaller)))) for _ in range(KEYS_AT_ONCE))

        async def make(user_ids: list[UUID]) -> dict[UUID, bytes]:
            statements.append(user_ids)
            if len(statements) <= 3:
                ask_many()  # they arrive while this statement runs
            await asyncio.sleep(0)
            return {u: u.bytes for u in user_ids}

        requests = _KeyRequests(make, lambda _, wrapped: wrapped)
        first = asyncio.ensure_future(requests.key(largest))
        ask_many()
        assert await first == largest.bytes
        await asyncio.gather(*asks)

    asyncio.run(scenario())
    assert largest in statements[0]
    assert all(ids == sorted(ids) and len(ids) <= KEYS_AT_ONCE for ids in statements)  # one lock order
    assert sum(map(len, statements)) == 4 * KEYS_AT_ONCE + 1  # each made once
