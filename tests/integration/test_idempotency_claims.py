"""Idempotency-Key claims against PostgreSQL when another request moves the key between the
claim's statements (adapters.api.idempotency on the loop's own connections)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from adapters.api.envelope import fail
from adapters.api.idempotency import ANSWER_BYTES_PER_KEY, IdempotencyKeys, ensure_schema, unflushed
from adapters.settings import Settings


class Tokens:
    def __init__(self, user_id: uuid.UUID) -> None:
        self.user_id = user_id

    def verify(self, token: str) -> tuple[uuid.UUID, str]:
        return self.user_id, "client"


class UserTokens:
    """Each token is its user's id."""

    def verify(self, token: str) -> tuple[uuid.UUID, str]:
        return uuid.UUID(token), "client"


async def _post(keys: IdempotencyKeys, path: str, *idempotency_keys: str, client: str = "127.0.0.1",
                bearer: str = "t") -> int:
    """The status ``keys`` answers a POST of ``{}`` to ``path`` with these Idempotency-Key headers,
    from ``client`` with this ``bearer`` token."""
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [(b"authorization", b"Bearer " + bearer.encode()),
               *((b"idempotency-key", k.encode()) for k in idempotency_keys)]
    await keys({"type": "http", "method": "POST", "path": path, "headers": headers, "client": (client, 40000)},
               receive, send)
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


def _claimed_a_minute_ago(url: str, user_id: uuid.UUID, key: str, request: bytes, answer: bytes | None = None) -> None:
    """A claim of ``key`` for ``request`` (its path and body) made a minute ago, past STALE_S:
    with ``answer`` kept (a 201), else with none (its process died before answering)."""
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_schema(conn)
        conn.execute("INSERT INTO palette_api.idempotency (scope, key, request_hash, status, headers, body, "
                     "created_at) VALUES (%s, %s, %s, %s, %s, %s, now() - interval '1 minute')",
                     [f"user:{user_id}", key, hashlib.sha256(request).hexdigest(),
                      None if answer is None else 201, None if answer is None else "[]", answer])


def test_a_key_released_while_its_retry_claims_it_is_claimed_again_not_refused_as_another_request(
    settings: Settings,
) -> None:
    url = settings.effective_database_url
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_schema(conn)
    user_id, key = uuid.uuid4(), f"k-{uuid.uuid4().hex}"
    connections = unflushed(url)
    ran: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(True)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"made"})

    keys = IdempotencyKeys(app, connections, Tokens(user_id), fail)
    # The first request is in flight: its claim is there, for the very same body.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO palette_api.idempotency (scope, key, request_hash) VALUES (%s, %s, %s)",
                     [f"user:{user_id}", key, hashlib.sha256(b"/rules\n{}").hexdigest()])
    plain = connections.connection

    @contextlib.asynccontextmanager
    async def releasing_after_the_first_statement() -> AsyncIterator[Any]:
        async with plain() as conn:
            execute, statements = conn.execute, []

            async def hooked(*args: Any, **kwargs: Any) -> Any:
                cursor = await execute(*args, **kwargs)
                statements.append(args[0])
                if len(statements) == 1:  # the insert found the claim: now the first request fails (released)
                    with psycopg.connect(url, autocommit=True) as other:
                        other.execute("DELETE FROM palette_api.idempotency WHERE key = %s", [key])
                return cursor

            conn.execute = hooked
            yield conn

    connections.connection = releasing_after_the_first_statement  # type: ignore[method-assign]

    async def retry() -> int:
        try:
            return await _post(keys, "/rules", key)
        finally:
            connections.connection = plain  # type: ignore[method-assign]
            await connections.close()

    assert asyncio.run(retry()) == 201  # before: 422, "reused with a different request"
    assert ran == [True]



def test_an_owner_holds_at_most_its_cap_of_keys_and_the_header_given_twice_is_refused(settings: Settings) -> None:
    url = settings.effective_database_url
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_schema(conn)
    user_id, other_id = uuid.uuid4(), uuid.uuid4()
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 404, "headers": []})  # stored, as any 404
        await send({"type": "http.response.body", "body": b"none"})

    async def scenario() -> list[int]:
        connections = unflushed(url)
        mine = IdempotencyKeys(app, connections, Tokens(user_id), fail, max_keys=3)
        theirs = IdempotencyKeys(app, connections, Tokens(other_id), fail, max_keys=3)
        try:
            statuses = [await _post(mine, f"/jobs/{i}/cancel", f"k{i}") for i in range(4)]
            statuses.append(await _post(mine, "/jobs/0/cancel", "k0"))  # a key it holds: replayed
            statuses.append(await _post(theirs, "/jobs/9/cancel", "k9"))  # another owner's cap is its own
            statuses.append(await _post(mine, "/jobs/5/cancel", "a", "b"))
            return statuses
        finally:
            await connections.close()

    assert asyncio.run(scenario()) == [404, 404, 404, 429, 404, 404, 422]
    assert ran == ["/jobs/0/cancel", "/jobs/1/cancel", "/jobs/2/cancel", "/jobs/9/cancel"]
    with psycopg.connect(url, autocommit=True) as conn:
        held = conn.execute("SELECT count(*) FROM palette_api.idempotency WHERE scope = %s",
                            [f"user:{user_id}"]).fetchone()
    assert held == (3,)


def test_a_stale_claim_is_taken_over_only_by_a_retry_of_the_same_request(settings: Settings) -> None:
    """A claim older than STALE_S belongs to a process that died before answering: its retry runs
    again; another request under the key is still a 422, not a run in the dead one's place."""
    url = settings.effective_database_url
    user_id, key = uuid.uuid4(), f"k-{uuid.uuid4().hex}"
    _claimed_a_minute_ago(url, user_id, key, b"/rules\n{}")
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"made"})

    async def scenario() -> list[int]:
        connections = unflushed(url)
        keys = IdempotencyKeys(app, connections, Tokens(user_id), fail)
        try:
            return [await _post(keys, "/jobs", key), await _post(keys, "/rules", key)]
        finally:
            await connections.close()

    assert asyncio.run(scenario()) == [422, 201]
    assert ran == ["/rules"]


def test_the_owners_of_one_address_share_its_keys_however_many_owners_it_makes(settings: Settings) -> None:
    """Each owner holds at most its cap of keys, but owners cost an address one registration each:
    one client held the cap (10,000 kept answers) for every user it had made. The keys claimed
    from one address within the keys' lifetime are bounded too, whichever owners claim them."""
    url = settings.effective_database_url
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_schema(conn)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})  # stored, as any 404
        await send({"type": "http.response.body", "body": b"none"})

    async def scenario() -> list[int]:
        connections = unflushed(url)
        keys = IdempotencyKeys(app, connections, UserTokens(), fail, max_keys=100, per_address=3)
        owners = [str(uuid.uuid4()) for _ in range(4)]

        async def post(i: int, client: str = "198.51.100.7") -> int:
            return await _post(keys, f"/jobs/{i}/cancel", f"k{i}", client=client, bearer=owners[i])

        try:
            statuses = [await post(0) for _ in range(10)]  # one key claimed, then replayed: it spends one
            statuses += [await post(1), await post(2), await post(3)]
            statuses += [await post(0), await post(3, client="198.51.100.8")]  # a held key; another address
            return statuses
        finally:
            await connections.close()

    # Before: the replays spent the address's keys, and the first owner's ninth replay was a 429.
    assert asyncio.run(scenario()) == [404] * 10 + [404, 404, 429] + [404, 404]


def test_the_answers_an_address_keeps_are_bounded_in_bytes_not_only_in_keys(settings: Settings) -> None:
    """A kept answer costs its address one key per ANSWER_BYTES_PER_KEY: counted in keys alone,
    a keyed rerun of a 50-photo job kept 338 KB for a day (600 mask links), and one client's users
    kept a job budget's worth of them (20,000 an address a day: 6.8 GB in PostgreSQL, for jobs
    canceled at no cost). Past the address's bytes an answer still reaches its client, unkept (a
    retry runs again, and a creation finds what it made: ids derive from the key), and the next
    new key is a 429."""
    url = settings.effective_database_url
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_schema(conn)
    big = b"u" * (16 * ANSWER_BYTES_PER_KEY)  # an answer of 16 keys' worth

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": big})

    owners = [str(uuid.uuid4()) for _ in range(4)]

    async def scenario() -> list[int]:
        connections = unflushed(url)
        keys = IdempotencyKeys(app, connections, UserTokens(), fail, max_keys=100, per_address=33)
        try:
            return [await _post(keys, "/jobs/1/rerun", f"k{i}", client="198.51.100.9", bearer=owner)
                    for i, owner in enumerate(owners)]
        finally:
            await connections.close()

    statuses = asyncio.run(scenario())
    with psycopg.connect(url, autocommit=True) as conn:
        kept = conn.execute("SELECT coalesce(sum(octet_length(body)), 0) FROM palette_api.idempotency "
                            "WHERE scope = ANY(%s)", [[f"user:{o}" for o in owners]]).fetchone()
    # Before: every answer kept (64 of the address's 33 keys' worth), and no refusal.
    assert statuses == [201, 201, 201, 429] and kept is not None
    assert kept[0] == 2 * len(big)  # the third reached its client unkept


def test_an_answer_whose_key_cannot_be_stored_still_reaches_its_client(settings: Settings) -> None:
    """The database restarts while a keyed command runs: its claim's connection is dead when the
    answer is to be kept. The command did what it did, so its client gets the answer (the key is
    released on a new connection: a retry runs it again, as after any crash); before, the
    answer's body was never sent and the error escaped to the server (a traceback, a cut answer)."""
    url = settings.effective_database_url
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_schema(conn)
    user_id, key = uuid.uuid4(), f"k-{uuid.uuid4().hex}"
    connections = unflushed(url)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # The claim's connection is idle now: the server ends it, as a restart would.
        with psycopg.connect(url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                          "AND query LIKE %s", ["%palette_api.idempotency%"])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"made"})

    keys = IdempotencyKeys(app, connections, Tokens(user_id), fail)
    sent: list[Any] = []

    async def scenario() -> None:
        async def receive() -> Any:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        try:
            await keys({"type": "http", "method": "POST", "path": "/rules", "client": ("127.0.0.1", 40000),
                        "headers": [(b"authorization", b"Bearer t"), (b"idempotency-key", key.encode())]},
                       receive, send)
        finally:
            await connections.close()

    asyncio.run(scenario())
    assert [m.get("status") or m.get("body") for m in sent] == [201, b"made"]
    with psycopg.connect(url, autocommit=True) as conn:
        held = conn.execute("SELECT count(*) FROM palette_api.idempotency WHERE key = %s", [key]).fetchone()
    assert held == (0,)  # released: the retry runs again rather than waiting STALE_S on a claim in flight


@pytest.mark.parametrize("first_status", [409, 201])
def test_a_request_whose_stale_claim_was_taken_over_leaves_the_retrys_answer_alone(settings: Settings,
                                                                                   first_status: int) -> None:
    """A request still running past STALE_S has its claim taken over by its retry, which runs and
    keeps its answer; the first one's own end (a 409, released; or a 201 of its own) must neither
    delete the retry's answer nor overwrite it: a third try is then a replay of the retry's answer,
    not a third run, nor what the slow first run said after it."""
    url = settings.effective_database_url
    user_id, key = uuid.uuid4(), f"k-{uuid.uuid4().hex}"
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_schema(conn)
    ran: list[int] = []
    statuses: list[int] = []
    keys: list[IdempotencyKeys] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        run = len(ran)
        ran.append(run)
        status = 201
        if run == 0:  # the first run outlives its claim; its retry comes meanwhile and runs
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE palette_api.idempotency SET created_at = now() - interval '1 minute' "
                             "WHERE scope = %s AND key = %s", [f"user:{user_id}", key])
            statuses.append(await _post(keys[0], "/jobs/x/execute", key))
            status = first_status
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"run %d" % run})

    async def scenario() -> None:
        connections = unflushed(url)
        keys.append(IdempotencyKeys(app, connections, Tokens(user_id), fail))
        try:
            statuses.insert(0, await _post(keys[0], "/jobs/x/execute", key))
            statuses.append(await _post(keys[0], "/jobs/x/execute", key))
        finally:
            await connections.close()

    asyncio.run(scenario())
    assert statuses == [first_status, 201, 201]  # the first, its retry, and the retry's answer replayed
    assert ran == [0, 1]
    with psycopg.connect(url, autocommit=True) as conn:
        kept = conn.execute("SELECT body FROM palette_api.idempotency WHERE scope = %s AND key = %s",
                            [f"user:{user_id}", key]).fetchone()
    assert kept is not None and bytes(kept[0]) == b"run 1"


def test_an_answer_kept_longer_than_a_stale_claim_is_replayed_not_run_again(settings: Settings) -> None:
    """STALE_S is for a claim with no answer (its process died): a kept answer stays the answer
    until the key's TTL, however long ago it was kept."""
    url = settings.effective_database_url
    user_id, key = uuid.uuid4(), f"k-{uuid.uuid4().hex}"
    _claimed_a_minute_ago(url, user_id, key, b"/jobs/x/cancel\n{}", answer=b"kept")
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ran again"})

    sent: list[Any] = []

    async def scenario() -> None:
        connections = unflushed(url)

        async def receive() -> Any:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        try:
            await IdempotencyKeys(app, connections, Tokens(user_id), fail)(
                {"type": "http", "method": "POST", "path": "/jobs/x/cancel", "client": ("127.0.0.1", 40000),
                 "headers": [(b"authorization", b"Bearer t"), (b"idempotency-key", key.encode())]}, receive, send)
        finally:
            await connections.close()

    asyncio.run(scenario())
    assert ran == []
    start, body = sent
    assert start["status"] == 201 and (b"idempotent-replayed", b"true") in start["headers"]
    assert body["body"] == b"kept"


def test_a_request_that_fails_before_its_answer_releases_its_key(settings: Settings) -> None:
    """A route that raises: the retry runs again at once, not a 409 until the claim is stale."""
    url = settings.effective_database_url
    user_id, key = uuid.uuid4(), f"k-{uuid.uuid4().hex}"
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_schema(conn)
    ran: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(len(ran))
        if len(ran) == 1:
            raise RuntimeError("the route failed")
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"made"})

    async def scenario() -> int:
        connections = unflushed(url)
        keys = IdempotencyKeys(app, connections, Tokens(user_id), fail)
        try:
            with contextlib.suppress(RuntimeError):
                await _post(keys, "/rules", key)
            return await _post(keys, "/rules", key)
        finally:
            await connections.close()

    assert asyncio.run(scenario()) == 201
    assert ran == [0, 1]
