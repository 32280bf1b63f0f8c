"""``Idempotency-Key`` on POSTs (Stripe's rules): the same key and body get the same response;
the same key with another body or path is a 422; a key still in flight is a 409, until its
claim is ``STALE_S`` old (its process died before answering): then a retry runs it again, and
creations, whose ids derive from the key (``id_for_key``), find what the first run committed. A
request whose claim was taken over (it was slow, not dead) neither keeps its answer nor releases
the key when it ends: the claim is its time, and only the latest claim settles the key.

Keys belong to the authenticated principal: a request without a valid bearer token neither
claims nor reads a key; the header is ignored and the app answers it as usual (a 401, or, for
the endpoints without a token, their own idempotency: registration per device hash, GPU
callbacks per result key). Answers that invite a retry (409, 429, 5xx) or refuse the request
before it ran (401, 422) are not stored. A key
is forgotten ``ttl_s`` after its claim; each claim deletes at most ``SWEEP_BATCH`` expired keys.
A principal holds at most ``MAX_KEYS_PER_OWNER`` keys at a time: a new key past that is a 429
(a retry of a key it holds is answered as always). A principal costs one registration, so the
keys one client address claims are bounded too, whatever their principals: at most
``per_address`` a key's lifetime (a bucket that holds that many and refills over ``ttl_s``), then
a 429; only a key claimed anew spends one (a retry of a held key is answered as always). An answer
kept costs its address one key more per ``ANSWER_BYTES_PER_KEY`` past the first, spent when it is
kept: counted in keys alone, a keyed rerun kept 338 KB (600 mask links) and one client's users a
job budget's worth of them (6.8 GB a day); an answer its address cannot pay for reaches its client
unkept (its key released: a retry runs again, and a creation finds what it made). A keyed
request that gives the key, or its bearer token, twice is a 422: which one is meant would be a
guess (the routes read the first of a repeated header, and so does this middleware, which ignores
the key without a valid first token).

Claims and answers are written on the event loop's own connections (adapters.loop_pg: no worker
thread), in autocommit, without waiting for the WAL flush (``unflushed``): a fsync per write
doubled the cost of a keyed creation. A database crash can forget the last few hundred
milliseconds of them; a retry then runs again, as after a stale claim, and finds what the first
run committed (the event store's commits do wait for the flush)."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Container
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.api import unavailable
from adapters.api.envelope import ApiError
from adapters.api.rate_limit import RateLimited, TokenBuckets, client_address
from adapters.ddl import run_locked
from adapters.loop_pg import LoopConnections
from adapters.tokens import TokenInvalid

MAX_KEY = 255
STALE_S = 15  # an in-flight claim this old belongs to a process that died: a retry takes it over
DEFAULT_TTL_S = 24 * 3600.0
SWEEP_BATCH = 16  # expired keys deleted per claim (which adds at most one): the sweep outpaces growth
KEY_NAMESPACE = uuid.UUID("6f1c3a52-8d0e-4b8e-9a57-6c1f0e0b7d21")
CLAIM_ATTEMPTS = 3  # a key released or swept between a claim's statements is claimed again
MAX_KEYS_PER_OWNER = 10_000  # held at once (a day's worth at the default TTL): what a client can grow
ANSWER_BYTES_PER_KEY = 4096  # a kept answer costs its address a key per this many bytes (begun)
UNFLUSHED_CONNECTIONS = 8  # a loop's: under 128 paced sessions 4 made claims queue
FULL = ("", None, None, None)  # _claim's answer when the owner holds its most keys
# Headers a keyed request carries once at most (the module's docstring).
ONCE = ((b"idempotency-key", "Idempotency-Key"), (b"authorization", "Authorization"))


KEY_PARAMETER = {
    "name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": MAX_KEY},
    "description": "The same key and body get the same answer while the key is kept (a day by default); the same "
                   "key with another body or path is a 422, a key still in flight a 409 (Stripe's rules)."}


def document_keys(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (the app's OpenAPI) with the header listed on every POST a bearer token signs,
    as this middleware takes it there, where only the routes that read it themselves listed it;
    idempotent on the cached schema."""
    for operations in schema.get("paths", {}).values():
        post = operations.get("post")
        if post is None or not post.get("security"):
            continue  # registration and GPU callbacks: their own idempotency (module docstring)
        parameters = post.setdefault("parameters", [])
        if not any(p.get("in") == "header" and p.get("name", "").lower() == "idempotency-key" for p in parameters):
            parameters.append(dict(KEY_PARAMETER))
    return schema


def id_for_key(user_id: uuid.UUID, kind: str, key: str | None) -> uuid.UUID | None:
    """The id a creation under this Idempotency-Key gets: a retry after a crash that came after
    the commit finds the object, so it is created once (the key's stored answer may be lost)."""
    return uuid.uuid5(KEY_NAMESPACE, f"{kind}:{user_id}:{key}") if key else None


DDL = (
    "CREATE SCHEMA IF NOT EXISTS palette_api",
    "CREATE TABLE IF NOT EXISTS palette_api.idempotency (scope text NOT NULL, key text NOT NULL, "
    "request_hash text NOT NULL, status integer, headers jsonb, body bytea, "
    "created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (scope, key))",
    "CREATE INDEX IF NOT EXISTS idempotency_created_at ON palette_api.idempotency (created_at)",
    # Signed callbacks seen inside their window: the same signature twice is a replay.
    "CREATE TABLE IF NOT EXISTS palette_api.callback_signatures (signature text PRIMARY KEY, "
    "seen_at timestamptz NOT NULL DEFAULT now())",
)


def unflushed(conninfo: str) -> LoopConnections:
    """Connections whose commits do not wait for the WAL flush, for records a crash may forget
    (idempotency claims, seen callback signatures)."""
    return LoopConnections(conninfo, size=UNFLUSHED_CONNECTIONS, flushed=False)


def ensure_schema(conn: Any) -> None:
    """``DDL``, once: every API process runs it as it starts (``adapters.ddl``)."""
    run_locked(conn, "palette-api-ddl", DDL)


def storable(status: int) -> bool:
    """Whether an answer is kept for the key: not one that invites a retry (409, 429, 5xx), nor
    one refused before the endpoint ran (401 token, 422 parameters), as Stripe does, nor a
    redirect (3xx: the request was not handled here; a retry that follows it must not be refused)."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in (401, 409, 422, 429))


_HEX = "[0-9a-fA-F]"
_HYPHENATED = f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
# The spellings of an id the routes' UUID parameters take (pydantic's): any case, with or without
# its hyphens, in braces, or after "urn:uuid:".
_ID_SPELLINGS = re.compile(f"{_HYPHENATED}|{_HEX}{{32}}|\\{{{_HYPHENATED}\\}}|urn:uuid:{_HYPHENATED}")


def canonical_path(path: str) -> str:
    """``path`` with each id in the one form the routes read it as: they take an id in any of its
    spellings as the same one, so a retry that spells it otherwise must be the same request; a
    segment the routes would refuse is left as it is."""
    return "/".join(str(uuid.UUID(segment)) if _ID_SPELLINGS.fullmatch(segment) else segment
                    for segment in path.split("/"))


def _valid_key(key: bytes) -> bool:
    # Printable ASCII only: what the database stores as text without surprises (no NUL).
    return 0 < len(key) <= MAX_KEY and all(0x20 <= b < 0x7F for b in key)


def _first_of_each(raw_headers: list[tuple[bytes, bytes]]) -> tuple[dict[bytes, bytes], set[bytes]]:
    """The first value of each header, as the routes read a repeated one, and the names repeated."""
    headers: dict[bytes, bytes] = {}
    repeated: set[bytes] = set()
    for name, value in raw_headers:
        if name in headers:
            repeated.add(name)
        else:
            headers[name] = value
    return headers, repeated


def _key_refusal(raw_key: bytes, repeated: set[bytes]) -> str | None:
    """Why a keyed request's headers are refused (None: they are not)."""
    for once, spelled in ONCE:
        if once in repeated:
            return f"{spelled} must be given once"
    if not _valid_key(raw_key):
        return f"Idempotency-Key must be 1..{MAX_KEY} printable ASCII characters"
    return None


async def _whole_body(receive: Receive) -> bytes | None:
    """The request's body, all of it (the edge caps it); None when its client left before it ended."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


def _replay(stored: tuple[str, int | None, Any, Any]) -> ASGIApp:
    """The kept answer, sent again and marked as such."""
    _, status, headers, body = stored
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers or []]
    raw_headers.append((b"idempotent-replayed", b"true"))

    async def replay(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": bytes(body or b"")})

    return replay


class TokenVerifier(Protocol):
    def verify(self, token: str) -> tuple[uuid.UUID, str]:
        """The token's user id and role; raises TokenInvalid."""
        ...


class IdempotencyKeys:
    """Pure ASGI middleware; requests without the header, or without a valid token, pass straight through."""

    def __init__(self, app: ASGIApp, connections: LoopConnections, tokens: TokenVerifier, fail: Callable[..., ASGIApp],
                 ttl_s: float = DEFAULT_TTL_S, erased: Container[UUID] = frozenset(),
                 max_keys: int = MAX_KEYS_PER_OWNER, per_address: int | None = None,
                 trusted_proxies: int = 0) -> None:
        self.app = app
        self.connections = connections
        self.tokens = tokens
        self.fail = fail
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self.per_address = (TokenBuckets(per_address / ttl_s, per_address) if per_address is not None else None)
        self.trusted_proxies = trusted_proxies
        self.erased = erased  # users whose kept answers are never replayed (the route answers 401)
        # Answers sent without their key kept (said in the log at most every WARN_EVERY_S).
        self.unsettled = unavailable.Away("the database, keeping an Idempotency-Key's answer,",
                                          "answer(s) sent without their key kept")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        raw_headers = scope.get("headers") or []
        headers, repeated = _first_of_each(raw_headers)
        raw_key = headers.get(b"idempotency-key")
        owner = self._owner(headers) if raw_key is not None else None
        if raw_key is None or owner is None:
            await self.app(scope, receive, send)
            return
        if (refusal := _key_refusal(raw_key, repeated)) is not None:
            await self.fail("VALIDATION_FAILED", refusal)(scope, receive, send)
            return
        key = raw_key.decode("ascii")
        try:
            body = await _whole_body(receive)
        except ApiError as e:  # the body cap tripped while buffering
            await self.fail(e.code, e.message)(scope, receive, send)
            return
        if body is None:
            return  # gone before its body ended: what came is not its request, and nobody waits
        request_hash = hashlib.sha256(canonical_path(scope["path"]).encode() + b"\n" + body).hexdigest()
        try:
            claimed, stored = await self._claim(owner, key, request_hash)
        except unavailable.DATABASE_ERRORS as e:
            if not unavailable.database_away(e):
                raise
            await self.fail("UNAVAILABLE", unavailable.message(e), headers=unavailable.HEADERS)(scope, receive, send)
            return
        if claimed is None:
            await self._held(stored, request_hash)(scope, receive, send)
            return
        address = self._address(scope, raw_headers)
        if (refused := self._spend_address_keys(address)) is not None:
            # Only a key claimed anew spends from its address: a replay, a 409 or a 422 adds no
            # row, and charging them let one client's replays of one key refuse its neighbours'.
            await self._release(owner, key, claimed)
            await self.fail("RATE_LIMITED", "too many Idempotency-Keys from this address; send this request "
                            "without one, or later", status=429,
                            headers={"Retry-After": refused.retry_after_header})(scope, receive, send)
            return
        await self._run_keeping(scope, body, send, owner=owner, key=key, claimed=claimed, address=address)

    def _held(self, stored: tuple[str, int | None, Any, Any] | None, request_hash: str) -> ASGIApp:
        """The answer to a request whose key it did not claim: the answer kept for the key, or why
        there is none to give."""
        if stored is FULL:
            return self.fail("RATE_LIMITED", f"at most {self.max_keys} Idempotency-Keys are kept at once; "
                             "send this request without one, or later", status=429, headers={"Retry-After": "3600"})
        if stored is not None and stored[0] != request_hash:
            return self.fail("VALIDATION_FAILED", "Idempotency-Key reused with a different request", status=422)
        if stored is None or stored[1] is None:
            return self.fail("CONFLICT", "a request with this Idempotency-Key is still in flight", status=409)
        return _replay(stored)

    async def _run_keeping(self, scope: Scope, body: bytes, send: Send, *, owner: str, key: str,
                           claimed: datetime, address: str | None) -> None:
        """Run the request (its body, read already, given again) and keep its answer for the key,
        or release the key if it does not run to its answer's end."""
        sent = False

        async def replay_body() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        captured: dict[str, Any] = {"body": b"", "settled": False}

        async def capture(message: Message) -> None:
            # The claim is settled (answer stored, or key released) before the last byte leaves:
            # a retry that arrives the moment the client has its answer finds the answer, or runs
            # again, never "in flight".
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                captured["headers"] = [[k.decode("latin-1"), v.decode("latin-1")]
                                       for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                captured["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    status = captured.get("status", 500)
                    await self._settle(owner, key, claimed, status, captured["headers"], captured["body"], address)
                    captured["settled"] = True
            await send(message)

        try:
            await self.app(scope, replay_body, capture)
        finally:
            if not captured["settled"]:
                await self._release(owner, key, claimed)  # a crash: a retry may run it again

    def _address(self, scope: Scope, raw_headers: list[tuple[bytes, bytes]]) -> str | None:
        """The client address the keys are counted against (None: they are not)."""
        if self.per_address is None:
            return None
        forwarded_for = [v.decode("latin-1") for n, v in raw_headers if n == b"x-forwarded-for"]
        peer = scope["client"][0] if scope.get("client") else None
        return client_address(peer, forwarded_for, self.trusted_proxies)

    def _spend_address_keys(self, address: str | None, keys: int = 1) -> RateLimited | None:
        """Spend ``keys`` of the client address's keys; the refusal when it holds fewer."""
        if self.per_address is None or address is None or keys <= 0:
            return None
        try:
            self.per_address.take(address, keys)
        except RateLimited as e:
            return e
        return None

    def _owner(self, headers: dict[bytes, bytes]) -> str | None:
        """The authenticated principal the keys belong to; None without a valid bearer token."""
        auth = headers.get(b"authorization", b"").decode(errors="replace")
        if not auth.lower().startswith("bearer "):
            return None
        try:
            user_id, role = self.tokens.verify(auth[7:].strip())
        except TokenInvalid:
            return None
        if role == "client" and user_id in self.erased:
            return None
        return f"user:{user_id}" if role == "client" else f"{role}:{user_id}"

    async def _claim(self, owner: str, key: str,
                     request_hash: str) -> tuple[datetime | None, tuple[str, int | None, Any, Any] | None]:
        """The claim's time (None: not claimed; then the answer kept for the key, if any), which
        tells this claim from a retry's that takes it over once it is stale: only the request
        holding the claim keeps its answer or releases the key."""
        async with self.connections.connection() as conn:
            for _ in range(CLAIM_ATTEMPTS):
                # The sweep rides along in the claim's statement: one round trip for a new key.
                claim = await (await conn.execute(CLAIM, {
                    "ttl": self.ttl_s, "limit": SWEEP_BATCH, "s": owner, "k": key, "h": request_hash,
                    "cap": self.max_keys})).fetchone()
                claimed_at, full = claim if claim is not None else (None, False)
                if claimed_at is not None:
                    return claimed_at, None
                # An expired key is a new key; a stale claim of the same request is taken over.
                taken_over = await (await conn.execute(
                    "UPDATE palette_api.idempotency SET request_hash = %(h)s, status = NULL, headers = NULL, "
                    "body = NULL, created_at = now() WHERE scope = %(s)s AND key = %(k)s AND ("
                    "created_at < now() - %(ttl)s * interval '1 second' OR (request_hash = %(h)s AND status IS NULL "
                    "AND created_at < now() - %(stale)s * interval '1 second')) RETURNING created_at",
                    {"h": request_hash, "s": owner, "k": key, "ttl": self.ttl_s, "stale": STALE_S})).fetchone()
                if taken_over:
                    return taken_over[0], None
                row = await (await conn.execute(
                    "SELECT request_hash, status, headers, body FROM palette_api.idempotency "
                    "WHERE scope = %s AND key = %s", [owner, key])).fetchone()
                if row is not None:
                    return None, (row[0], row[1], row[2], row[3])
                if full:
                    return None, FULL
                # Gone since the insert found it (released by its request, or swept by another
                # claim): claim it again, never answer a retry of the same request with a 422.
        return None, None  # still vanishing each time: the caller answers "in flight" (409)

    async def _settle(self, owner: str, key: str, claimed: datetime, status: int, headers: Any, body: bytes,
                      address: str | None = None) -> None:
        """Keep the answer for the key, or release it: one the address cannot pay for in keys
        (``ANSWER_BYTES_PER_KEY``) is released. The request has run: a database that fails
        now (restarted, no connection free) must not cost its client the answer, so the key is
        released instead (on a new connection: a retry runs again, as after a crash), or, that
        failing too, left to go stale (STALE_S)."""
        try:
            extra = -(-len(body) // ANSWER_BYTES_PER_KEY) - 1
            if storable(status) and self._spend_address_keys(address, extra) is None:
                await self._store(owner, key, claimed, status, headers, body)
            else:
                await self._release(owner, key, claimed)
            return
        except unavailable.DATABASE_ERRORS as e:
            self.unsettled.note(e)
        try:
            await self._release(owner, key, claimed)
        except unavailable.DATABASE_ERRORS as e:
            self.unsettled.note(e)

    async def _store(self, owner: str, key: str, claimed: datetime, status: int, headers: Any, body: bytes) -> None:
        async with self.connections.connection() as conn:
            await conn.execute("UPDATE palette_api.idempotency SET status = %s, headers = %s, body = %s "
                               "WHERE scope = %s AND key = %s AND created_at = %s",
                               [status, json.dumps(headers), body, owner, key, claimed])

    async def _release(self, owner: str, key: str, claimed: datetime) -> None:
        async with self.connections.connection() as conn:
            await conn.execute("DELETE FROM palette_api.idempotency WHERE scope = %s AND key = %s AND created_at = %s",
                               [owner, key, claimed])



# At most %(limit)s keys claimed more than %(ttl)s seconds ago, oldest first, skipping rows another
# claim holds and the key being claimed (an expired one is taken over by the claim itself).
SWEEP = ("DELETE FROM palette_api.idempotency WHERE (scope, key) IN (SELECT scope, key FROM palette_api.idempotency "
         "WHERE created_at < now() - %(ttl)s * interval '1 second' AND (scope, key) <> (%(s)s, %(k)s) "
         "ORDER BY created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)")
# The owner's live keys, counted up to the cap; the key is inserted only below it. Returns
# (the claim's time, None if not inserted; full).
CLAIM = ("WITH swept AS (" + SWEEP + "), held AS (SELECT count(*) AS n "  # noqa: S608 - made of constants
         "FROM (SELECT 1 FROM palette_api.idempotency "
         "WHERE scope = %(s)s AND created_at >= now() - %(ttl)s * interval '1 second' LIMIT %(cap)s) live), "
         "claimed AS (INSERT INTO palette_api.idempotency (scope, key, request_hash) "
         "SELECT %(s)s, %(k)s, %(h)s FROM held WHERE held.n < %(cap)s ON CONFLICT DO NOTHING RETURNING created_at) "
         "SELECT (SELECT created_at FROM claimed), (SELECT n FROM held) >= %(cap)s")
