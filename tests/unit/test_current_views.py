"""CurrentViews: a kept view is served only while the store says its stream is at the version the
view was taken at; anything else reads through (the store's answers and the reads are scripted)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar
from uuid import UUID, uuid4

from hypothesis import given, settings
from hypothesis import strategies as st

from application.current_views import CurrentViews
from application.ports import VersionUnknown

T = TypeVar("T")


class Store:
    """Streams' versions, bumped by ``write``; ``down`` makes every version query fail."""

    def __init__(self) -> None:
        self.versions: dict[UUID, int] = {}
        self.down = False
        self.reads = 0

    def write(self, aggregate_id: UUID) -> None:
        self.versions[aggregate_id] = self.versions.get(aggregate_id, 0) + 1

    async def current(self, aggregate_id: UUID) -> int:
        if self.down:
            raise VersionUnknown("down")
        return self.versions.get(aggregate_id, 0)

    async def read(self, aggregate_id: UUID) -> tuple[int, str]:
        self.reads += 1
        version = self.versions.get(aggregate_id, 0)
        return version, f"{aggregate_id}@{version}"

    async def close(self) -> None:
        return None


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["read", "write", "down", "up"]), st.integers(0, 2)), max_size=60))
def test_every_read_answers_the_state_the_store_has_now(steps: list[tuple[str, int]]) -> None:
    """Whatever the interleaving of reads, writes and store outages, a read answers the view of
    the version the store holds at that moment (the oracle: the store's own counter)."""
    store = Store()
    ids = [uuid4() for _ in range(3)]
    views = CurrentViews(store, store.read, maxsize=2)

    async def script() -> None:
        for op, n in steps:
            aggregate_id = ids[n]
            if op == "write":
                store.write(aggregate_id)
            elif op == "down":
                store.down = True
            elif op == "up":
                store.down = False
            else:
                assert await views.get(aggregate_id) == f"{aggregate_id}@{store.versions.get(aggregate_id, 0)}"
            assert views.kept <= 2

    run(script())


def test_an_unchanged_stream_is_answered_without_a_read_and_a_changed_one_reads_again() -> None:
    store = Store()
    user = uuid4()
    store.write(user)
    views = CurrentViews(store, store.read)

    async def script() -> list[str]:
        got = [await views.get(user), await views.get(user)]
        store.write(user)
        got.append(await views.get(user))
        return got

    assert run(script()) == [f"{user}@1", f"{user}@1", f"{user}@2"]
    assert store.reads == 2 and views.hits == 1 and views.misses == 2


def test_a_store_that_cannot_tell_means_a_read_not_the_kept_view() -> None:
    store = Store()
    user = uuid4()
    views = CurrentViews(store, store.read)
    run(views.get(user))
    store.down = True
    run(views.get(user))
    assert store.reads == 2


def test_an_older_read_coming_back_last_does_not_replace_a_newer_view() -> None:
    store = Store()
    user = uuid4()
    views = CurrentViews(store, store.read)
    views._keep(user, 3, "three")
    views._keep(user, 2, "two")
    store.versions[user] = 3
    assert run(views.get(user)) == "three" and store.reads == 0


def test_the_kept_views_are_bounded_least_recently_read_first() -> None:
    store = Store()
    ids = [uuid4() for _ in range(3)]
    views = CurrentViews(store, store.read, maxsize=2)

    async def script() -> None:
        for i in (ids[0], ids[1], ids[0], ids[2]):
            await views.get(i)

    run(script())
    assert views.kept == 2
    store.reads = 0
    run(views.get(ids[0]))
    assert store.reads == 0  # kept: read more recently than ids[1]
    run(views.get(ids[1]))
    assert store.reads == 1


def test_a_zero_bound_keeps_nothing() -> None:
    store = Store()
    views = CurrentViews(store, store.read, maxsize=0)
    user = uuid4()
    run(views.get(user))
    run(views.get(user))
    assert store.reads == 2 and views.kept == 0


def test_a_view_dropped_while_its_version_was_asked_is_still_answered() -> None:
    """maxsize 1: A's version is asked (A kept), B's read comes back meanwhile and drops A."""
    store = Store()
    a, b = uuid4(), uuid4()
    asked = asyncio.Event()
    release = asyncio.Event()

    class Slow(Store):
        async def current(self, aggregate_id: UUID) -> int:
            asked.set()
            await release.wait()
            return await super().current(aggregate_id)

    slow = Slow()
    slow.versions = store.versions
    views = CurrentViews(slow, store.read, maxsize=1)

    async def script() -> tuple[str, str]:
        await views.get(a)
        hit = asyncio.ensure_future(views.get(a))
        await asked.wait()
        other = await views.get(b)  # a miss: read, kept, A dropped
        release.set()
        return await hit, other

    assert run(script()) == (f"{a}@0", f"{b}@0")
    assert views.kept == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), max_size=6), max_size=8), st.integers(0, 3))
def test_concurrent_reads_between_writes_answer_the_state_now(rounds: list[list[int]], maxsize: int) -> None:
    """Reads of a round run together (each store call yields to the others); writes come between
    rounds: every read answers the version its stream has in that round."""
    store = Store()
    ids = [uuid4() for _ in range(3)]

    class Yielding(Store):
        async def current(self, aggregate_id: UUID) -> int:
            await asyncio.sleep(0)
            return await store.current(aggregate_id)

    async def read(aggregate_id: UUID) -> tuple[int, str]:
        await asyncio.sleep(0)
        return await store.read(aggregate_id)

    views = CurrentViews(Yielding(), read, maxsize=maxsize)

    async def script() -> None:
        for n, reads in enumerate(rounds):
            store.write(ids[n % 3])
            got = await asyncio.gather(*(views.get(ids[i]) for i in reads))
            assert got == [f"{ids[i]}@{store.versions.get(ids[i], 0)}" for i in reads]
            assert views.kept <= maxsize

    run(script())
